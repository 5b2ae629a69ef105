"""The native backend and its interval kernel (qkv/backends/native/kernel.cpp) against the float64 reference."""

import os
import shutil
import subprocess
import sys

import pytest
import torch
from hypothesis import assume, given, settings
from hypothesis import strategies as st
from reference import reference

import qkv
from qkv.backends import native as _native

needs_kernel = pytest.mark.skipif(
    not _native.available(), reason=f"native kernel not built: {_native.status()}")


def test_builds_wherever_a_compiler_exists():
    """Not skipped: where a compiler exists, a failed build is a failure, not a silent fallback."""
    if not (shutil.which("c++") or shutil.which("g++")):
        pytest.skip("no C++ compiler: install g++ to build and test the native kernel")
    if os.environ.get("QKV_NATIVE", "1") == "0":
        pytest.skip("QKV_NATIVE=0 turns the native kernel off: unset it to build and test the kernel")
    assert _native.status() == "ready"


@st.composite
def interval_masks(draw, B, n, q_offset):
    m = qkv.masks
    kinds = ["causal", "window", "padding", "prefix", "and"] + (["document"] if q_offset >= 0 else [])
    kind = draw(st.sampled_from(kinds))  # document ids cover positions 0..n-1: no negative query positions
    if kind == "causal":
        return m.causal()
    if kind == "window":
        return m.sliding_window(draw(st.integers(1, 40)), draw(st.sampled_from([0, 0, 3])))
    if kind == "padding":
        return m.padding(draw(st.lists(st.integers(0, n), min_size=B, max_size=B)))
    if kind == "prefix":
        return m.prefix_lm(draw(st.integers(0, n)))
    if kind == "document":
        cuts = sorted(draw(st.lists(st.integers(0, n), max_size=4)))
        return m.document(torch.tensor([sum(p >= c for c in cuts) for p in range(n)]))
    return m.causal() & m.padding(draw(st.lists(st.integers(0, n), min_size=B, max_size=B)))


@needs_kernel
@settings(max_examples=150, deadline=None)
@given(data=st.data())
def test_matches_reference(data):
    d = data.draw
    B, Hkv = d(st.integers(1, 2)), d(st.sampled_from([1, 2]))
    Hq = Hkv * d(st.sampled_from([1, 2, 3]))
    Tq, Tk = d(st.integers(1, 90)), d(st.integers(1, 90))
    D, Dv = d(st.sampled_from([4, 16, 64])), d(st.sampled_from([4, 16, 24]))
    q_offset = d(st.integers(-3, Tk + 3))
    dtype = d(st.sampled_from([torch.float32, torch.float64]))
    mask = d(interval_masks(B, max(Tq + max(q_offset, 0), Tk, 1), q_offset))
    g = torch.Generator().manual_seed(d(st.integers(0, 2**31 - 1)))
    q = torch.randn(B, Hq, Tq, D, generator=g, dtype=dtype)
    k = torch.randn(B, Hkv, Tk, D, generator=g, dtype=dtype)
    v = torch.randn(B, Hkv, Tk, Dv, generator=g, dtype=dtype)
    lo, hi = mask.intervals(torch.arange(Tq) + q_offset)
    out, lse = _native.interval_attention(q, k, v, lo, hi, 0.3)
    ref, _, ref_lse = reference(q, k, v, mask=mask.materialize(Tq, Tk, batch=B, q_offset=q_offset),
                                scale=0.3, q_offset=q_offset)
    tol = 1e-12 if dtype == torch.float64 else 2e-5
    torch.testing.assert_close(out.double(), ref, atol=tol, rtol=tol)
    assert torch.equal(torch.isneginf(lse), torch.isneginf(ref_lse))  # rows that see no key: lse -inf, output 0
    live = torch.isfinite(ref_lse)
    torch.testing.assert_close(lse.double()[live], ref_lse[live], atol=tol, rtol=tol)


@needs_kernel
@pytest.mark.parametrize("mask", [None, qkv.masks.sliding_window(700), qkv.masks.causal()])
def test_rows_longer_than_one_chunk_and_strided_inputs(mask):
    """More keys per row than one 512-key chunk (online softmax across chunks); q/k/v as views of (B, T, H, D)."""
    g = torch.Generator().manual_seed(1)
    q, k, v = (torch.randn(2, 1300, 4, 32, generator=g).transpose(1, 2) for _ in range(3))
    T = 1300
    lo, hi = ((torch.zeros(1, T, dtype=torch.int64), torch.full((1, T), T - 1)) if mask is None
              else mask.intervals(torch.arange(T)))
    out, lse = _native.interval_attention(q, k, v, lo, hi, 32**-0.5)
    ref, _, ref_lse = reference(q, k, v, mask=None if mask is None else mask.materialize(T, T))
    torch.testing.assert_close(out.double(), ref, atol=2e-5, rtol=2e-5)
    torch.testing.assert_close(lse.double(), ref_lse, atol=2e-5, rtol=2e-5)
    assert out.transpose(1, 2).is_contiguous()  # (B, T, H, D) in memory: merging heads is a view


@needs_kernel
def test_auto_picks_it_and_backward_matches():
    g = torch.Generator().manual_seed(2)
    T, mask = 300, qkv.masks.sliding_window(50) & qkv.masks.padding([300, 170])
    q = torch.randn(2, 4, T, 16, generator=g, requires_grad=True)
    k, v = (torch.randn(2, 2, T, 16, generator=g, requires_grad=True) for _ in range(2))
    call = qkv.functional.prepare(q, k, v, mask=mask)
    assert qkv.backends.choose(call)[0] == "native"  # decided once, in the registry
    out = qkv.attention(q, k, v, mask=mask, backend="native")
    torch.testing.assert_close(out, qkv.attention(q, k, v, mask=mask))
    go = torch.randn_like(out)
    out.backward(go)
    qr, kr, vr = (t.detach().double().requires_grad_() for t in (q, k, v))
    ref, _, _ = reference(qr, kr, vr, mask=mask.materialize(T, T, batch=2))
    ref.backward(go.double())
    torch.testing.assert_close(out.double(), ref, atol=2e-5, rtol=2e-5)
    for t, r in ((q, qr), (k, kr), (v, vr)):
        torch.testing.assert_close(t.grad.double(), r.grad, atol=1e-4, rtol=1e-4)


@st.composite
def union_masks(draw, B, Hq, n, q_offset):
    """Masks whose rows see a union of a few key intervals (and, mixed in, single-interval ones)."""
    m = qkv.masks
    kind = draw(st.sampled_from(["longformer", "block_sparse", "block_sparse_heads", "not_window", "or", "and"]))
    if kind == "longformer":
        left = draw(st.integers(0, 20))
        glob = draw(st.lists(st.integers(0, n - 1), min_size=0, max_size=5))
        return m.sliding_window(left, draw(st.sampled_from([0, left]))) | m.global_tokens(glob)
    if kind in ("block_sparse", "block_sparse_heads"):
        bs = draw(st.sampled_from([1, 3, 8, 16]))
        nb = -(-max(n, q_offset + 1 if q_offset > 0 else 1) // bs) + 1
        lead = (B, Hq) if kind == "block_sparse_heads" else ()
        seed = draw(st.integers(0, 2**31 - 1))
        density = draw(st.sampled_from([0.1, 0.4]))
        layout = torch.rand(*lead, nb, nb, generator=torch.Generator().manual_seed(seed)) < density
        return m.block_sparse(layout, bs) & m.causal() if draw(st.booleans()) else m.block_sparse(layout, bs)
    if kind == "not_window":
        return ~m.sliding_window(draw(st.integers(0, 10)), draw(st.integers(0, 10)))
    if kind == "or":
        return m.prefix_lm(draw(st.integers(0, n))) | m.sliding_window(draw(st.integers(0, 8)))
    glob = draw(st.lists(st.integers(0, n - 1), min_size=1, max_size=3))
    return (m.causal() | m.global_tokens(glob)) & m.padding(draw(st.lists(st.integers(0, n), min_size=B, max_size=B)))


@needs_kernel
@settings(max_examples=120, deadline=None)
@given(data=st.data())
def test_interval_unions_forward_and_backward_match_reference(data):
    """Window | global tokens, block-sparse layouts (per head too), complements and mixtures: out, lse and
    the gradients of q, k, v (through out and through lse) against the float64 reference."""
    d = data.draw
    B, Hkv = d(st.integers(1, 2)), d(st.sampled_from([1, 2]))
    Hq = Hkv * d(st.sampled_from([1, 2]))
    Tq, Tk = d(st.integers(1, 80)), d(st.integers(1, 140))
    D, Dv = d(st.sampled_from([4, 16, 32])), d(st.sampled_from([8, 16, 24]))
    q_offset = d(st.integers(0, 10))
    dtype = d(st.sampled_from([torch.float32, torch.float64]))
    mask = d(union_masks(B, Hq, max(Tq + q_offset, Tk), q_offset))
    g = torch.Generator().manual_seed(d(st.integers(0, 2**31 - 1)))
    q = torch.randn(B, Hq, Tq, D, generator=g, dtype=dtype, requires_grad=True)
    k = torch.randn(B, Hkv, Tk, D, generator=g, dtype=dtype, requires_grad=True)
    v = torch.randn(B, Hkv, Tk, Dv, generator=g, dtype=dtype, requires_grad=True)
    call = qkv.functional.prepare(q, k, v, mask=mask, q_offset=q_offset)
    assert _native.check(call) is None, _native.check(call)
    out, lse = qkv.attention(q, k, v, mask=mask, q_offset=q_offset, backend="native", return_lse=True)
    dense = mask.materialize(Tq, Tk, batch=B, heads=Hq, q_offset=q_offset)
    qr, kr, vr = (t.detach().double().requires_grad_() for t in (q, k, v))
    ref, _, ref_lse = reference(qr, kr, vr, mask=dense, q_offset=q_offset)
    tol = 1e-10 if dtype == torch.float64 else 3e-5
    torch.testing.assert_close(out.double(), ref, atol=tol, rtol=tol)
    assert torch.equal(torch.isneginf(lse), torch.isneginf(ref_lse))
    live = torch.isfinite(ref_lse)
    torch.testing.assert_close(lse.double()[live], ref_lse[live], atol=tol, rtol=tol)
    go = torch.randn(out.shape, generator=g, dtype=dtype)
    gl = torch.randn(lse.shape, generator=g, dtype=dtype) * live
    ((out * go).sum() + (lse.masked_fill(~live, 0) * gl).sum()).backward()
    ((ref * go.double()).sum() + (ref_lse.masked_fill(~live, 0) * gl.double()).sum()).backward()
    gtol = 1e-9 if dtype == torch.float64 else 2e-4
    for t, r in ((q, qr), (k, kr), (v, vr)):
        torch.testing.assert_close(t.grad.double(), r.grad, atol=gtol, rtol=gtol)


@needs_kernel
@pytest.mark.parametrize("name", ["longformer", "block_sparse"])
def test_auto_picks_it_for_unions_on_long_rows(name):
    """Rows over several 512-key chunks with pieces of several ranges; strided (B, T, H, D) views; auto picks
    native; forward and backward match the float64 reference."""
    m, T = qkv.masks, 1500
    if name == "longformer":
        mask = m.sliding_window(300, 300) | m.global_tokens([0, 1, 2, 3, 700])
    else:
        layout = torch.rand(12, 12, generator=torch.Generator().manual_seed(0)) < 0.3
        layout |= torch.eye(12, dtype=torch.bool)
        mask = m.block_sparse(layout, 128)
    g = torch.Generator().manual_seed(3)
    q, k, v = (torch.randn(1, T, 4, 32, generator=g).transpose(1, 2).requires_grad_() for _ in range(3))
    call = qkv.functional.prepare(q, k, v, mask=mask)
    assert qkv.backends.choose(call)[0] == "native"
    out = qkv.attention(q, k, v, mask=mask)
    go = torch.randn(out.shape, generator=g)
    out.backward(go)
    qr, kr, vr = (t.detach().double().requires_grad_() for t in (q, k, v))
    ref, _, _ = reference(qr, kr, vr, mask=mask.materialize(T, T))
    ref.backward(go.double())
    torch.testing.assert_close(out.double(), ref, atol=2e-5, rtol=2e-5)
    for t, r in ((q, qr), (k, kr), (v, vr)):
        torch.testing.assert_close(t.grad.double(), r.grad, atol=2e-4, rtol=2e-4)


@needs_kernel
@settings(max_examples=25, deadline=None)
@given(data=st.data())
def test_forward_over_large_blocks_matches_reference(data):
    """Enough (batch, head) pairs for 128-row blocks: the forward runs a block whole where its rows share most
    keys (block layouts, causal far from the diagonal) and as 32-row blocks elsewhere; a ragged last block."""
    d = data.draw
    B, Hq, Tq = 2, 4, d(st.integers(129, 420))
    Tk, q_offset = d(st.integers(Tq, Tq + 40)), d(st.integers(0, 40))
    mask = d(union_masks(B, Hq, max(Tq + q_offset, Tk), q_offset) | st.sampled_from(
        [qkv.masks.causal(), qkv.masks.sliding_window(20), None]))
    g = torch.Generator().manual_seed(d(st.integers(0, 2**31 - 1)))
    q = torch.randn(B, Hq, Tq, 16, generator=g, dtype=torch.float64)
    k, v = (torch.randn(B, 2, Tk, 16, generator=g, dtype=torch.float64) for _ in range(2))
    assume(_native.check(qkv.functional.prepare(q, k, v, mask=mask, q_offset=q_offset)) is None)  # <= 64 intervals
    out, lse = qkv.attention(q, k, v, mask=mask, q_offset=q_offset, backend="native", return_lse=True)
    dense = None if mask is None else mask.materialize(Tq, Tk, batch=B, heads=Hq, q_offset=q_offset)
    ref, _, ref_lse = reference(q, k, v, mask=dense, q_offset=q_offset)
    torch.testing.assert_close(out, ref, atol=1e-10, rtol=1e-10)
    torch.testing.assert_close(lse, ref_lse, atol=1e-10, rtol=1e-10)


@needs_kernel
def test_backward_spreads_few_heads_over_the_threads():
    """One kv head and several threads: units share the head's query blocks and add dK/dV into scratch copies
    (summed at the end); the result equals a one-thread run."""
    g = torch.Generator().manual_seed(4)
    T = 700
    q = torch.randn(1, 2, T, 16, generator=g, requires_grad=True)
    k, v = (torch.randn(1, 1, T, 16, generator=g, requires_grad=True) for _ in range(2))
    mask = qkv.masks.causal()
    grads = []
    threads = torch.get_num_threads()
    for n in (1, max(2, threads)):
        torch.set_num_threads(n)
        try:
            qkv.attention(q, k, v, mask=mask, backend="native").sum().backward()
        finally:
            torch.set_num_threads(threads)
        grads.append([t.grad.clone() for t in (q, k, v)])
        for t in (q, k, v):
            t.grad = None
    for a, b in zip(*grads):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)


needs_bf16 = pytest.mark.skipif(
    not _native.available() or torch.bfloat16 not in _native.dtypes(),
    reason="the native kernel's bfloat16 path needs a CPU with AVX-512 BF16")


@needs_bf16
@settings(max_examples=120, deadline=None)
@given(data=st.data())
def test_bfloat16_matches_the_float64_reference_of_its_inputs(data):
    """bfloat16 in and out, float32 accumulation: within bfloat16's rounding of the probabilities and the output."""
    d = data.draw
    B, Hkv = d(st.integers(1, 2)), d(st.sampled_from([1, 2]))
    Hq = Hkv * d(st.sampled_from([1, 2]))
    Tq, Tk = d(st.integers(1, 90)), d(st.sampled_from([1, 7, 16, 33, 90, 300]))
    D, Dv = d(st.sampled_from([3, 16, 64, 80])), d(st.sampled_from([5, 16, 24, 64]))
    q_offset = d(st.integers(-3, Tk + 3))
    mask = d(interval_masks(B, max(Tq + max(q_offset, 0), Tk, 1), q_offset))
    g = torch.Generator().manual_seed(d(st.integers(0, 2**31 - 1)))
    q, k = (torch.randn(B, h, t, D, generator=g).bfloat16() for h, t in ((Hq, Tq), (Hkv, Tk)))
    v = torch.randn(B, Hkv, Tk, Dv, generator=g).bfloat16()
    lo, hi = mask.intervals(torch.arange(Tq) + q_offset)
    out, lse = _native.interval_attention(q, k, v, lo, hi, 0.3)
    assert out.dtype == torch.bfloat16 and lse.dtype == torch.float32
    ref, _, ref_lse = reference(q.double(), k.double(), v.double(), scale=0.3, q_offset=q_offset,
                                mask=mask.materialize(Tq, Tk, batch=B, q_offset=q_offset))
    torch.testing.assert_close(out.double(), ref, atol=1.5e-2, rtol=1e-2)
    assert torch.equal(torch.isneginf(lse), torch.isneginf(ref_lse))
    live = torch.isfinite(ref_lse)
    torch.testing.assert_close(lse.double()[live], ref_lse[live], atol=1e-4, rtol=1e-5)


@needs_bf16
def test_bfloat16_long_rows_strided_inputs_auto_and_backward():
    g = torch.Generator().manual_seed(3)
    T, mask = 700, qkv.masks.sliding_window(600) & qkv.masks.padding([700, 333])
    x = torch.randn(2, T, 4, 3 * 32, generator=g).bfloat16()  # q, k, v as views of one (B, T, H, 3D) tensor
    q, k, v = (t.transpose(1, 2).requires_grad_() for t in x.split(32, dim=-1))
    q, k, v = (t.detach().requires_grad_() for t in (q, k, v))
    call = qkv.functional.prepare(q, k, v, mask=mask)
    assert qkv.backends.choose(call)[0] == "native"
    out = qkv.attention(q, k, v, mask=mask)
    qr, kr, vr = (t.detach().double().requires_grad_() for t in (q, k, v))
    ref, _, _ = reference(qr, kr, vr, mask=mask.materialize(T, T, batch=2))
    torch.testing.assert_close(out.double(), ref, atol=1.5e-2, rtol=1e-2)
    go = torch.randn(out.shape, generator=g).bfloat16()
    out.backward(go)
    ref.backward(go.double())
    for t, r in ((q, qr), (k, kr), (v, vr)):
        assert t.grad.dtype == torch.bfloat16
        torch.testing.assert_close(t.grad.double(), r.grad, atol=3e-2, rtol=3e-2)


@needs_bf16
def test_bfloat16_non_finite_values_follow_the_rule():
    """A NaN value outside every row's interval must not reach the rows (the kernel redoes such rows exactly)."""
    q, k, v = (torch.randn(1, 1, 40, 16).bfloat16() for _ in range(3))
    v[0, 0, 39] = float("nan")  # only the last row sees key 39 under the causal mask
    lo, hi = qkv.masks.causal().intervals(torch.arange(40))
    out, _ = _native.interval_attention(q, k, v, lo, hi, 0.25)
    assert torch.isnan(out[0, 0, 39]).all() and torch.isfinite(out[0, 0, :39]).all()


@needs_kernel
def test_compiles_as_one_op():
    q, k, v = (torch.randn(1, 2, 40, 8) for _ in range(3))
    lo, hi = qkv.masks.causal().intervals(torch.arange(40))
    f = torch.compile(lambda q, k, v: torch.ops.qkv.interval_attention(q, k, v, lo, hi, 0.5)[0], fullgraph=True)
    torch.testing.assert_close(f(q, k, v), _native.interval_attention(q, k, v, lo, hi, 0.5)[0])


def test_can_be_switched_off():
    code = ("import torch, qkv; from qkv.backends import native; q = torch.randn(1, 2, 70, 8);"
            "o = qkv.attention(q, q, q, mask=qkv.masks.sliding_window(9));"
            "r = qkv.attention(q, q, q, mask=qkv.masks.sliding_window(9), backend='eager');"
            "c = qkv.backends.available()['native'];"
            "print(native.status(), c.available, bool(torch.allclose(o, r, atol=1e-5)))")
    env = dict(os.environ, QKV_NATIVE="0")
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, check=True)
    assert res.stdout.strip().splitlines()[-1] == "disabled by QKV_NATIVE=0 False True"
