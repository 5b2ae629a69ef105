"""The `eager` backend: the reference. Materialises the scores; any dtype (float64 included), device, mask,
score mod, bias, dropout; weights and log-sum-exp; differentiable by autograd."""

from __future__ import annotations

import torch

from .registry import Call
from .kernels import math_attention


def eager(call: Call):
    """Materialise the scores, softmax, weight the values."""
    B, Hq, Tq = call.q.shape[:3]
    Tk = call.k.shape[2]
    dense = None if call.mask is None else call.mask.dense(call.q_pos, Tk, B, Hq)
    out, lse, weights = math_attention(
        call.q, call.k, call.v, scale=call.scale, q_pos=call.q_pos, k_pos=torch.arange(Tk, device=call.q.device),
        mask=dense, bias=call.bias, score_mod=call.score_mod, dropout_p=call.dropout_p,
        need_weights=call.return_weights,
    )
    return out, weights, lse if call.return_lse else None
