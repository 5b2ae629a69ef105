"""FlexAttention backend: parity with the reference where torch supports it (compiles; a few cases only)."""

import pytest
import torch
from reference import reference

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
