"""The `eager` (reference) and `sdpa` backends."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from ..masks._library import Causal
from ._kernels import math_attention


def _q_pos(q: torch.Tensor, q_offset: int) -> torch.Tensor:
    return torch.arange(q.shape[2], device=q.device) + q_offset


def eager(q, k, v, *, mask, score_mod, bias, scale, q_offset, dropout_p, return_weights, return_lse):
    """Reference: materialise the scores, softmax, weight the values. Any dtype, float64 included."""
    B, Hq, Tq = q.shape[:3]
    Tk = k.shape[2]
    q_pos = _q_pos(q, q_offset)
    dense = None if mask is None else mask._dense(q_pos, Tk, B, Hq)
    out, lse, weights = math_attention(
        q, k, v, scale=scale, q_pos=q_pos, k_pos=torch.arange(Tk, device=q.device), mask=dense,
        bias=bias, score_mod=score_mod, dropout_p=dropout_p, need_weights=return_weights,
    )
    return out, weights, lse if return_lse else None


def sdpa(q, k, v, *, mask, score_mod, bias, scale, q_offset, dropout_p, return_weights, return_lse):
    """`torch.nn.functional.scaled_dot_product_attention`; structured masks other than aligned causal are materialised."""
    B, Hq, Tq = q.shape[:3]
    Tk = k.shape[2]
    is_causal = False
    dense = None
    if mask is not None:
        if isinstance(mask, Causal) and q_offset == 0 and bias is None:
            is_causal = True  # SDPA's is_causal is top-left aligned: query i sees keys <= i
        else:
            dense = mask._dense(_q_pos(q, q_offset), Tk, B, Hq)
    attn_mask = dense
    if bias is not None:
        attn_mask = bias.to(q.dtype)
        if dense is not None:
            attn_mask = attn_mask.masked_fill(~dense, float("-inf"))
    out = F.scaled_dot_product_attention(
        q, k, v, attn_mask=attn_mask, dropout_p=dropout_p, is_causal=is_causal, scale=scale,
        enable_gqa=q.shape[1] != k.shape[1],
    )
    if dense is not None and q.device.type != "cpu":
        out = out.masked_fill(~dense.any(-1, keepdim=True), 0.0)  # not every GPU kernel zeroes empty rows
    return out, None, None
