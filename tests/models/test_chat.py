"""`CausalLM.chat`: a conversation through the tokenizer's template, then `generate`; and the checkpoint's
generation_config.json as defaults of `qkv.load`ed models."""

from __future__ import annotations

import json

import pytest
import torch
from chat_helpers import tiny_model

import qkv

MESSAGES = [{"role": "system", "content": "be brief"}, {"role": "user", "content": "hello there"}]


def test_chat_equals_generate_on_the_rendered_prompt():
    model = tiny_model()
    tok = model.tokenizer
    ids = tok.apply_chat_template(MESSAGES, add_generation_prompt=True)
    assert ids.count(tok.tok.token_to_id("<|im_start|>")) == 3  # the template's markers, not added twice
    out = model.generate(torch.tensor([ids]), max_new_tokens=12, eos_token_id=[tok.eos_id])
    new = out[0, len(ids):].tolist()
    new = new[: new.index(tok.eos_id)] if tok.eos_id in new else new
    assert model.chat(MESSAGES, max_new_tokens=12) == tok.decode(new)


def test_chat_stream_joins_to_the_reply_and_stops_at_the_end_of_turn():
    model = tiny_model()
    reply = model.chat(MESSAGES, max_new_tokens=20, do_sample=True, seed=3)
    pieces = list(model.chat(MESSAGES, max_new_tokens=20, do_sample=True, seed=3, stream=True))
    assert "".join(pieces) == reply
    assert "<|im_end|>" not in reply


def test_chat_stops_at_the_tokenizer_end_token_when_the_config_has_none():
    model = tiny_model(eos_token_id=None)
    tok = model.tokenizer
    end = tok.eos_id

    def favour_end(module, args, logits):  # the end of turn becomes the likeliest token everywhere
        logits = logits.clone()
        logits[..., end] += 1e4
        return logits

    model.lm_head.register_forward_hook(favour_end)
    assert model.chat(MESSAGES, max_new_tokens=8) == ""


def test_chat_refuses_a_batch_and_a_tokenizer_without_template():
    model = tiny_model()
    with pytest.raises(TypeError, match="one conversation"):
        model.chat([MESSAGES, MESSAGES])
    bare = tiny_model(template=None)
    with pytest.raises(ValueError, match="no chat template"):
        bare.chat(MESSAGES)


def test_generation_config_json_gives_defaults(tmp_path):
    from chat_helpers import tiny_folder

    folder = tiny_folder(tmp_path / "m")
    end = json.loads((folder / "config.json").read_text())["qkv_config"]["eos_token_id"]
    (folder / "generation_config.json").write_text(json.dumps(
        {"eos_token_id": [end, 5], "do_sample": True, "temperature": 0.7, "top_p": 0.9, "max_new_tokens": 7,
         "transformers_version": "5.0"}))
    model = qkv.load(folder)
    d = model.generation_defaults
    assert d["eos_token_id"] == [end, 5] and d["do_sample"] is True and d["max_new_tokens"] == 7
    # explicit options win over the defaults; the defaults over the built-in ones
    out = model.generate(torch.tensor([[3, 4, 5]]), eos_token_id=[], do_sample=False)
    assert out.shape[1] == 3 + 7
    assert model.generate(torch.tensor([[3, 4, 5]]), max_new_tokens=2, do_sample=False,
                          eos_token_id=[]).shape[1] == 5
    (folder / "generation_config.json").write_text(json.dumps({"temperature": -1.0, "do_sample": True}))
    with pytest.raises(ValueError, match="generation_config.json"):
        qkv.load(folder)
