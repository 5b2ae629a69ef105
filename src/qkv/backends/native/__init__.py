"""The `native` backend: qkv's CPU kernel for masks whose rows each see one key interval.

Causal, sliding windows (any left/right, 0 included), documents, padding,
prefix-LM and their intersections (`&`) describe every query row by one key
range ``lo <= k <= hi`` (`Mask.intervals`). The kernel (`kernel.cpp`, built on
first use by `build`) takes blocks of 32 query rows, computes their scores
over the block's keys with one BLAS GEMM per chunk of at most 512 keys, applies
the row bounds directly (no mask tensor), runs an online softmax across chunks
and accumulates the values with a second GEMM straight into the output.
float32 and float64, grouped-query heads, D != Dv, any strides; and bfloat16
where the CPU has AVX-512 BF16 (`dtypes()`): inputs and output in bfloat16,
scores, softmax and accumulation in float32 (the log-sum-exp is float32), the
two products as register-blocked ``vdpbf16ps`` loops over keys and values
packed once per call (MKL's bfloat16 GEMM is slower than its float32 one on
this project's AMD CPU).

Backward is the `chunked` backend's, from the saved output and log-sum-exp (the
same tiles it would visit); probabilities come from chunked's weights pass.
Calls with a score_mod, bias or dropout are not served (`check` says why), and
`auto` hands those to `chunked`.
"""

from __future__ import annotations

import torch

from ..chunked import run_for
from ..chunked import weights as chunked_weights
from ..kernels import unit_stride
from ..registry import Call
from .build import DTYPES, available, dtypes, interval_attention, status, supports

__all__ = ["native", "check", "available", "status", "supports", "interval_attention", "DTYPES", "dtypes"]


def check(call: Call) -> str | None:
    """Why the native kernel cannot serve ``call``, or None."""
    if call.score_mod is not None or call.bias is not None or call.dropout_p:
        return "score_mod, bias or dropout (the native kernel applies only the mask's row intervals)"
    if not supports(call.q, call.k, call.v):
        return f"this call's device/dtype or this machine (native kernel: {status()})"
    if call.intervals is None:
        return f"a mask without one key interval per row ({call.mask!r})"
    return None


class _NativeAttention(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, k, v, call: Call):
        ctx.set_materialize_grads(False)
        q, k, v = unit_stride(q), unit_stride(k), unit_stride(v)  # what the fused backward kernel reads
        out, lse = interval_attention(q, k, v, *call.intervals, call.scale)
        ctx.save_for_backward(q, k, v, out, lse)
        ctx.call = call
        return out, lse

    @staticmethod
    def backward(ctx, dout, dlse):
        q, k, v, out, lse = ctx.saved_tensors
        raw = lse.masked_fill(torch.isneginf(lse), 0.0)  # what the fused backward expects on rows that see no key
        run = run_for(ctx.call)
        needs = (*ctx.needs_input_grad[:3], False)
        dq, dk, dv, _ = run.backward(dout, dlse, q, k, v, None, out, raw, needs)
        return dq, dk, dv, None


def native(call: Call):
    """The `native` backend (see the module docstring)."""
    out, lse = _NativeAttention.apply(call.q, call.k, call.v, call)
    weights = None
    if call.return_weights:
        with torch.no_grad():
            weights = chunked_weights.weights(run_for(call), call.q, call.k, None, lse.detach())
    return out, weights, lse if call.return_lse else None
