"""Every backend agrees with an independent float64 reference: outputs, weights, lse and gradients."""

from dataclasses import replace

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from reference import reference
from strategies import cases, tiles

import qkv

BACKENDS = ["eager", "chunked", "native", "sdpa", "auto"]


def _serves(backend, case, **extra):
    """Whether `backend` accepts the call (capability errors are the errors test's business)."""
    try:
        call = qkv.functional.prepare(case.q, case.k, case.v, **case.call_kwargs())
        call = call.replace(**extra)
        return backend == "auto" or not qkv.backends.get(backend).missing(call)
    except ValueError:
        return False


def _with_grad(case, dtype):
    leaves = [t.detach().to(dtype).requires_grad_() for t in (case.q, case.k, case.v)]
    bias = None if case.bias is None else case.bias.detach().to(dtype).requires_grad_()
    return leaves, bias


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@given(case=cases())
def test_output_and_gradients_match_reference(backend, dtype, case):
    if not _serves(backend, case):
        return
    ref_leaves, ref_bias = _with_grad(case, torch.float64)
    ref_out, _, _ = reference(*ref_leaves, mask=case.dense_mask(), bias=ref_bias, score_mod=case.score_mod,
                              scale=case.scale, q_offset=case.q_offset)
    g = torch.randn_like(ref_out)
    ref_out.backward(g)

    (q, k, v), bias = _with_grad(case, dtype)
    kw = case.call_kwargs() | {"bias": bias}
    with tiles(*case.tiles):
        out = qkv.attention(q, k, v, backend=backend, **kw)
        out.backward(g.to(dtype))
    tol = 1e-9 if dtype == torch.float64 else 2e-4
    torch.testing.assert_close(out.double(), ref_out, atol=tol, rtol=tol)
    for got, want in zip((q, k, v, bias), (*ref_leaves, ref_bias)):
        if want is not None:
            assert not got.grad.isnan().any()
            torch.testing.assert_close(got.grad.double(), want.grad, atol=tol * 5, rtol=tol * 5)


@pytest.mark.parametrize("backend", ["eager", "chunked", "auto"])
@given(case=cases())
def test_weights_and_lse_match_reference(backend, case):
    _, ref_w, ref_lse = reference(case.q, case.k, case.v, mask=case.dense_mask(), bias=case.bias,
                                  score_mod=case.score_mod, scale=case.scale, q_offset=case.q_offset)
    with tiles(*case.tiles):
        out, w, lse = qkv.attention(case.q, case.k, case.v, backend=backend, return_weights=True,
                                    return_lse=True, **case.call_kwargs())
    torch.testing.assert_close(w, ref_w, atol=1e-10, rtol=1e-10)
    assert torch.equal(torch.isneginf(lse), torch.isneginf(ref_lse))
    finite = torch.isfinite(ref_lse)
    torch.testing.assert_close(lse[finite], ref_lse[finite], atol=1e-10, rtol=1e-10)
    visible_rows = w.sum(-1)
    assert torch.all(((visible_rows - 1).abs() < 1e-9) | (visible_rows == 0))


@given(case=cases(dtype=torch.float32), dtype=st.sampled_from([torch.bfloat16, torch.float16]),
       backend=st.sampled_from(BACKENDS))
@settings(max_examples=30)
def test_half_precision_matches_reference(case, dtype, backend):
    """Low precision accumulates in float32: error stays at the level of the input rounding."""
    q, k, v = (t.to(dtype) for t in (case.q, case.k, case.v))
    bias = None if case.bias is None else case.bias.to(dtype)
    if not _serves(backend, replace(case, q=q, k=k, v=v, bias=bias)):  # in the half dtype (native has none)
        return
    ref_out, _, _ = reference(q, k, v, mask=case.dense_mask(), bias=bias, score_mod=case.score_mod,
                              scale=case.scale, q_offset=case.q_offset)
    with tiles(*case.tiles):
        out = qkv.attention(q, k, v, backend=backend, **(case.call_kwargs() | {"bias": bias}))
    assert out.dtype == dtype
    torch.testing.assert_close(out.double(), ref_out, atol=3e-2, rtol=3e-2)


@pytest.mark.parametrize("backend", ["eager", "chunked"])
@given(case=cases(extras=False))
def test_lse_gradient(backend, case):
    """The log-sum-exp is differentiable too (used to merge partial attention results)."""
    ref_leaves, _ = _with_grad(case, torch.float64)
    _, _, ref_lse = reference(*ref_leaves, mask=case.dense_mask(), scale=case.scale, q_offset=case.q_offset)
    g = torch.randn_like(ref_lse)
    ref_lse.masked_fill(torch.isneginf(ref_lse), 0).mul(g).sum().backward()
    (q, k, v), _ = _with_grad(case, torch.float64)
    with tiles(*case.tiles):
        out, lse = qkv.attention(q, k, v, backend=backend, return_lse=True, **case.call_kwargs())
        (lse.masked_fill(torch.isneginf(lse), 0) * g).sum().backward()
    torch.testing.assert_close(q.grad, ref_leaves[0].grad, atol=1e-9, rtol=1e-9)
    torch.testing.assert_close(k.grad, ref_leaves[1].grad, atol=1e-9, rtol=1e-9)


@given(case=cases(max_t=24))
def test_attention_weights_rows_and_topk(case):
    _, ref_w, _ = reference(case.q, case.k, case.v, mask=case.dense_mask(), bias=case.bias,
                            score_mod=case.score_mod, scale=case.scale, q_offset=case.q_offset)
    kw = case.call_kwargs()
    Tq, Tk = case.q.shape[2], case.k.shape[2]
    with tiles(*case.tiles):
        full = qkv.attention_weights(case.q, case.k, **kw)
        rows = torch.randperm(Tq)[: max(1, Tq // 2)]
        some = qkv.attention_weights(case.q, case.k, rows=rows, **kw)
        n = min(3, Tk)
        vals, idx = qkv.attention_weights(case.q, case.k, topk=n, **kw)
    torch.testing.assert_close(full, ref_w, atol=1e-10, rtol=1e-10)
    torch.testing.assert_close(some, ref_w[:, :, rows], atol=1e-10, rtol=1e-10)
    torch.testing.assert_close(vals, ref_w.topk(n, -1).values, atol=1e-10, rtol=1e-10)
    picked = ref_w.gather(-1, idx.clamp(min=0))
    torch.testing.assert_close(torch.where(idx >= 0, picked, 0.0), vals, atol=1e-10, rtol=1e-10)
