"""NaN and inf in q, k, v, bias or a score mod: the same non-finite pattern on every backend and entry point.

The rule (`qkv.attention`'s docstring): a key reaches query row i when the mask
shows it and its score is not -inf. No key reaches row i: output 0, weights 0,
lse -inf, gradient 0, whatever q_i or the hidden k_j, v_j hold. Otherwise a
NaN or +inf score among the reaching keys makes lse NaN and the weights NaN at
those keys (0 elsewhere), and the output row NaN; a non-finite value v_j among
them makes the output row NaN. Every other row is finite and exact.
"""

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from reference import reference
from strategies import tiles

import qkv

NAN, INF = math.nan, math.inf
BACKENDS = ["eager", "sdpa", "chunked", "native", "auto"]


def rule_reference(q, k, v, *, mask=None, bias=None, score_mod=None, scale=None, q_offset=None):
    """The documented rule, row by row in float64 from the dense mask: out, weights, lse."""
    B, Hq, Tq, D = q.shape
    Hkv, Tk, Dv = k.shape[1], k.shape[2], v.shape[-1]
    scale = D**-0.5 if scale is None else scale
    q_offset = Tk - Tq if q_offset is None else q_offset
    q, k, v = q.double(), k.double(), v.double()
    mask = torch.ones(1, 1, Tq, Tk, dtype=torch.bool) if mask is None else mask
    mask = mask.expand(B, Hq, Tq, Tk)
    bias = None if bias is None else bias.double().expand(B, Hq, Tq, Tk)
    out = torch.zeros(B, Hq, Tq, Dv, dtype=torch.float64)
    w = torch.zeros(B, Hq, Tq, Tk, dtype=torch.float64)
    lse = torch.full((B, Hq, Tq), -INF, dtype=torch.float64)
    for b in range(B):
        for h in range(Hq):
            kk, vv = k[b, h // (Hq // Hkv)], v[b, h // (Hq // Hkv)]
            for i in range(Tq):
                s = (kk * q[b, h, i]).sum(-1) * scale  # elementwise: IEEE rules for inf and NaN, in any order
                if score_mod is not None:
                    s = score_mod(s, torch.tensor(b), torch.tensor(h), torch.tensor(q_offset + i), torch.arange(Tk))
                if bias is not None:
                    s = s + bias[b, h, i]
                reach = mask[b, h, i] & (s != -INF)
                if not reach.any():
                    continue
                sr = s[reach]
                if sr.isnan().any() or (sr == INF).any():
                    out[b, h, i], lse[b, h, i] = NAN, NAN
                    w[b, h, i, reach] = NAN
                    continue
                top = sr.max()
                e = torch.exp(sr - top)
                p = e / e.sum()
                w[b, h, i, reach] = p
                lse[b, h, i] = top + torch.log(e.sum())
                out[b, h, i] = NAN if not torch.isfinite(vv[reach]).all() else p @ vv[reach]
    return out, w, lse


def _tol(dtype):
    return {torch.float64: 1e-9, torch.float32: 2e-5}.get(dtype, 3e-2)


def assert_same_pattern(got, want, tol, what):
    got = got.double()
    assert torch.equal(got.isnan(), want.isnan()), f"{what}: NaN pattern differs"
    assert torch.equal(torch.isneginf(got), torch.isneginf(want)), f"{what}: -inf pattern differs"
    assert torch.equal(torch.isposinf(got), torch.isposinf(want)), f"{what}: +inf pattern differs"
    fin = torch.isfinite(want)
    torch.testing.assert_close(got[fin], want[fin], atol=tol, rtol=tol, msg=what)


@st.composite
def masks(draw, B, H, Tq, Tk, q_offset):
    m = qkv.masks
    kind = draw(st.sampled_from(["none", "causal", "window", "padding", "causal&padding", "tensor"]))
    if kind == "none":
        return None
    if kind == "causal":
        return m.causal()
    if kind == "window":
        return m.sliding_window(draw(st.integers(0, 6)), draw(st.sampled_from([0, 2])))
    lengths = draw(st.lists(st.integers(0, Tk), min_size=B, max_size=B))
    if kind == "padding":
        return m.padding(lengths)
    if kind == "causal&padding":
        return m.causal() & m.padding(lengths)
    g = torch.Generator().manual_seed(draw(st.integers(0, 2**31 - 1)))
    return torch.rand(draw(st.sampled_from([1, B])), draw(st.sampled_from([1, H])), Tq, Tk, generator=g) < 0.6


def _score_mod(kind, qp0, kp0):
    if kind == "nan":  # a score mod that returns NaN at one (query, key) pair
        return lambda s, b, h, qp, kp: torch.where((qp == qp0) & (kp == kp0), NAN, s)
    if kind == "mask":  # -inf from a score mod is masking
        return lambda s, b, h, qp, kp: torch.where((qp == qp0) | (kp == kp0), -INF, s)
    return None


@st.composite
def calls(draw):
    """q, k, v (and maybe a bias) with NaN / +inf / -inf planted in them, a mask, maybe a score mod."""
    B, Hkv = draw(st.integers(1, 2)), draw(st.sampled_from([1, 2]))
    Hq = Hkv * draw(st.sampled_from([1, 2]))
    Tq, Tk = draw(st.integers(1, 12)), draw(st.integers(1, 12))
    D, Dv = draw(st.sampled_from([4, 8])), draw(st.sampled_from([4, 8, 5]))
    q_offset = draw(st.sampled_from([None, None, -3, 2]))
    off = Tk - Tq if q_offset is None else q_offset
    dtype = draw(st.sampled_from([torch.float32, torch.float64, torch.bfloat16, torch.float16]))
    g = torch.Generator().manual_seed(draw(st.integers(0, 2**31 - 1)))
    t = {"q": torch.randn(B, Hq, Tq, D, generator=g, dtype=dtype),
         "k": torch.randn(B, Hkv, Tk, D, generator=g, dtype=dtype),
         "v": torch.randn(B, Hkv, Tk, Dv, generator=g, dtype=dtype)}
    if draw(st.booleans()):
        t["bias"] = torch.randn(B, Hq, Tq, Tk, generator=g, dtype=dtype)
    for _ in range(draw(st.integers(0, 3))):
        name = draw(st.sampled_from(sorted(t)))
        x = t[name]
        index = tuple(draw(st.integers(0, n - 1)) for n in x.shape)
        if name == "q" and draw(st.booleans()):
            index = index[:3]  # a whole query row
        x[index] = draw(st.sampled_from([NAN, INF, -INF]))
    mod = _score_mod(draw(st.sampled_from(["none", "none", "nan", "mask"])), off + draw(st.integers(0, Tq - 1)),
                     draw(st.integers(0, Tk - 1)))
    mask = draw(masks(B, Hq, Tq, Tk, off))
    kw = {"q": t["q"], "k": t["k"], "v": t["v"], "bias": t.get("bias"), "mask": mask, "score_mod": mod,
          "q_offset": q_offset, "scale": draw(st.sampled_from([None, 0.5]))}
    return kw, draw(st.sampled_from([(1, 1), (3, 4), (64, 64)]))


def _dense(kw):
    q, k = kw["q"], kw["k"]
    B, H, Tq = q.shape[:3]
    Tk = k.shape[2]
    off = Tk - Tq if kw["q_offset"] is None else kw["q_offset"]
    return None if kw["mask"] is None else qkv.masks.as_mask(kw["mask"]).materialize(Tq, Tk, batch=B, heads=H,
                                                                                     q_offset=off)


def _serves(backend, kw, **extra):
    if backend == "auto":
        return True
    call = qkv.functional.prepare(**kw, **extra)
    return not qkv.backends.get(backend).missing(call)


@settings(max_examples=60)
@given(case=calls(), backend=st.sampled_from(BACKENDS))
def test_every_backend_follows_the_rule(case, backend):
    kw, tile = case
    ref_out, ref_w, ref_lse = rule_reference(kw["q"], kw["k"], kw["v"], mask=_dense(kw), bias=kw["bias"],
                                             score_mod=kw["score_mod"], scale=kw["scale"], q_offset=kw["q_offset"])
    tol = _tol(kw["q"].dtype)
    extras = _serves(backend, kw, return_weights=True, return_lse=True)
    if not _serves(backend, kw):
        return
    with tiles(*tile):
        if extras:
            out, w, lse = qkv.attention(**kw, backend=backend, return_weights=True, return_lse=True)
            assert_same_pattern(w, ref_w, tol, "weights")
            assert_same_pattern(lse, ref_lse, tol, "lse")
        else:
            out = qkv.attention(**kw, backend=backend)
    assert_same_pattern(out, ref_out, tol, "out")


@settings(max_examples=30)
@given(case=calls())
def test_attention_weights_and_stream_follow_the_rule(case):
    kw, tile = case
    kw.pop("v")
    _, ref_w, _ = rule_reference(kw["q"], kw["k"], kw["k"][..., :1], mask=_dense(kw), bias=kw["bias"],
                                 score_mod=kw["score_mod"], scale=kw["scale"], q_offset=kw["q_offset"])
    tol = _tol(kw["q"].dtype)
    Tq, Tk = kw["q"].shape[2], kw["k"].shape[2]
    with tiles(*tile):
        assert_same_pattern(qkv.attention_weights(**kw), ref_w, tol, "attention_weights")
        rows = torch.arange(Tq).flip(0)[: max(1, Tq // 2)]
        assert_same_pattern(qkv.attention_weights(**kw, rows=rows), ref_w[:, :, rows], tol, "rows=")
        n = min(3, Tk)
        values, index = qkv.attention_weights(**kw, topk=n)
        streamed = torch.zeros_like(ref_w)

        def write(r0, r1, kpos, p):
            streamed[:, :, r0:r1].index_copy_(3, kpos, p.double())

        qkv.functional.stream_weights(**kw, fn=write)
    assert_same_pattern(streamed, ref_w, tol, "stream_weights")
    bad = ref_w.isnan().any(-1)  # rows a NaN score reaches: NaN values, at keys that reach them
    want = torch.where(bad[..., None], 0.0, ref_w).topk(n, -1).values
    picked = ref_w.gather(-1, index.clamp(min=0))
    assert torch.equal(values.isnan(), ref_w.isnan().sum(-1, keepdim=True) > torch.arange(n))
    assert torch.all(torch.where(values.isnan(), picked.isnan(), True))  # NaN entries name keys that reach the row
    fin = ~bad
    torch.testing.assert_close(values.double()[fin], want[fin], atol=tol, rtol=tol)


def _padded_call(dtype, Tq=21, Tk=21):
    """Padding and a causal mask with rows that see no key (q_offset < 0); NaN planted only where nothing sees it."""
    g = torch.Generator().manual_seed(3)
    q = torch.randn(2, 4, Tq, 8, generator=g, dtype=dtype)
    k, v = (torch.randn(2, 2, Tk, 8, generator=g, dtype=dtype) for _ in range(2))
    mask = qkv.masks.causal() & qkv.masks.padding([Tk, 13])
    dead_rows, dead_keys = slice(0, 4), slice(13, Tk)  # q_offset=-4: rows 0..3 see no key; batch 1 hides 13..
    q[:, :, dead_rows] = NAN
    k[1, :, dead_keys], v[1, :, dead_keys] = NAN, INF
    return q, k, v, mask, dead_rows, dead_keys


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_nan_that_nothing_sees_leaves_every_gradient_exact(backend, dtype):
    """A NaN query in a row that sees no key, and NaN/inf keys and values that no row sees: output 0 for those rows,
    zero gradient for those entries, and every other output and gradient equals the clean reference."""
    q, k, v, mask, dead_rows, dead_keys = _padded_call(dtype)
    clean = [t.clone() for t in (q, k, v)]
    clean[0][:, :, dead_rows] = 0
    clean[1][1, :, dead_keys], clean[2][1, :, dead_keys] = 0, 0
    leaves = [t.clone().requires_grad_() for t in (q, k, v)]
    refs = [t.double().requires_grad_() for t in clean]
    dense = mask.materialize(21, 21, batch=2, q_offset=-4)
    ref, _, _ = reference(*refs, mask=dense, q_offset=-4)
    go = torch.randn_like(ref)
    ref.backward(go)
    with tiles(8, 8):
        out = qkv.attention(*leaves, mask=mask, q_offset=-4, backend=backend)
        out.backward(go.to(dtype))
    tol = 1e-9 if dtype == torch.float64 else 2e-4
    assert torch.all(out[:, :, dead_rows] == 0)
    torch.testing.assert_close(out.double(), ref, atol=tol, rtol=tol)
    for got, want in zip(leaves, refs):
        torch.testing.assert_close(got.grad.double(), want.grad, atol=tol * 5, rtol=tol * 5)
    assert torch.all(leaves[0].grad[:, :, dead_rows] == 0)


@pytest.mark.parametrize("backend", BACKENDS)
def test_a_nan_query_row_poisons_only_its_own_keys(backend):
    """A NaN in a live query row: that row's output and the value gradients of the keys it reaches are NaN; every
    other row's output and query gradient, the other keys' value gradients and the other heads are exact. (The key
    gradients of its head are not promised: the backward matmul multiplies the NaN query by zeros.)"""
    g = torch.Generator().manual_seed(5)
    T, i = 20, 9
    q, k, v = (torch.randn(1, 2, T, 8, generator=g) for _ in range(3))
    q[0, 0, i, 1] = NAN
    mask = qkv.masks.sliding_window(3)
    leaves = [t.clone().requires_grad_() for t in (q, k, v)]
    go = torch.randn(1, 2, T, 8, generator=g)
    with tiles(4, 4):
        out = qkv.attention(*leaves, mask=mask, backend=backend)
        out.backward(go)
    assert out[0, 0, i].isnan().all() and torch.isfinite(out[0, 0, torch.arange(T) != i]).all()
    clean = [t.clone() for t in (q, k, v)]
    clean[0][0, 0, i] = 0
    refs = [t.double().requires_grad_() for t in clean]
    ref, _, _ = reference(*refs, mask=mask.materialize(T, T))
    go_ref = go.double().clone()
    go_ref[0, 0, i] = 0  # the NaN row's own cotangent is what makes its keys' gradients NaN
    ref.backward(go_ref)
    others = torch.ones(T, dtype=torch.bool)
    others[i] = False
    untouched = torch.ones(T, dtype=torch.bool)
    untouched[i - 3 : i + 1] = False  # the keys row i reaches
    torch.testing.assert_close(leaves[0].grad[0, :, others].double(), refs[0].grad[0, :, others], atol=2e-4, rtol=2e-4)
    dv, dv_ref = leaves[2].grad[0, 0], refs[2].grad[0, 0]
    assert dv[~untouched].isnan().all()
    torch.testing.assert_close(dv[untouched].double(), dv_ref[untouched], atol=2e-4, rtol=2e-4)
    for got, want in zip(leaves, refs):
        torch.testing.assert_close(got.grad[0, 1].double(), want.grad[0, 1], atol=2e-4, rtol=2e-4)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.float16])
def test_a_scale_that_overflows_the_dtype_is_refused(dtype):
    q = torch.randn(1, 1, 4, 8, dtype=dtype)
    big = 1e300 if dtype != torch.float16 else 1e5
    if dtype == torch.float64:
        qkv.attention(q, q, q, scale=1e300)  # representable: allowed (and follows the rule: overflow is +inf)
        return
    for fn in (lambda: qkv.attention(q, q, q, scale=big), lambda: qkv.attention_weights(q, q, scale=-big)):
        with pytest.raises(ValueError) as info:
            fn()
        for words in ("scale=", str(dtype), "float64"):
            assert words in str(info.value)


@pytest.mark.parametrize("backend", BACKENDS)
def test_scores_that_overflow_are_nan_rows(backend):
    """Finite inputs whose score overflows float32 to +inf: that row is NaN, the others exact."""
    q = torch.full((1, 1, 3, 4), 1.0)
    k = torch.randn(1, 1, 5, 4, generator=torch.Generator().manual_seed(0))
    v = torch.randn(1, 1, 5, 4, generator=torch.Generator().manual_seed(1))
    q[0, 0, 1] = 3e37  # row 1: scores of about +-1e38
    k[0, 0, 2] = 4.0  # key 2: row 1's score 4.8e38 overflows to +inf
    out = qkv.attention(q, k, v, scale=1.0, backend=backend)
    ref, _, _ = reference(q, k, v, scale=1.0)
    assert out[0, 0, 1].isnan().all()
    torch.testing.assert_close(out[0, 0, [0, 2]].double(), ref[0, 0, [0, 2]], atol=2e-5, rtol=2e-5)


FLEX = qkv.backends.available()["flex"]


@pytest.mark.skipif(not FLEX.available, reason=f"FlexAttention unavailable: {FLEX.reason}")
def test_flex_follows_the_rule():
    """NaN inputs (served exactly by the tiles, no compile) and a score mod returning NaN (compiled once)."""
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(1, 2, 40, 8, generator=g) for _ in range(3))
    mask = qkv.masks.causal()
    k2, v2 = k.clone(), v.clone()
    k2[0, 0, 7, 0], v2[0, 1, 30, 3] = NAN, NAN
    mod = _score_mod("nan", 10, 3)
    with torch.no_grad():
        for kw in ({"k": k2, "v": v2}, {"k": k, "v": v, "score_mod": mod}):
            kw = {"q": q, "mask": mask} | kw
            out = qkv.attention(**kw, backend="flex")
            ref, _, _ = rule_reference(kw["q"], kw["k"], kw["v"], mask=mask.materialize(40, 40),
                                       score_mod=kw.get("score_mod"))
            assert_same_pattern(out, ref, 2e-5, "flex out")


def test_fusable_sees_every_kind_of_bad_value():
    """The check that sends calls away from the fused kernels: NaN anywhere in a large tensor, inf, overflow."""
    from qkv.backends.kernels import fusable

    q = torch.randn(1, 8, 3000, 64)
    assert fusable(q, q, q, None, 0.125)
    for bad in (NAN, INF, -INF):
        x = q.clone()
        x[0, 5, 2222, 17] = bad
        assert not fusable(x, q, q, None, 0.125) and not fusable(q, x, q, None, 0.125)
        assert not fusable(q, q, x, None, 0.125)
    bias = torch.zeros(3000, 3000)
    bias[7, 9] = -INF
    assert fusable(q, q, q, bias, 0.125)  # -inf bias masks
    bias[8, 9] = NAN
    assert not fusable(q, q, q, bias, 0.125)
    assert not fusable(q * 1e18, q * 1e18, q, None, 0.125)  # scores would overflow float32


@pytest.mark.parametrize("backend", BACKENDS)
def test_long_rows_across_kernel_chunks(backend):
    """Rows of more than one 512-key chunk and many 32-row blocks (the native kernel's online softmax across chunks
    and its exact redo of rows whose block saw a hidden NaN value)."""
    g = torch.Generator().manual_seed(7)
    T = 600
    q, k, v = (torch.randn(1, 2, T, 8, generator=g) for _ in range(3))
    q[0, 0, 5] = NAN
    k[0, 0, 100, 3] = NAN  # reaches rows 100..599 of head 0
    v[0, 1, 300, 0] = INF  # reaches rows 300..599 of head 1 (hidden from the rows before, in the same blocks)
    k[0, 1, 40, 2] = -INF  # a -inf score for some rows (masks key 40 there), +inf (NaN rows) for others
    mask = qkv.masks.sliding_window(550)
    ref_out, ref_w, ref_lse = rule_reference(q, k, v, mask=mask.materialize(T, T))
    if _serves(backend, {"q": q, "k": k, "v": v, "mask": mask}, return_weights=True, return_lse=True):
        out, w, lse = qkv.attention(q, k, v, mask=mask, backend=backend, return_weights=True, return_lse=True)
        assert_same_pattern(w, ref_w, 2e-5, "weights")
        assert_same_pattern(lse, ref_lse, 2e-5, "lse")
    else:
        out = qkv.attention(q, k, v, mask=mask, backend=backend)
    assert_same_pattern(out, ref_out, 2e-5, "out")
