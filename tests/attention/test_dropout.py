"""Dropout: the right fraction of probabilities is dropped, survivors are rescaled, backward sees the same draw."""

import math

import pytest
import torch

import qkv


def _identity_values(T, B=2, H=4, seed=0):
    """With v = I the output rows are the (dropped, rescaled) probability rows themselves."""
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(B, H, T, 16, generator=g, dtype=torch.float64)
    k = torch.randn(B, H, T, 16, generator=g, dtype=torch.float64)
    v = torch.eye(T, dtype=torch.float64).expand(B, H, T, T).contiguous()
    return q, k, v


@pytest.mark.parametrize("backend", ["eager", "chunked", "sdpa"])
@pytest.mark.parametrize("p", [0.1, 0.5])
def test_dropout_statistics(backend, p):
    q, k, v = _identity_values(48)
    mask = qkv.masks.causal() & qkv.masks.sliding_window(20)
    probs = qkv.attention_weights(q, k, mask=mask)
    torch.manual_seed(1)
    out = qkv.attention(q, k, v, mask=mask, dropout_p=p, backend=backend)
    visible = probs > 0
    kept = (out != 0) & visible
    n = int(visible.sum())
    frac = 1 - kept.sum().item() / n
    assert abs(frac - p) < 5 * math.sqrt(p * (1 - p) / n), (frac, p, n)  # 5 sigma
    torch.testing.assert_close(out[kept], probs[kept] / (1 - p))
    assert torch.all(out[~visible] == 0)


@pytest.mark.parametrize("backend", ["eager", "chunked"])
def test_dropout_mean_equals_no_dropout(backend):
    q, k, v = _identity_values(24, B=1, H=2)
    v = torch.randn_like(v)
    torch.manual_seed(0)
    mean = sum(qkv.attention(q, k, v, mask=qkv.masks.causal(), dropout_p=0.3, backend=backend) for _ in range(400)) / 400
    exact = qkv.attention(q, k, v, mask=qkv.masks.causal())
    assert (mean - exact).abs().max() < 0.15


@pytest.mark.parametrize("backend", ["eager", "chunked"])
def test_dropout_backward_uses_the_forward_draw(backend):
    """out = P' @ v with v = I, so dL/dv = P'^T @ dout = out^T @ dout exactly when backward reuses the mask."""
    from strategies import tiles

    q, k, v = _identity_values(40)
    v.requires_grad_()
    with tiles(8, 8):
        out = qkv.attention(q, k, v, mask=qkv.masks.causal(), dropout_p=0.4, backend=backend)
        g = torch.randn_like(out)
        out.backward(g)
    torch.testing.assert_close(v.grad, out.detach().transpose(-1, -2) @ g)


def test_weights_are_before_dropout():
    q, k, v = _identity_values(16)
    _, w = qkv.attention(q, k, v, dropout_p=0.5, return_weights=True)
    torch.testing.assert_close(w.sum(-1), torch.ones_like(w.sum(-1)))
