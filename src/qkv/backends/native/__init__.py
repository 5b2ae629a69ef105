"""The `native` backend: qkv's CPU kernel for masks whose rows each see a few key intervals.

Causal, sliding windows (any left/right, 0 included), documents, padding,
prefix-LM and their intersections (`&`) describe every query row by one key
range ``lo <= k <= hi`` (`Mask.intervals`); window | global tokens (Longformer,
BigBird's window and globals), block-sparse layouts, complements of one interval
and their unions and intersections by a few (`Mask.interval_sets`, at most
`qkv.masks.MAX_INTERVALS` a row). The kernel (`kernel.cpp`, built on first use by
`build`) takes blocks of 32 query rows, visits the union of their rows' keys in
chunks of at most 512 keys, computes the scores with one BLAS GEMM per piece of
a chunk, applies the row bounds directly (no mask tensor), runs an online softmax
across chunks and accumulates the values with a second GEMM straight into the
output. float32 and float64, grouped-query heads, D != Dv, any strides; and
bfloat16 (one interval per row) where the CPU has AVX-512 BF16 (`dtypes()`):
inputs and output in bfloat16, scores, softmax and accumulation in float32 (the
log-sum-exp is float32), the two products as register-blocked ``vdpbf16ps``
loops over keys and values packed once per call (MKL's bfloat16 GEMM is slower
than its float32 one on this project's AMD CPU).

Backward (float32, float64) is native too (`interval_attention_backward`): blocks
of 64 query rows recompute their probabilities from the saved log-sum-exp and
run five GEMMs per piece (FlashAttention-2's backward). bfloat16 backward, and any
call with a NaN or infinite input (whose rule, that what no row sees reaches no
gradient, GEMMs over a block's keys cannot keep), is the `chunked` backend's,
from the saved output and log-sum-exp. Probabilities
(``return_weights``) come from chunked's weights pass. Calls with a score_mod,
bias or dropout are not served (`check` says why), and `auto` hands those to
`chunked`.
"""

from __future__ import annotations

import torch

from ..chunked import run_for
from ..chunked import weights as chunked_weights
from ..kernels import unit_stride
from ...masks import MAX_INTERVALS
from ..registry import Call
from .build import DTYPES, available, dtypes, interval_attention, interval_attention_backward, status, supports

__all__ = ["native", "check", "available", "status", "supports", "interval_attention", "interval_attention_backward",
           "DTYPES", "dtypes"]


def check(call: Call) -> str | None:
    """Why the native kernel cannot serve ``call``, or None."""
    if call.score_mod is not None or call.bias is not None or call.dropout_p:
        return "score_mod, bias or dropout (the native kernel applies only the mask's row intervals)"
    if not supports(call.q, call.k, call.v):
        return f"this call's device/dtype or this machine (native kernel: {status()})"
    if call.interval_sets is None:
        return (f"support for this mask: its rows are not unions of at most {MAX_INTERVALS} key intervals "
                f"({call.mask!r})")
    if call.q.dtype == torch.bfloat16 and call.intervals is None:
        return f"bfloat16 with more than one key interval per row ({call.mask!r}; the bfloat16 kernel takes one)"
    return None


def _finite(*ts: torch.Tensor) -> bool:
    """Whether every value is finite (one sum per tensor; an overflowing sum only sends the call to chunked).
    The native backward's GEMMs would multiply a NaN key that a row does not see by that row's zero."""
    return all(bool(torch.isfinite(t.sum())) for t in ts)


class _NativeAttention(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, k, v, call: Call):
        ctx.set_materialize_grads(False)
        q, k, v = unit_stride(q), unit_stride(k), unit_stride(v)  # what the backward kernels read
        out, lse = interval_attention(q, k, v, *call.interval_sets, call.scale)
        ctx.save_for_backward(q, k, v, out, lse)
        ctx.call = call
        return out, lse

    @staticmethod
    def backward(ctx, dout, dlse):
        q, k, v, out, lse = ctx.saved_tensors
        call = ctx.call
        if dout is None:
            dout = torch.zeros_like(out)
        if q.dtype != torch.bfloat16 and _finite(q, k, v):
            dq, dk, dv = interval_attention_backward(q, k, v, out, lse, dout, dlse, *call.interval_sets, call.scale)
        else:  # bfloat16, or a NaN/inf input: chunked's backward keeps what no row sees out of every gradient
            raw = lse.masked_fill(torch.isneginf(lse), 0.0)  # what the fused backward expects on rows that see no key
            needs = (*ctx.needs_input_grad[:3], False)
            dq, dk, dv, _ = run_for(call).backward(dout, dlse, q, k, v, None, out, raw, needs)
        return tuple(g if need else None for g, need in zip((dq, dk, dv), ctx.needs_input_grad[:3])) + (None,)


def native(call: Call):
    """The `native` backend (see the module docstring)."""
    out, lse = _NativeAttention.apply(call.q, call.k, call.v, call)
    weights = None
    if call.return_weights:
        with torch.no_grad():
            weights = chunked_weights.weights(run_for(call), call.q, call.k, None, lse.detach())
    return out, weights, lse if call.return_lse else None
