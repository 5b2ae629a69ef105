"""`explain_texts`: many texts explained in packed passes equal `explain_text` of each one alone."""

from __future__ import annotations

import pytest
import torch
from chat_helpers import tiny_tokenizer

from qkv.explain import explain_text, explain_texts
from qkv.models import TextEncoder, TextEncoderConfig

TEXTS = ["the sky is blue", "a", "the cat reads the paper under the green light every morning",
         "the sky is blue", "music"]


@pytest.fixture(scope="module")
def encoder():
    tok = tiny_tokenizer(None)
    torch.manual_seed(3)
    cfg = TextEncoderConfig(vocab_size=tok.vocab_size, dim=32, n_layers=3, n_heads=4, ffn_dim=48, max_positions=64,
                            max_length=24, pad_token_id=tok.pad_id, dropout=0.0, attn_dropout=0.0)
    model = TextEncoder(cfg).init_weights().eval()
    model.tokenizer = tok
    return model


def _same(a, b):
    assert a.tokens == b.tokens and a.texts == b.texts and len(a.maps) == len(b.maps)
    for x, y in zip(a.maps, b.maps):
        assert (x.layer, x.heads, x.tq, x.tk) == (y.layer, y.heads, y.tq, y.tk)
        for field in ("dense", "mean", "top_values"):
            u, v = getattr(x, field), getattr(y, field)
            assert (u is None) == (v is None), field
            if u is not None:
                torch.testing.assert_close(u, v, atol=1e-6, rtol=1e-5)
        if x.top_index is not None:
            assert torch.equal(x.top_index, y.top_index)
    if a.rollout is not None or b.rollout is not None:
        torch.testing.assert_close(a.rollout, b.rollout, atol=1e-6, rtol=1e-5)


@pytest.mark.parametrize("spec", [{}, {"layers": [-1], "heads": [1, 3]}, {"full": False, "topk": 3},
                                  {"full": False, "topk": 40, "layers": [0]}])
def test_packed_explanations_equal_each_text_alone(encoder, spec):
    got = explain_texts(encoder, TEXTS, embed=True, **spec)
    assert len(got) == len(TEXTS)
    vectors = encoder.embed(TEXTS)
    for i, (ex, text) in enumerate(zip(got, TEXTS)):
        _same(ex, explain_text(encoder, text, **spec))
        torch.testing.assert_close(ex.embedding, vectors[i], atol=1e-5, rtol=1e-5)
        assert ex.to_dict()["layers"]  # serializable as qkv explain --json


def test_texts_past_max_length_and_single_texts_take_explain_texts_own_path(encoder):
    long = " ".join(["the quiet river finds the old city"] * 6)  # truncated to max_length, as explain_text does
    got = explain_texts(encoder, ["a small cat", long])
    _same(got[1], explain_text(encoder, long))
    assert got[1].length == encoder.config.max_length
    _same(explain_texts(encoder, ["one text"])[0], explain_text(encoder, "one text"))
    assert explain_texts(encoder, []) == []
