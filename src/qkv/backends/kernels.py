"""The two tile kernels every backend is built from.

- `math_attention`: softmax attention in plain torch ops. Any dtype (half
  precision accumulates in float32), device, score_mod, bias, dropout; returns
  the log-sum-exp and, on request, the probabilities. Autograd differentiates
  it. The `eager` backend is this kernel on the whole matrix; `chunked` runs it
  per tile when the fused kernel cannot serve the call.
- `flash_forward` / `flash_backward`: PyTorch's fused CPU flash-attention
  kernel (the one behind SDPA on CPU), called per tile with an additive mask,
  returning the log-sum-exp that the backward pass reuses.

Fully masked rows give output 0, log-sum-exp -inf and gradient 0 (never NaN).
"""

from __future__ import annotations

import torch

from ..masks import call_indexed, index_grid

_FLASH_FWD = getattr(torch.ops.aten, "_scaled_dot_product_flash_attention_for_cpu", None)
_FLASH_BWD = getattr(torch.ops.aten, "_scaled_dot_product_flash_attention_for_cpu_backward", None)
FLASH_DTYPES = (torch.float32, torch.float64, torch.bfloat16, torch.float16)
NEG_INF = float("-inf")


def accumulation_dtype(dtype: torch.dtype) -> torch.dtype:
    """Half-precision inputs are computed in float32; float32/64 in themselves."""
    return torch.float32 if dtype in (torch.float16, torch.bfloat16) else dtype


def scores(q, k, *, scale, q_pos, k_pos, mask=None, bias=None, score_mod=None) -> torch.Tensor:
    """Masked scores ``score_mod(scale * q . k) + bias`` (-inf where hidden), (B, Hq, r, W) in the accumulation dtype.

    q (B, Hq, r, D) and k (B, Hkv, W, D); grouped query heads share their kv head
    through broadcasting, without copying k.
    """
    B, Hq, r, D = q.shape
    Hkv, W = k.shape[1], k.shape[2]
    acc = accumulation_dtype(q.dtype)
    qa = q.to(acc).view(B, Hkv, Hq // Hkv, r, D)
    s = torch.matmul(qa, k.to(acc).unsqueeze(2).transpose(-1, -2)).view(B, Hq, r, W) * scale
    if score_mod is not None:
        s = _modified(score_mod, s, index_grid(B, Hq, q_pos, k_pos))
    if bias is not None:
        s = s + bias.to(acc)
    if mask is not None:
        s = s.masked_fill(~mask, NEG_INF)
    return s


def _modified(score_mod, s: torch.Tensor, grids) -> torch.Tensor:
    """``score_mod`` applied to the scores (FlexAttention's reading, see `call_indexed`), in the scores' dtype:
    a mod closing over a float64 table still gives float32 scores for float32 inputs."""
    out = call_indexed(score_mod, *grids, lead=(s,))
    if not isinstance(out, torch.Tensor) or not out.is_floating_point():
        raise TypeError(f"score_mod returned {type(out).__name__ if not isinstance(out, torch.Tensor) else out.dtype}; "
                        "it must return the modified float scores, e.g. `return score + bias[h]`")
    if out.shape != s.shape:
        out = torch.broadcast_to(out, s.shape)
    return out.to(s.dtype)


def probabilities(s: torch.Tensor, lse: torch.Tensor) -> torch.Tensor:
    """Softmax probabilities from scores and their saved log-sum-exp; 0 on rows that see no key."""
    return torch.exp(s - torch.where(torch.isneginf(lse), 0.0, lse).unsqueeze(-1).to(s.dtype))


def math_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor | None,
    *,
    scale: float,
    q_pos: torch.Tensor,
    k_pos: torch.Tensor,
    mask: torch.Tensor | None = None,
    bias: torch.Tensor | None = None,
    score_mod=None,
    dropout_p: float = 0.0,
    generator: torch.Generator | None = None,
    need_weights: bool = False,
):
    """Reference softmax attention.

    q (B, Hq, r, D), k (B, Hkv, W, D), v (B, Hkv, W, Dv) or None; q_pos (r,) and
    k_pos (W,) absolute positions; mask bool and bias float, both broadcastable
    to (B, Hq, r, W). Returns ``(out (B, Hq, r, Dv) or None, lse (B, Hq, r),
    weights (B, Hq, r, W) or None)``; weights are pre-dropout probabilities.
    """
    B, Hq, r, _ = q.shape
    Hkv, W = k.shape[1], k.shape[2]
    s = scores(q, k, scale=scale, q_pos=q_pos, k_pos=k_pos, mask=mask, bias=bias, score_mod=score_mod)
    if W:
        top = s.detach().amax(-1, keepdim=True)
        top = torch.where(torch.isfinite(top), top, 0.0)  # all-masked rows: exp(-inf - 0) = 0, no NaN
    else:
        top = s.new_zeros(B, Hq, r, 1)
    p = torch.exp(s - top)
    total = p.sum(-1, keepdim=True)
    live = total > 0
    safe = torch.where(live, total, 1.0)
    lse = torch.where(live, top + torch.log(safe), NEG_INF).squeeze(-1)
    p = p / safe
    weights = p if need_weights else None  # float32 for half inputs; the tensor `out` is computed from
    out = None
    if v is not None:
        if dropout_p > 0.0:
            keep = torch.rand(p.shape, generator=generator, device=p.device, dtype=p.dtype) >= dropout_p
            p = p * keep / (1.0 - dropout_p)
        G, Dv = Hq // Hkv, v.shape[-1]
        out = torch.matmul(p.view(B, Hkv, G, r, W), v.to(p.dtype).unsqueeze(2)).view(B, Hq, r, Dv).to(q.dtype)
    return out, lse, weights


def flash_available(q: torch.Tensor, v: torch.Tensor) -> bool:
    """Whether the fused CPU kernel can run this tile shape and dtype."""
    return (
        _FLASH_FWD is not None
        and _FLASH_BWD is not None
        and q.device.type == "cpu"
        and q.dtype in FLASH_DTYPES
        and q.shape[-1] == v.shape[-1]
    )


_GQA_NATIVE: bool | None = None


def _native_gqa() -> bool:
    """Whether this torch's fused CPU kernel handles Hq != Hkv itself (probed once on a tiny input)."""
    global _GQA_NATIVE
    if _GQA_NATIVE is None:
        try:
            g = torch.Generator().manual_seed(0)
            q, k, v = (torch.randn(1, h, 3, 4, generator=g, dtype=torch.float64) for h in (2, 1, 1))
            out, _ = _FLASH_FWD(q, k, v, 0.0, False)
            ref = torch.softmax(q @ k.transpose(-1, -2) / 2, -1) @ v
            _GQA_NATIVE = bool(torch.allclose(out, ref))
        except RuntimeError:
            _GQA_NATIVE = False
    return _GQA_NATIVE


def groups(q: torch.Tensor, k: torch.Tensor) -> int:
    """Query heads per kv head that must be folded into rows before the fused kernel (1 if it does GQA itself)."""
    g = q.shape[1] // k.shape[1]
    return 1 if g == 1 or _native_gqa() else g


def _fold(x: torch.Tensor, groups: int) -> torch.Tensor:
    """(B, Hkv*G, r, ...) -> (B, Hkv, G*r, ...): query heads sharing a kv head become extra rows."""
    if groups == 1:
        return x
    B, Hq, r = x.shape[:3]
    return x.reshape(B, Hq // groups, groups * r, *x.shape[3:])


def _unfold(x: torch.Tensor, groups: int) -> torch.Tensor:
    if groups == 1:
        return x
    B, Hkv, gr = x.shape[:3]
    return x.reshape(B, Hkv * groups, gr // groups, *x.shape[3:])


def _fold_mask(add: torch.Tensor | None, groups: int, q: torch.Tensor) -> torch.Tensor | None:
    if add is None or groups == 1:
        return add
    heads, rows = q.shape[1], q.shape[2]
    add = add.expand(*add.shape[:2], rows, add.shape[-1])
    if add.shape[1] == 1:  # same mask for every head: repeat it for each folded group
        return add.repeat(1, 1, groups, 1)
    return _fold(add.expand(add.shape[0], heads, *add.shape[2:]), groups)


def unit_stride(x: torch.Tensor) -> torch.Tensor:
    """The fused kernel reads features as contiguous runs: give it tensors whose last dim has stride 1."""
    return x if x.stride(-1) == 1 else x.contiguous()


def flash_forward(q, k, v, add: torch.Tensor | None, scale: float):
    """Fused forward on one tile. q (B, Hq, r, D), k/v (B, Hkv, W, D), add (B', H', r, W) additive float in q.dtype.

    Returns out (B, Hq, r, D) and the kernel's log-sum-exp (B, Hq, r), which is 0
    (not -inf) on fully masked rows; keep it as is for `flash_backward`.
    """
    G = groups(q, k)
    out, lse = _FLASH_FWD(_fold(q, G), k, v, 0.0, False, attn_mask=_fold_mask(add, G, q), scale=scale)
    return _unfold(out, G), _unfold(lse, G)


def flash_backward(dout, q, k, v, out, lse, add: torch.Tensor | None, scale: float):
    """Fused backward on one tile; returns (dq, dk, dv) with dk/dv summed over query-head groups."""
    G = groups(q, k)
    dq, dk, dv = _FLASH_BWD(
        _fold(dout.contiguous(), G), _fold(q, G), k, v, _fold(out, G), _fold(lse, G), 0.0, False,
        attn_mask=_fold_mask(add, G, q), scale=scale,
    )
    return _unfold(dq, G), dk, dv
