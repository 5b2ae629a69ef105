"""FlexAttention backend: parity with the reference where torch supports it (compiles; a few cases only)."""

import pytest
import torch
from hypothesis import given, settings
from reference import reference
from strategies import cases

import qkv

FLEX = qkv.backends.available()["flex"]
pytestmark = pytest.mark.skipif(not FLEX.available, reason=f"FlexAttention unavailable: {FLEX.reason}")


@pytest.mark.parametrize(
    "mask,score_mod,tq,tk,hq,hkv",
    [
        (qkv.masks.causal() & qkv.masks.sliding_window(9), None, 40, 40, 4, 2),
        (qkv.masks.causal(), qkv.scores.alibi(torch.tensor([0.5, 0.25])), 17, 45, 2, 2),
    ],
)
def test_flex_forward_matches_reference(mask, score_mod, tq, tk, hq, hkv):
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(2, h, t, 16, generator=g) for h, t in ((hq, tq), (hkv, tk), (hkv, tk)))
    with torch.no_grad():
        out = qkv.attention(q, k, v, mask=mask, score_mod=score_mod, backend="flex")
    dense = mask.materialize(tq, tk, batch=2, heads=hq)
    ref, _, _ = reference(q, k, v, mask=dense, score_mod=score_mod)
    torch.testing.assert_close(out.double(), ref, atol=2e-5, rtol=2e-5)


@settings(max_examples=6)
@given(case=cases(max_t=48, dtype=torch.float32))
def test_flex_random_calls_match_reference(case):
    """Random masks (every kind), score mods, biases and GQA; forward only (FlexAttention has no CPU backward)."""
    ref, _, _ = reference(case.q, case.k, case.v, mask=case.dense_mask(), bias=case.bias, score_mod=case.score_mod,
                          scale=case.scale, q_offset=case.q_offset)
    with torch.no_grad():
        out = qkv.attention(case.q, case.k, case.v, backend="flex", **case.call_kwargs())
    torch.testing.assert_close(out.double(), ref, atol=5e-5, rtol=5e-5)
