"""The `flex` backend: `torch.nn.attention.flex_attention`, compiled.

Masks and score mods are handed over as FlexAttention's ``mask_mod`` and
``score_mod`` (shifted to absolute query positions); the block mask is built
once per mask, shape and device and kept beside the call's plans (the registry's
weak per-mask cache), never on the mask object. On CPU, compiled
FlexAttention is inference-only and cannot return the log-sum-exp, and calls
whose inputs are not all finite (`kernels.fusable`) are computed by the
`chunked` backend, which follows qkv's rule for NaN and inf exactly.
"""

from __future__ import annotations

import logging

import torch

from . import chunked
from .kernels import fusable
from .registry import Call, plan_cache

log = logging.getLogger(__name__)

try:
    from torch.nn.attention.flex_attention import create_block_mask, flex_attention
except ImportError as e:  # torch < 2.5
    create_block_mask = flex_attention = None
    UNAVAILABLE = f"torch {torch.__version__} has no FlexAttention ({e})"
else:
    UNAVAILABLE = ""

_compiled = None


def compiled_flex_attention():
    """`flex_attention` under `torch.compile`, compiled once per process (what users of FlexAttention call)."""
    global _compiled
    if _compiled is None:
        _compiled = torch.compile(flex_attention, dynamic=False)
    return _compiled


def check(call) -> str | None:
    """Refuse what FlexAttention cannot do on this device."""
    if call.q.device.type == "cpu":
        if call.needs_grad:
            return "backward on CPU (FlexAttention has no CPU backward)"
        if call.return_lse:
            return "return_lse=True on CPU (compiled FlexAttention on CPU does not return it)"
    if call.bias is not None and call.bias.requires_grad:
        return "bias that requires grad"
    return None


def _mask_mod(mask, q_offset, tq, tk):
    # Compiled kernels evaluate mask_mod on block-padded indices too; functions that index tables
    # (attention-gym's Flamingo mask) must only ever see real positions.
    def mask_mod(b, h, q_idx, kv_idx):
        inside = (q_idx < tq) & (kv_idx < tk)
        return inside & mask(b, h, q_idx.clamp(max=tq - 1) + q_offset, kv_idx.clamp(max=tk - 1))

    return mask_mod


def _block_mask(mask, q_offset, B, H, Tq, Tk, device):
    if mask is None:
        return None
    cache = plan_cache(mask)
    if cache is None:
        return create_block_mask(_mask_mod(mask, q_offset, Tq, Tk), B, H, Tq, Tk, device=device)
    key = ("flex block mask", q_offset, B, H, Tq, Tk, str(device))
    if key not in cache:
        if len(cache) >= 12:
            cache.pop(next(iter(cache)))
        cache[key] = create_block_mask(_mask_mod(mask, q_offset, Tq, Tk), B, H, Tq, Tk, device=device)
    return cache[key]


def flex(q, k, v, *, mask, score_mod, bias, scale, q_offset, dropout_p, return_weights, return_lse):
    if q.device.type == "cpu" and not fusable(q, k, v, bias, scale):
        return chunked.chunked(Call(q, k, v, mask=mask, score_mod=score_mod, bias=bias, scale=scale,
                                    q_offset=q_offset, dropout_p=dropout_p, return_weights=return_weights,
                                    return_lse=return_lse))
    B, Hq, Tq = q.shape[:3]
    Tk = k.shape[2]
    block_mask = _block_mask(mask, q_offset, B, Hq, Tq, Tk, q.device)
    mod = None
    if score_mod is not None or bias is not None:
        bias4 = None if bias is None else bias.expand(B, Hq, Tq, Tk)

        def mod(score, b, h, q_idx, kv_idx):
            q_idx, kv_idx = q_idx.clamp(max=Tq - 1), kv_idx.clamp(max=Tk - 1)  # padded blocks: real positions only
            if score_mod is not None:
                score = score_mod(score, b, h, q_idx + q_offset, kv_idx).to(score.dtype)
                # FlexAttention's CPU kernels return 0 for some rows with a NaN score; a +inf score makes
                # the row NaN in every kernel (exp(inf - inf)), which is qkv's rule for both.
                score = torch.where(torch.isnan(score), float("inf"), score)
            if bias4 is not None:
                score = score + bias4[b, h, q_idx, kv_idx].to(score.dtype)
            return score

    kwargs = dict(score_mod=mod, block_mask=block_mask, scale=scale, enable_gqa=Hq != k.shape[1], return_lse=return_lse)
    try:
        result = compiled_flex_attention()(q, k, v, **kwargs)
    except Exception as e:  # noqa: BLE001 - compiler failures only; anything else is re-raised
        if not (type(e).__module__.startswith("torch._") or "torchinductor" in str(e)):
            raise
        # Some captured tensors in mask/score functions do not lower on every device (e.g. CPU), and
        # the CPU kernels bound-check table lookups in mask functions against the wrong size
        # (attention-gym's Flamingo mask); FlexAttention's uncompiled path computes the same result, slowly.
        log.warning("compiled FlexAttention failed (%s); using its uncompiled path for this call", type(e).__name__)
        result = flex_attention(q, k, v, **kwargs)
    if return_lse:
        out, lse = result
        return out, None, lse
    return result, None, None
