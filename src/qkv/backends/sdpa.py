"""The `sdpa` backend: `torch.nn.functional.scaled_dot_product_attention`.

Aligned causal masks (``q_offset == 0``, SDPA's top-left ``is_causal``) go to its
causal kernels; other masks are materialised as a bool tensor (a stored tensor
mask as it is) and combined with a bias as an additive mask.

SDPA's CPU kernels treat NaN and inf by path and size (a NaN query row comes
back 0 from some; a NaN value hidden from a row leaks into it through
``0 * NaN``), so on the CPU a call whose query or bias is not finite
(`kernels.fusable_query`), or whose output comes back non-finite (a bad key,
value or score reached a row), is computed by the `chunked` backend instead,
which follows qkv's rule for them exactly. Checking the output rather than the
keys and values keeps a decoding step from reading its whole KV cache twice.
"""

from __future__ import annotations

import torch.nn.functional as F

from . import chunked
from .kernels import finite_output, fusable_query
from .registry import Call


def sdpa(call: Call):
    q, k, v, mask, bias = call.q, call.k, call.v, call.mask, call.bias
    cpu = q.device.type == "cpu"
    if cpu and not fusable_query(q, bias):
        return chunked.chunked(call)
    B, Hq, Tq = q.shape[:3]
    Tk = k.shape[2]
    is_causal = False
    dense = None
    if mask is not None:
        if mask.is_causal and call.q_offset == 0 and bias is None:
            is_causal = True  # SDPA's is_causal is top-left aligned: query i sees keys <= i
        else:
            dense = mask.dense(call.q_pos, Tk, B, Hq)
    attn_mask = dense
    if bias is not None:
        attn_mask = bias.to(q.dtype)
        if dense is not None:
            attn_mask = attn_mask.masked_fill(~dense, float("-inf"))
    out = F.scaled_dot_product_attention(
        q, k, v, attn_mask=attn_mask, dropout_p=call.dropout_p, is_causal=is_causal, scale=call.scale,
        enable_gqa=q.shape[1] != k.shape[1],
    )
    if cpu and not finite_output(out):  # a non-finite key, value or score reached some row: the exact rule
        return chunked.chunked(call)
    if dense is not None and q.device.type != "cpu":
        out = out.masked_fill(~dense.any(-1, keepdim=True), 0.0)  # not every GPU kernel zeroes empty rows
    return out, None, None
