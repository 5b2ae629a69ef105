"""The `chunked` backend: tiles of query rows, each visiting only the keys its mask leaves visible.

Forward runs one kernel call per tile over that tile's visible keys, so memory
is O(Tq * tile) and work is proportional to the visible area. Backward is a
custom autograd function that recomputes per tile from the saved output and
log-sum-exp (as FlashAttention does, arXiv:2205.14135) and adds key/value
gradients in place, so nothing the size of the score matrix is ever held.
Probabilities (`return_weights`, `attention_weights`) come from a second pass
per tile, exact because each tile sees all visible keys of its rows at once.

Files: `plan` (which keys each tile visits, bands of equal tiles), `run`
(per-tile pieces and the order of the passes), `fused` (bands and tiles on
PyTorch's fused CPU flash kernel), `tiles` (`math_attention` per row chunk, for
score mods, dropout, bias gradients and other devices), `weights` (the
probabilities pass).
"""

from __future__ import annotations

import torch

from ..kernels import unit_stride
from ..registry import Call
from . import weights as _weights
from .plan import Plan, plan_for
from .run import Run

__all__ = ["chunked", "run_for", "Run", "Plan", "plan_for", "weights_of", "stream_of"]


def run_for(call: Call, need_lse: bool = True) -> Run:
    """The `Run` of a validated call: its plan (computed once, `Call.plan`), positions and options."""
    B, Hq = call.q.shape[:2]
    return Run(call.plan, call.mask, call.score_mod, call.scale, call.q_pos, B, Hq, call.dropout_p, need_lse=need_lse)


class _ChunkedAttention(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, k, v, bias, run: Run):
        ctx.set_materialize_grads(False)
        q, k, v = unit_stride(q), unit_stride(k), unit_stride(v)
        out, raw, lse = run.forward(q, k, v, bias)
        ctx.save_for_backward(q, k, v, bias, out, raw)
        ctx.run = run
        return out, lse

    @staticmethod
    def backward(ctx, dout, dlse):
        q, k, v, bias, out, raw = ctx.saved_tensors
        needs = ctx.needs_input_grad[:4]
        dq, dk, dv, dbias = ctx.run.backward(dout, dlse, q, k, v, bias, out, raw, needs)
        return dq, dk, dv, dbias, None


def chunked(call: Call):
    """The `chunked` backend: see the module docstring."""
    run = run_for(call, need_lse=call.return_lse or call.return_weights)
    out, lse = _ChunkedAttention.apply(call.q, call.k, call.v, call.bias, run)
    weights = None
    if call.return_weights:
        with torch.no_grad():
            weights = _weights.weights(run, call.q, call.k, call.bias, lse.detach())
    return out, weights, lse if call.return_lse else None


def weights_of(call: Call, topk: int | None = None):
    """Probabilities of a validated call's rows (dense, or top-k), without the full matrix in memory."""
    with torch.no_grad():
        return _weights.weights(run_for(call), call.q, call.k, call.bias, topk=topk)


def stream_of(call: Call, fn) -> None:
    """Exact probabilities tile by tile: ``fn(r0, r1, key_positions, p (B, Hq, r1 - r0, W))``; memory O(tile x Tk)."""
    with torch.no_grad():
        _weights.stream(run_for(call), call.q, call.k, call.bias, None, fn)
