"""`Conversation`: turn N prefills only its new tokens, replies equal a fresh full prefill, the context policy,
reset, and the attention of the last reply against the exact weights of a full forward."""

from __future__ import annotations

import pytest
import torch
from chat_helpers import tiny_model

from qkv.models.conversation import Conversation, end_of_turn


def _count_forward(model):
    """A list that receives the number of tokens of every forward call of ``model``."""
    calls: list[int] = []
    model.register_forward_pre_hook(lambda mod, args: calls.append(args[0].shape[1]))
    return calls


def _common(a, b):
    n = 0
    while n < min(len(a), len(b)) and a[n] == b[n]:
        n += 1
    return n


def test_end_of_turn_marker_from_the_template():
    assert end_of_turn(tiny_model().tokenizer.chat_template) == "<|im_end|>"


def test_second_turn_prefills_only_new_tokens_and_matches_a_fresh_prefill():
    model = tiny_model()
    calls = _count_forward(model)
    conv = Conversation(model, system="be brief", max_new_tokens=12)
    first = conv.reply("hello there")
    assert conv.messages[-1] == {"role": "assistant", "content": first}
    cached = list(conv.ids)
    prompt1 = conv.last_turn.prompt
    calls.clear()
    second = conv.reply("what is the colour of the sky")
    ids2 = conv._encode(conv.messages[:-1])  # the turn-2 prompt: history, new message, generation prompt
    keep = _common(cached, ids2)
    assert keep >= prompt1  # the whole first prompt (and the reply, as re-tokenized) stays cached
    assert calls[0] == len(ids2) - keep == conv.last_turn.prefilled <= len(ids2) - prompt1
    assert all(n == 1 for n in calls[1:])  # then one token per decoding step
    assert conv.last_turn.reused == keep

    fresh = Conversation(model, system="be brief", max_new_tokens=12)
    fresh.messages = conv.messages[:-2]  # the first turn, nothing cached
    calls.clear()
    assert fresh.reply("what is the colour of the sky") == second
    assert calls[0] == len(ids2)
    # and the same as a plain generate() on the whole prompt
    out = model.generate(torch.tensor([ids2]), max_new_tokens=12)
    new = [t for t in out[0, len(ids2):].tolist()]
    if model.config.eos_token_id in new:
        new = new[: new.index(model.config.eos_token_id)]
    assert model.tokenizer.decode(new) == second


def test_streamed_pieces_are_the_reply():
    conv = Conversation(tiny_model(seed=1), max_new_tokens=10)
    pieces = list(conv.send("tell me a story"))
    assert "".join(pieces) == conv.messages[-1]["content"]
    assert conv.last_turn.generated > 0


def test_context_policy_drops_oldest_turns_and_keeps_the_system_message():
    model = tiny_model()
    conv = Conversation(model, system="be brief", max_new_tokens=6, max_context=64)
    dropped = []
    for text in ["hello there", "how are you today", "tell me a story", "what is the sky", "thank you"]:
        reply = conv.reply(text)
        dropped.append(conv.last_turn.dropped_turns)
        assert conv.last_turn.prompt + 6 <= 64
        assert conv.messages[0] == {"role": "system", "content": "be brief"}
        assert conv.messages[-2] == {"role": "user", "content": text}
        assert [m["role"] for m in conv.messages[1:]] == ["user", "assistant"] * ((len(conv.messages) - 1) // 2)
        fresh = Conversation(model, system="be brief", max_new_tokens=6, max_context=64)
        fresh.messages = conv.messages[:-2]
        assert fresh.reply(text) == reply  # the re-prefilled cache gives the same reply as a fresh one
    assert sum(dropped) > 0


def test_a_message_that_cannot_fit_is_refused_with_the_sizes():
    conv = Conversation(tiny_model(), system="be brief", max_new_tokens=6, max_context=64)
    with pytest.raises(ValueError, match=r"the message is \d+ tokens.*64-token context keeps 6"):
        conv.send("the sky is blue and the grass is green " * 8)
    assert conv.messages == [{"role": "system", "content": "be brief"}]
    with pytest.raises(ValueError, match="max_new_tokens=64 leaves no room"):
        Conversation(tiny_model(), max_new_tokens=64, max_context=64)


def test_reset_forgets_turns_keeps_system_and_its_cache():
    model = tiny_model()
    conv = Conversation(model, system="be brief", max_new_tokens=8)
    first = conv.reply("hello there")
    conv.reply("tell me a story")
    conv.reset()
    assert conv.messages == [{"role": "system", "content": "be brief"}]
    assert conv.reply("hello there") == first
    system_only = len(model.tokenizer.encode(model.tokenizer.chat_template.render(conv.messages[:1])))
    assert conv.last_turn.reused >= system_only > 0


def test_attention_of_last_reply_is_the_exact_mean_weight():
    model = tiny_model()
    conv = Conversation(model, system="be brief", max_new_tokens=8)
    conv.reply("hello there")
    conv.reply("what is the colour of the sky")
    prompt, reply = conv._last
    s, r = len(prompt), len(reply)
    with torch.no_grad():
        full = model(torch.tensor([prompt + reply]), return_weights=True)
    w = torch.stack([a[0].mean(0) for a in full.attentions])  # (L, T, T)
    ref = w[:, s - 1: s - 1 + r, :s].mean((0, 1))
    got = conv.attention_of_last_reply(top=5)
    assert len(got) == 5
    order = ref.topk(5).indices.tolist()
    assert [a.position for a in got] == order
    for a in got:
        assert a.score == pytest.approx(float(ref[a.position]), abs=1e-5)
        assert a.text == model.tokenizer.token_texts([prompt[a.position]])[0]
    assert float(ref.sum()) <= 1 + 1e-5


def test_refusals_name_the_fix():
    with pytest.raises(ValueError, match="no chat template.*template="):
        Conversation(tiny_model(template=None))
    model = tiny_model()
    model.tokenizer = None
    with pytest.raises(ValueError, match="tokenizer"):
        Conversation(model)
    with pytest.raises(TypeError, match="unknown generation option 'temprature'"):
        Conversation(tiny_model(), temprature=0.5)
    with pytest.raises(ValueError, match="no reply yet"):
        Conversation(tiny_model()).attention_of_last_reply()


def test_sampling_with_a_seed_is_reproducible():
    model = tiny_model()
    a = Conversation(model, max_new_tokens=8, do_sample=True, temperature=0.9, seed=3).reply("hello")
    b = Conversation(model, max_new_tokens=8, do_sample=True, temperature=0.9, seed=3).reply("hello")
    assert a == b
