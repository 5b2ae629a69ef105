"""Generation features: logits processors equal to transformers', OpenAI's penalties, seeded sampling,
generation_config.json defaults, stop strings, and streaming text that never splits a character."""

import functools
import logging

import pytest
import torch
from hf_models import pair, save_family, vocab

import qkv
from qkv.models.generation import (
    GenerationConfig,
    generation_defaults,
    next_token,
    process_logits,
    warp,
)
from qkv.models.streaming import TextStream
from qkv.pretrained import Tokenizer

MULTI = ["café naïve déjà vu", "日本語のテキスト", "emoji 🙂🚀 and ß", "the river bank was muddy after the rain",
         "Ελληνικά και русский текст"] * 8


@functools.cache
def _tokenizer() -> Tokenizer:
    """Byte-level BPE over all 256 bytes, trained on multi-byte text: many tokens end inside a character."""
    from tokenizers import Tokenizer as Tok
    from tokenizers import decoders, models, pre_tokenizers, trainers

    tok = Tok(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.train_from_iterator(MULTI, trainers.BpeTrainer(vocab_size=330, special_tokens=["<pad>", "<unk>", "<eos>"],
                                                       initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    return Tokenizer(tok, pad_token="<pad>", eos_token="<eos>")


@functools.cache
def _model(family: str, tmp_root: str):
    """A random tiny GPT-2 or BART with the multi-byte tokenizer attached."""
    from pathlib import Path

    folder = Path(tmp_root) / family
    tok = _tokenizer()
    extra = {"vocab_size": tok.vocab_size, "pad_token_id": 0, "eos_token_id": 2}
    if family == "bart":
        extra.update(bos_token_id=1, decoder_start_token_id=2)
    save_family(folder, family, seed=3, **extra)
    model = qkv.load(folder)
    model.tokenizer = tok
    return model


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    root = str(tmp_path_factory.mktemp("gen-features"))
    return lambda family: _model(family, root)


# ---- logits processors ----------------------------------------------------------------------------

def _random_case(seed, B=4, V=50, L=9):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(B, V, generator=g) * 3, torch.randint(0, V, (B, L), generator=g)


@pytest.mark.parametrize("seed", range(4))
def test_processed_scores_equal_transformers(seed):
    from transformers.generation import logits_process as lp

    logits, history = _random_case(seed)
    for penalty in (0.6, 1.3, 2.0):
        ref = lp.RepetitionPenaltyLogitsProcessor(penalty)(history, logits.clone())
        got = process_logits(logits, GenerationConfig(repetition_penalty=penalty), history)
        torch.testing.assert_close(got, ref, atol=0, rtol=0)
    for kw in ({"temperature": 0.7, "top_k": 8}, {"top_p": 0.8}, {"min_p": 0.2}, {"temperature": 1.5, "top_k": 20,
               "top_p": 0.9, "min_p": 0.05}, {"top_k": 1, "min_p": 0.9}):
        for keep in (1, 3):
            procs = lp.LogitsProcessorList()
            if "temperature" in kw:
                procs.append(lp.TemperatureLogitsWarper(kw["temperature"]))
            if "top_k" in kw:
                procs.append(lp.TopKLogitsWarper(kw["top_k"], min_tokens_to_keep=keep))
            if "top_p" in kw:
                procs.append(lp.TopPLogitsWarper(kw["top_p"], min_tokens_to_keep=keep))
            if "min_p" in kw:
                procs.append(lp.MinPLogitsWarper(kw["min_p"], min_tokens_to_keep=keep))
            ref = procs(history, logits.clone())
            got = warp(logits, GenerationConfig(do_sample=True, **kw), min_tokens_to_keep=keep)
            assert torch.equal(torch.isinf(got), torch.isinf(ref)), kw
            torch.testing.assert_close(got[~torch.isinf(got)], ref[~torch.isinf(ref)], atol=0, rtol=0)


def test_sampled_tokens_follow_transformers_distribution_with_the_same_generator():
    from transformers.generation import logits_process as lp

    logits, history = _random_case(11)
    procs = lp.LogitsProcessorList([lp.RepetitionPenaltyLogitsProcessor(1.4), lp.TemperatureLogitsWarper(0.8),
                                    lp.TopKLogitsWarper(10), lp.TopPLogitsWarper(0.9), lp.MinPLogitsWarper(0.05)])
    probs = procs(history, logits.clone()).softmax(-1)
    ref = torch.multinomial(probs, 1, generator=torch.Generator().manual_seed(5)).squeeze(-1)
    cfg = GenerationConfig(do_sample=True, repetition_penalty=1.4, temperature=0.8, top_k=10, top_p=0.9, min_p=0.05)
    got = next_token(logits, cfg, torch.Generator().manual_seed(5), history=history)
    assert torch.equal(got, ref)


def test_presence_and_frequency_penalties_follow_openai():
    """logit[j] -= count[j] * frequency + (count[j] > 0) * presence, counting generated tokens only."""
    logits, history = _random_case(3)
    P = 4
    history[1, :3] = -1  # left padding is marked negative and never counted
    cfg = GenerationConfig(presence_penalty=0.7, frequency_penalty=-0.4)
    got = process_logits(logits, cfg, history, prompt_len=P)
    counts = torch.zeros_like(logits)
    for b in range(history.shape[0]):
        for t in history[b, P:].tolist():
            counts[b, t] += 1
    ref = logits - counts * -0.4 - (counts > 0).float() * 0.7
    torch.testing.assert_close(got, ref)
    # greedy next_token takes the same processed scores; history=None with a penalty is an error
    assert torch.equal(next_token(logits, cfg, None, history=history, prompt_len=P), ref.argmax(-1))
    with pytest.raises(ValueError, match="history"):
        next_token(logits, cfg, None)


@pytest.mark.parametrize("name", ["gpt2", "t5"])
def test_greedy_with_repetition_penalty_equals_transformers(name):
    hf, model = pair(name)
    ids = torch.randint(3, vocab(name), (2, 6), generator=torch.Generator().manual_seed(4))
    with torch.no_grad():
        ref = hf.generate(input_ids=ids, max_new_tokens=12, do_sample=False, repetition_penalty=1.8, pad_token_id=0,
                          eos_token_id=None)
    got = model.generate(ids, max_new_tokens=12, repetition_penalty=1.8, pad_token_id=0, eos_token_id=[])
    assert torch.equal(got, ref), (got.tolist(), ref.tolist())
    plain = model.generate(ids, max_new_tokens=12, pad_token_id=0, eos_token_id=[])
    assert not torch.equal(plain, got)  # the penalty is live


def test_sampling_options_are_reproducible_and_min_p_one_is_greedy():
    _, model = pair("llama")
    ids = torch.randint(3, 120, (2, 5), generator=torch.Generator().manual_seed(6))
    kw = {"max_new_tokens": 10, "do_sample": True, "temperature": 1.3, "min_p": 0.02, "presence_penalty": 0.5,
              "frequency_penalty": 0.3, "repetition_penalty": 1.1, "eos_token_id": []}
    a, b = model.generate(ids, seed=1, **kw), model.generate(ids, seed=1, **kw)
    c = model.generate(ids, seed=2, **kw)
    assert torch.equal(a, b) and not torch.equal(a, c)
    greedy = model.generate(ids, max_new_tokens=10, eos_token_id=[])
    assert torch.equal(model.generate(ids, max_new_tokens=10, do_sample=True, min_p=1.0, seed=3, eos_token_id=[]),
                       greedy)
    many = model.generate(ids, max_new_tokens=4, do_sample=True, num_return_sequences=3, seed=4, eos_token_id=[])
    assert many.shape == (6, 9) and torch.equal(many[::3, :5], ids)


@pytest.mark.parametrize("field,value", [("min_p", 1.5), ("repetition_penalty", 0.0), ("presence_penalty", 3.0),
                                         ("frequency_penalty", float("nan")), ("num_beams", 0),
                                         ("length_penalty", float("inf")), ("early_stopping", "soon"),
                                         ("num_return_sequences", 0), ("stop", ["ok", ""]), ("do_sample", "yes"),
                                         ("eos_token_id", [-1])])
def test_new_fields_are_validated_with_their_name(field, value):
    with pytest.raises(ValueError, match=field) as err:
        GenerationConfig(**{field: value})
    assert repr(value) in str(err.value) or field == "stop"


# ---- generation_config.json ------------------------------------------------------------------------

def test_generation_defaults_from_a_generation_config(caplog):
    llama3 = {"bos_token_id": 128000, "eos_token_id": [128001, 128008, 128009], "do_sample": True,
              "temperature": 0.6, "top_p": 0.9, "top_k": 0, "transformers_version": "4.45.0", "max_length": 20}
    assert generation_defaults(llama3) == {"eos_token_id": [128001, 128008, 128009], "do_sample": True,
                                           "temperature": 0.6, "top_p": 0.9}
    assert generation_defaults({"temperature": 0.0, "repetition_penalty": 1.2, "pad_token_id": 0,
                                "max_new_tokens": 64}) == {"do_sample": False, "repetition_penalty": 1.2,
                                                          "pad_token_id": 0, "max_new_tokens": 64}
    with caplog.at_level(logging.WARNING):
        out = generation_defaults({"no_repeat_ngram_size": 3, "num_beams": 4, "typical_p": 1.0})
    assert out == {"num_beams": 4} and "no_repeat_ngram_size=3" in caplog.text and "typical_p" not in caplog.text
    with pytest.raises(ValueError, match="no_repeat_ngram_size"):
        generation_defaults({"no_repeat_ngram_size": 3}, strict=True)
    with pytest.raises(ValueError, match="generation_config.json: top_p"):
        generation_defaults({"top_p": 2.0})


def test_generate_merges_model_generation_defaults():
    _, model = pair("gpt2")
    ids = torch.randint(3, 120, (1, 5), generator=torch.Generator().manual_seed(8))
    free = model.generate(ids, max_new_tokens=6, eos_token_id=[])
    stop = int(free[0, 7])
    try:
        model.generation_defaults = {"eos_token_id": [stop], "max_new_tokens": 6, "pad_token_id": 0}
        got = model.generate(ids)
        first = free[0, 5:].tolist().index(stop)  # decoding ends at the first stop token
        assert torch.equal(got, free[:, : 5 + first + 1])
        assert torch.equal(model.generate(ids, eos_token_id=[], max_new_tokens=6), free)  # explicit wins
    finally:
        del model.generation_defaults


# ---- text streams ----------------------------------------------------------------------------------

def test_text_stream_never_splits_a_character():
    tok = _tokenizer()
    for text in MULTI[:5]:
        ids = tok.encode(text)
        split = sum(1 for t in tok.token_texts(ids) if "\udc80" <= t[-1:] <= "\udcff")
        stream = TextStream(tok)
        pieces = [stream.push(i) for i in ids] + [stream.flush()]
        assert "".join(pieces) == text and not any("\ufffd" in p for p in pieces)
        if text.isascii():
            assert split == 0
    assert any(any("\udc80" <= t[-1:] <= "\udcff" for t in tok.token_texts(tok.encode(s))) for s in MULTI[:5]), \
        "no token ends inside a character: the tokenizer does not exercise the hold-back"


@pytest.mark.parametrize("seed", range(6))
def test_text_stream_concatenation_equals_decode_on_random_ids(seed):
    tok = _tokenizer()
    ids = torch.randint(3, tok.vocab_size, (40,), generator=torch.Generator().manual_seed(seed)).tolist()
    stream = TextStream(tok)
    pieces = [stream.push(i) for i in ids] + [stream.flush()]
    assert "".join(pieces) == tok.decode(ids)


def test_text_stream_stop_strings_and_tokens():
    tok = _tokenizer()
    text = "the river bank was muddy after the rain"
    ids = tok.encode(text)
    for stop, expect in ((["muddy"], "the river bank was "), ("r b", "the rive"), (["zzz", "ain"],
                         "the river bank was muddy after the r"), (["after", "bank w"], "the river "), ("nope", text)):
        stream = TextStream(tok, stop=stop)
        pieces = []
        for i in ids:
            pieces.append(stream.push(i))
            shown = "".join(pieces)
            stops = [stop] if isinstance(stop, str) else stop
            for s in stops:  # no piece ever shows the start of a stop string that then completes
                if s in text and not stream.stopped:
                    assert s not in shown
        pieces.append(stream.flush())
        assert "".join(pieces) == expect == stream.text, stop
    stream = TextStream(tok, stop_token_ids=[2])
    out = "".join(stream.push(i) for i in tok.encode("déjà vu") + [2] + tok.encode(" more")) + stream.flush()
    assert out == "déjà vu" and stream.stopped


@pytest.mark.parametrize("family", ["gpt2", "bart"])
def test_model_stream_equals_generate(models, family):
    model = models(family)
    for kw in ({}, {"do_sample": True, "seed": 3, "temperature": 1.5}, {"stop": ["e", "a"]},
               {"repetition_penalty": 1.3, "stop": "the"}):
        for prompt in ("the river", "日本"):
            full = model.generate(prompt, max_new_tokens=20, eos_token_id=[], **kw)
            pieces = list(model.stream(prompt, max_new_tokens=20, eos_token_id=[], **kw))
            assert "".join(pieces) == full, (kw, prompt)
            assert not any("\ufffd" in p for p in pieces[:-1]) or "\ufffd" in full
            for s in kw.get("stop", []) if isinstance(kw.get("stop"), list) else [kw.get("stop")] * ("stop" in kw):
                assert s not in full
    ids = torch.tensor([model.tokenizer.encode("the rain")])
    assert "".join(model.stream(ids, max_new_tokens=8)) == model.generate("the rain", max_new_tokens=8)
    with pytest.raises(TypeError, match="takes one"):
        list(model.stream(["a", "b"]))


def test_stop_strings_end_generation(models):
    model = models("gpt2")
    free = model.generate("the river", max_new_tokens=30, eos_token_id=[])
    stop = free[3:5]  # a stop string that the free text holds
    cut = model.generate("the river", max_new_tokens=30, eos_token_id=[], stop=stop)
    assert cut == free[: free.index(stop)]
    ids = torch.tensor([model.tokenizer.encode("the river")])
    free_ids = model.generate(ids, max_new_tokens=30, eos_token_id=[], pad_token_id=0)
    stopped = model.generate(ids, max_new_tokens=30, eos_token_id=[], pad_token_id=0, stop=stop)
    new = stopped[0, ids.shape[1]:].tolist()
    n = next(i for i in range(1, len(new) + 1) if stop in model.tokenizer.decode(new[:i]))
    assert new[:n] == free_ids[0, ids.shape[1]: ids.shape[1] + n].tolist() and all(t == 0 for t in new[n:])
    beams = model.generate("the river", max_new_tokens=12, num_beams=3, num_return_sequences=2, stop=" ")
    assert len(beams) == 2 and all(" " not in b for b in beams)
