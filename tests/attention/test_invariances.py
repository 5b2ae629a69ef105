"""Properties every backend must keep: padding never leaks, the future never leaks, empty rows stay 0."""

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st
from strategies import tiles

import qkv

BACKENDS = ["eager", "chunked", "sdpa", "auto"]


def _qkv(B, Hq, Hkv, Tq, Tk, D, seed, dtype=torch.float64):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(B, Hq, Tq, D, generator=g, dtype=dtype), torch.randn(B, Hkv, Tk, D, generator=g, dtype=dtype),
            torch.randn(B, Hkv, Tk, D, generator=g, dtype=dtype))


@pytest.mark.parametrize("backend", BACKENDS)
@given(B=st.integers(1, 3), T=st.integers(1, 70), seed=st.integers(0, 10**6), data=st.data())
def test_padding_keys_never_change_valid_rows(backend, B, T, seed, data):
    lengths = data.draw(st.lists(st.integers(1, T), min_size=B, max_size=B))
    q, k, v = _qkv(B, 4, 2, T, T, 8, seed)
    mask = qkv.masks.causal() & qkv.masks.padding(lengths)
    with tiles(data.draw(st.sampled_from([4, 64])), data.draw(st.sampled_from([4, 64]))):
        out = qkv.attention(q, k, v, mask=mask, backend=backend)
        k2, v2 = k.clone(), v.clone()
        for b, n in enumerate(lengths):
            k2[b, :, n:] = torch.randn_like(k2[b, :, n:]) * 100
            v2[b, :, n:] = 1e6
        out2 = qkv.attention(q, k2, v2, mask=mask, backend=backend)
    for b, n in enumerate(lengths):
        torch.testing.assert_close(out[b, :, :n], out2[b, :, :n], atol=1e-12, rtol=0)


@pytest.mark.parametrize("backend", BACKENDS)
@given(T=st.integers(2, 80), cut=st.integers(1, 79), seed=st.integers(0, 10**6), window=st.sampled_from([None, 3, 17]))
def test_causal_outputs_do_not_depend_on_future_keys(backend, T, cut, seed, window):
    cut = min(cut, T - 1)
    q, k, v = _qkv(2, 2, 1, T, T, 8, seed)
    mask = qkv.masks.causal() if window is None else qkv.masks.sliding_window(window)
    with tiles(8, 8):
        out = qkv.attention(q, k, v, mask=mask, backend=backend)
        k2, v2 = k.clone(), v.clone()
        k2[:, :, cut:] += 5.0
        v2[:, :, cut:] -= 3.0
        out2 = qkv.attention(q, k2, v2, mask=mask, backend=backend)
    torch.testing.assert_close(out[:, :, :cut], out2[:, :, :cut], atol=1e-12, rtol=0)
    assert not torch.allclose(out[:, :, cut:], out2[:, :, cut:])


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16])
def test_fully_masked_rows_give_zero_and_zero_gradient(backend, dtype):
    q, k, v = (t.requires_grad_() for t in _qkv(2, 4, 2, 70, 70, 8, 0, dtype))
    blocked = torch.zeros(70, dtype=torch.bool)
    blocked[[0, 5, 6, 40, 69]] = True
    mask = qkv.masks.causal() & (lambda b, h, qp, kp: ~blocked[qp])
    with tiles(16, 16):
        out = qkv.attention(q, k, v, mask=mask, backend=backend)
        (out.float() ** 2).sum().backward()
    assert torch.all(out[:, :, blocked] == 0)
    for t in (q, k, v):
        assert torch.isfinite(t.grad).all()
    assert torch.all(q.grad[:, :, blocked] == 0)
    if backend in ("eager", "chunked", "auto"):
        _, w, lse = qkv.attention(q, k, v, mask=mask, backend=backend, return_weights=True, return_lse=True)
        assert torch.all(w[:, :, blocked] == 0) and torch.all(torch.isneginf(lse[:, :, blocked]))
        assert torch.isfinite(lse[:, :, ~blocked]).all()


@pytest.mark.parametrize("backend", ["eager", "chunked", "sdpa", "auto"])
@pytest.mark.parametrize("tq,tk", [(0, 5), (5, 0), (0, 0)])
def test_empty_sequences(backend, tq, tk):
    q = torch.randn(2, 4, tq, 8, requires_grad=True)
    k = torch.randn(2, 2, tk, 8, requires_grad=True)
    v = torch.randn(2, 2, tk, 6, requires_grad=True)
    out = qkv.attention(q, k, v, mask=qkv.masks.causal(), backend=backend)
    assert out.shape == (2, 4, tq, 6) and torch.all(out == 0)
    out.sum().backward()
    assert torch.all(q.grad == 0) and torch.all(k.grad == 0)
    if backend != "sdpa":
        out, w, lse = qkv.attention(q, k, v, backend=backend, return_weights=True, return_lse=True)
        assert w.shape == (2, 4, tq, tk) and lse.shape == (2, 4, tq) and torch.isneginf(lse).all()
    assert qkv.attention_weights(q, k).shape == (2, 4, tq, tk)


def test_decode_step_equals_last_row_of_full_pass():
    """Bottom-right alignment: one query against a cache is the last row of the full causal pass."""
    q, k, v = _qkv(1, 4, 4, 33, 33, 16, 1)
    full = qkv.attention(q, k, v, mask=qkv.masks.causal(), backend="eager")
    for backend in BACKENDS:
        step = qkv.attention(q[:, :, -1:], k, v, mask=qkv.masks.causal(), backend=backend)
        torch.testing.assert_close(step, full[:, :, -1:], atol=1e-12, rtol=0)
    block = qkv.attention(q[:, :, -5:], k, v, mask=qkv.masks.causal(), backend="chunked")
    torch.testing.assert_close(block, full[:, :, -5:], atol=1e-12, rtol=0)


def test_gqa_equals_repeated_heads():
    q, k, v = _qkv(2, 6, 2, 20, 24, 8, 3)
    rep = qkv.attention(q, k.repeat_interleave(3, 1), v.repeat_interleave(3, 1), mask=qkv.masks.causal())
    for backend in BACKENDS:
        torch.testing.assert_close(qkv.attention(q, k, v, mask=qkv.masks.causal(), backend=backend), rep)


def test_auto_drops_a_mask_that_hides_nothing():
    q, k, v = _qkv(1, 2, 2, 1, 50, 8, 0)
    call = qkv.functional.prepare(q, k, v, mask=qkv.masks.causal() & qkv.masks.sliding_window(100))
    name, call2 = qkv.backends.choose(call)
    assert name == "sdpa" and call2.mask is None


def _layouts(x):
    """The same values in memory layouts models produce: contiguous, (B, T, H, D) transposed, feature-strided."""
    B, H, T, D = x.shape
    yield "contiguous", x.contiguous()
    yield "bthd", x.transpose(1, 2).contiguous().transpose(1, 2)
    wide = torch.zeros(B, H, T, 2 * D, dtype=x.dtype)
    wide[..., ::2] = x
    yield "feature-stride-2", wide[..., ::2]
    fused = torch.zeros(B, T, 3, H, D, dtype=x.dtype)
    fused[:, :, 1] = x.transpose(1, 2)
    yield "fused-qkv-slice", fused[:, :, 1].transpose(1, 2)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("mask", [None, qkv.masks.causal(), qkv.masks.sliding_window(40)], ids=["none", "causal", "window"])
def test_memory_layout_does_not_change_results(backend, mask):
    q, k, v = _qkv(2, 4, 4, 300, 300, 16, 7, dtype=torch.float32)
    ref = qkv.attention(q, k, v, mask=mask, backend="eager")
    for (name, ql), (_, kl), (_, vl) in zip(_layouts(q), _layouts(k), _layouts(v)):
        ql, kl, vl = (t.detach().requires_grad_() for t in (ql, kl, vl))  # keeps the strides
        out = qkv.attention(ql, kl, vl, mask=mask, backend=backend)
        torch.testing.assert_close(out, ref, atol=2e-5, rtol=2e-5, msg=lambda m: f"{name}: {m}")
        out.sum().backward()
        assert torch.isfinite(kl.grad).all()
