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
Non-finite inputs follow the rule `qkv.attention` documents: `math_attention`
implements it for any input; `fusable` says when the fused kernels (whose
NaN handling varies by path and size) may serve a call.
"""

from __future__ import annotations

import math

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
    """Softmax probabilities from scores and their saved log-sum-exp; 0 on rows that see no key and at keys
    that do not reach a row (NaN rows, whose lse is NaN, are NaN only at the keys that reach them)."""
    p = torch.exp(s - torch.where(torch.isneginf(lse), 0.0, lse).unsqueeze(-1).to(s.dtype))
    return p.masked_fill(torch.isneginf(s), 0.0) if _maybe(torch.isnan(lse)) else p


def _maybe(flags: torch.Tensor) -> bool:
    """Whether any flag may be set: exact on the CPU, where reading it is free; always True elsewhere
    (no host sync: the work it guards is then always done, with torch.where, instead of skipped)."""
    return flags.device.type != "cpu" or bool(flags.any())


def maybe_nonfinite(*ts: torch.Tensor) -> bool:
    """Whether any of the tensors may hold NaN or inf (on the CPU: a sum each, NaN or inf if one does)."""
    if ts[0].device.type != "cpu":
        return True
    return not all(bool(torch.isfinite(t.sum())) for t in ts if t is not None)


def _hide_unseen(q, k, v, mask):
    """Zero the query rows that see no key and the keys that no row sees. The result is unchanged (the mask
    hides them), but their values can no longer reach a gradient through ``0 * NaN`` in the matmuls."""
    Hq, Hkv = q.shape[1], k.shape[1]
    mask = mask.view(*([1] * (4 - mask.dim())), *mask.shape)
    q = q.masked_fill(~mask.any(-1, keepdim=True), 0.0)
    seen = mask.any(-2)  # (B', H', W)
    if seen.shape[1] == Hq and Hq != Hkv:
        seen = seen.view(seen.shape[0], Hkv, Hq // Hkv, -1).any(2)  # a kv head is seen if any of its q heads sees it
    k = k.masked_fill(~seen.unsqueeze(-1), 0.0)
    v = None if v is None else v.masked_fill(~seen.unsqueeze(-1), 0.0)
    return q, k, v


def fusable(q, k, v, bias, scale: float) -> bool:
    """Whether PyTorch's fused kernels may serve a call: q, k, v finite, no NaN or +inf in ``bias`` (-inf
    masks) and no score that can overflow. Their handling of NaN differs by path and size (a NaN query row
    comes back 0 from some, a hidden NaN value leaks into rows that do not see it), so other calls go to
    `math_attention`. One reduction per tensor, read on the host: callers ask on the CPU only."""
    if q.numel() == 0 or k.numel() == 0:
        return True
    # |q_i . k_j| <= |q| |k| (Frobenius norms, Cauchy-Schwarz): finite norms below the limit mean finite
    # inputs and no overflowing score; a NaN anywhere makes its norm or sum NaN.
    acc = accumulation_dtype(q.dtype)
    parts = [torch.linalg.vector_norm(q, dtype=acc), torch.linalg.vector_norm(k, dtype=acc), v.sum(dtype=acc)]
    if bias is not None and bias.numel():
        parts.append(bias.amax().to(acc))
    norm_q, norm_k, sum_v, *top_bias = torch.stack(parts).tolist()
    top_bias = top_bias[0] if top_bias else 0.0
    if not (math.isfinite(sum_v) and top_bias < math.inf):  # False for NaN too
        return False
    bound = abs(scale) * norm_q * norm_k + max(top_bias, 0.0)  # no |score| exceeds this
    limit = torch.finfo(acc).max / 4
    return bound < limit


def fusable_query(q, bias) -> bool:
    """The part of `fusable` a fused call cannot show in its output: q finite (a NaN query row comes back 0
    from some kernels) and no NaN or +inf in ``bias``. Keys and values are judged afterwards by
    `finite_output`: a non-finite key or value, or an overflowing score, that reaches any row makes the
    output non-finite, and the call is then computed again by the exact path. This reads only q (and
    the bias), where `fusable` reads the whole key/value cache: what a decoding step needs."""
    if q.numel() == 0:
        return True
    acc = accumulation_dtype(q.dtype)
    parts = [q.sum(dtype=acc)]  # NaN or inf iff some element is (or, rarely, the sum overflows: exact path)
    if bias is not None and bias.numel():
        parts.append(bias.amax().to(acc))
    values = torch.stack(parts).tolist()
    return math.isfinite(values[0]) and (len(values) == 1 or values[1] < math.inf)


def finite_output(out: torch.Tensor) -> bool:
    """Whether `out` is all finite, from one read of it: its sum is NaN or inf iff some element is (or when
    the sum of finite values overflows; the caller then takes the exact path, which is only slower)."""
    return out.numel() == 0 or math.isfinite(out.sum(dtype=accumulation_dtype(out.dtype)).item())


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
    finite: bool = False,
):
    """Reference softmax attention.

    q (B, Hq, r, D), k (B, Hkv, W, D), v (B, Hkv, W, Dv) or None; q_pos (r,) and
    k_pos (W,) absolute positions; mask bool and bias float, both broadcastable
    to (B, Hq, r, W). Returns ``(out (B, Hq, r, Dv) or None, lse (B, Hq, r),
    weights (B, Hq, r, W) or None)``; weights are pre-dropout probabilities.
    ``finite=True``: the caller knows q, k, v hold no NaN or inf (skips the checks).

    Non-finite inputs (see `qkv.attention`): a key reaches row i when the mask shows
    it and its score is not -inf. A NaN or +inf score among them makes lse NaN and
    the weights NaN at those keys; a non-finite value among them makes the output
    row NaN; rows that no key reaches give 0 whatever q, k, v hold.
    """
    B, Hq, r, _ = q.shape
    Hkv, W = k.shape[1], k.shape[2]
    grad = torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in (q, k, v))
    if mask is not None and grad and not finite and maybe_nonfinite(q, k, v):
        q, k, v = _hide_unseen(q, k, v, mask)
    s = scores(q, k, scale=scale, q_pos=q_pos, k_pos=k_pos, mask=mask, bias=bias, score_mod=score_mod)
    if W:
        top = s.detach().amax(-1, keepdim=True)  # NaN or +inf where such a score reaches the row
    else:
        top = s.new_full((B, Hq, r, 1), NEG_INF)
    empty = top == NEG_INF  # no key reaches the row
    p = torch.exp(s - top.masked_fill(empty, 0.0))  # empty rows: exp(-inf - 0) = 0; NaN rows: NaN
    total = p.sum(-1, keepdim=True)
    safe = total.masked_fill(empty, 1.0)
    lse = torch.where(empty, NEG_INF, top + torch.log(safe)).squeeze(-1)
    p = p / safe
    if _maybe(torch.isnan(top) | torch.isposinf(top)):
        p = p.masked_fill(torch.isneginf(s), 0.0)  # a NaN row is NaN only at the keys that reach it
    weights = p if need_weights else None  # float32 for half inputs; the tensor `out` is computed from
    out = None
    if v is not None:
        G, Dv = Hq // Hkv, v.shape[-1]
        hit = None
        if not finite and maybe_nonfinite(v):
            ok = torch.isfinite(v)
            bad = ~ok.all(-1)  # (B, Hkv, W) keys whose value holds NaN or inf
            v = torch.where(ok, v, 0.0)  # a p = 0 times a NaN value must not reach rows it does not
            reached = ~torch.isneginf(s).view(B, Hkv, G, r, W) & bad[:, :, None, None, :]
            hit = reached.any(-1, keepdim=True).view(B, Hq, r, 1)  # rows a non-finite value reaches
        if dropout_p > 0.0:
            keep = torch.rand(p.shape, generator=generator, device=p.device, dtype=p.dtype) >= dropout_p
            p = p * keep / (1.0 - dropout_p)
        out = torch.matmul(p.view(B, Hkv, G, r, W), v.to(p.dtype).unsqueeze(2)).view(B, Hq, r, Dv)
        if hit is not None:
            out = out.masked_fill(hit, math.nan)
        out = out.to(q.dtype)
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
