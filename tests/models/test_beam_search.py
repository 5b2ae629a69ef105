"""Beam search: the tokens equal transformers' generate(num_beams=..., do_sample=False) on the same weights,
with padded batches, stop tokens inside the beams, every early_stopping mode and several returned beams."""

import pytest
import torch
from hf_models import kind, pair, vocab

N_NEW = 9


def _batch(name, B=3, T=8, seed=1):
    """Random prompts of lengths T, T-2, T-4: left-padded for decoders, right-padded for encoders."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(3, vocab(name), (B, T), generator=g)
    mask = torch.ones_like(ids)
    for b in range(1, B):
        pad = slice(0, 2 * b) if kind(name) == "causal" else slice(T - 2 * b, T)
        ids[b, pad], mask[b, pad] = 0, 0
    return ids, mask


def _inner_stops(model, ids, mask, start):
    """Two tokens the free beams emit early (so that they end some hypotheses mid-search)."""
    free = model.generate(ids, mask, max_new_tokens=N_NEW, num_beams=3, num_return_sequences=3, eos_token_id=[],
                          pad_token_id=0)
    new = free[:, start:]
    return sorted({int(new[0, 2]), int(new[4, 3])})


SETTINGS = [{"num_beams": 3}, {"num_beams": 4, "num_return_sequences": 2, "length_penalty": 0.5},
            {"num_beams": 3, "early_stopping": True}, {"num_beams": 2, "early_stopping": "never", "length_penalty": 2.0},
            {"num_beams": 3, "length_penalty": -1.0, "num_return_sequences": 3}]


@pytest.mark.parametrize("name", ["gpt2", "llama", "t5", "bart"])
def test_beam_tokens_equal_transformers(name):
    hf, model = pair(name)
    ids, mask = _batch(name)
    start = ids.shape[1] if kind(name) == "causal" else 1
    stops = _inner_stops(model, ids, mask, start)
    ended_early = False
    for kw in SETTINGS:
        for eos in ([], stops):
            with torch.no_grad():
                ref = hf.generate(input_ids=ids, attention_mask=mask, max_new_tokens=N_NEW, do_sample=False,
                                  pad_token_id=0, eos_token_id=eos or None, **kw)
            got = model.generate(ids, mask, max_new_tokens=N_NEW, pad_token_id=0, eos_token_id=eos, **kw)
            assert got.shape == ref.shape and torch.equal(got, ref), (kw, eos, got.tolist(), ref.tolist())
            if eos:
                ended_early |= bool(torch.isin(got[:, start:-1], torch.tensor(eos)).any())
    assert ended_early, "the chosen stop tokens never ended a hypothesis: the test lost its point"


@pytest.mark.parametrize("name", ["gpt2", "t5"])
def test_beam_with_repetition_penalty_equals_transformers(name):
    hf, model = pair(name)
    ids = torch.randint(3, vocab(name), (2, 6), generator=torch.Generator().manual_seed(7))
    with torch.no_grad():
        ref = hf.generate(input_ids=ids, max_new_tokens=N_NEW, do_sample=False, num_beams=3,
                          repetition_penalty=1.7, pad_token_id=0)
    got = model.generate(ids, max_new_tokens=N_NEW, num_beams=3, repetition_penalty=1.7, pad_token_id=0)
    assert torch.equal(got, ref), (got.tolist(), ref.tolist())


def test_beam_search_on_a_token_conv_model_is_padding_invariant():
    """The cache's extra per-row state (the token convolution) follows the beams."""
    from qkv.models import CausalLM, CausalLMConfig

    torch.manual_seed(0)
    model = CausalLM(CausalLMConfig(vocab_size=60, dim=32, n_layers=2, n_heads=2, ffn_dim=64, max_positions=64,
                                    token_conv=3)).init_weights().eval()
    g = torch.Generator().manual_seed(2)
    prompts = [torch.randint(3, 60, (n,), generator=g) for n in (4, 7)]
    ids, mask = torch.zeros(2, 7, dtype=torch.long), torch.zeros(2, 7, dtype=torch.long)
    for i, p in enumerate(prompts):
        ids[i, 7 - len(p):], mask[i, 7 - len(p):] = p, 1
    batch = model.generate(ids, mask, max_new_tokens=8, num_beams=3, eos_token_id=[])
    for i, p in enumerate(prompts):
        alone = model.generate(p[None], max_new_tokens=8, num_beams=3, eos_token_id=[])
        assert torch.equal(batch[i, 7:], alone[0, len(p):])


def test_beam_options_are_checked():
    _, model = pair("gpt2")
    ids = torch.randint(3, 120, (1, 4), generator=torch.Generator().manual_seed(0))
    with pytest.raises(ValueError, match="num_return_sequences=3 must be <= num_beams=2"):
        model.generate(ids, num_beams=2, num_return_sequences=3)
    with pytest.raises(ValueError, match="early_stopping"):
        model.generate(ids, num_beams=2, early_stopping="sometimes")
    with pytest.raises(ValueError, match="num_beams"):
        model.generate(ids, num_beams=0)
    with pytest.raises(ValueError, match="length_penalty"):
        model.generate(ids, num_beams=2, length_penalty=float("nan"))
    with pytest.raises(ValueError, match="num_return_sequences"):
        model.generate(ids, num_return_sequences=2)  # greedy returns one sequence
    with pytest.raises(ValueError, match="stream"):
        next(model.stream(ids, num_beams=2))
