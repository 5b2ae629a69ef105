"""The functional core: `attention` and `attention_weights`.

Inputs are validated once, here, and every error names the argument, what was
seen and the fix. Backends then receive normalised arguments (see
`qkv.backends`).
"""

from __future__ import annotations

import math
import numbers
from collections.abc import Callable, Sequence

import torch

from . import backends
from .backends import chunked as _chunked
from .backends.registry import Call
from .masks import Mask, as_mask


def attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    *,
    mask=None,
    score_mod: Callable | None = None,
    bias: torch.Tensor | None = None,
    scale: float | None = None,
    q_offset: int | None = None,
    dropout_p: float = 0.0,
    backend: str = "auto",
    return_weights: bool = False,
    return_lse: bool = False,
):
    """Scaled dot-product attention with any mask, on any backend.

    Args:
        q: (B, Hq, Tq, D) queries.
        k: (B, Hkv, Tk, D) keys; ``Hq % Hkv == 0`` (grouped-query / multi-query attention).
        v: (B, Hkv, Tk, Dv) values.
        mask: None, a `qkv.masks.Mask`, a function ``fn(b, h, q_pos, k_pos) -> bool tensor``,
            or a bool tensor broadcastable to (B, Hq, Tq, Tk). True = may attend.
        score_mod: ``fn(score, b, h, q_pos, k_pos) -> score``, applied to the scaled scores.
        bias: float tensor broadcastable to (B, Hq, Tq, Tk), added after ``score_mod``.
        scale: multiplies ``q . k``; default ``1 / sqrt(D)``.
        q_offset: absolute position of query row 0; default ``Tk - Tq`` (bottom-right
            alignment, so a decoding step with a KV cache needs no special case).
        dropout_p: dropout on the probabilities, in [0, 1). Applied whenever > 0.
        backend: "auto" or a registered name (``qkv.backends.available()``).
        return_weights: also return the probabilities (B, Hq, Tq, Tk), before dropout (float32 for
            half-precision inputs, as the softmax is computed in it).
        return_lse: also return the log-sum-exp of the scores (B, Hq, Tq), last.

    Returns:
        ``out`` (B, Hq, Tq, Dv), or a tuple ``(out, weights?, lse?)``. A query row
        with no visible key gets output 0, weights 0, lse -inf and gradient 0.
        ``out`` and ``lse`` are differentiable on every backend that supports
        backward; ``weights`` carry gradients on ``eager`` only.

    NaN and inf, the same on every backend and in `attention_weights` / `stream_weights`:
    the keys that *reach* query row i are those the mask shows it whose score (after
    ``scale``, ``score_mod`` and ``bias``) is not -inf; a -inf bias or score is masking.

    - No key reaches row i: output 0, weights 0, lse -inf, gradient 0, whatever q_i or
      the hidden k_j, v_j hold.
    - A NaN or +inf score reaches it (NaN/inf in q_i or k_j, a NaN or +inf bias, a
      score_mod returning NaN, ``scale * q.k`` overflowing): output row NaN, lse NaN,
      weights NaN at the keys that reach it and 0 at the others.
    - A NaN or inf value v_j of a key that reaches it: output row NaN (weights and lse,
      which do not depend on v, stay exact).
    - Every other row is finite and exact. ``scale`` must be finite and within q's dtype
      (ValueError otherwise).
    - Gradients: a row that no key reaches and a key that no row sees get gradient 0
      and change no other gradient; a non-finite entry that does reach a row may make
      gradients of its head non-finite (``0 * NaN`` in the backward matmuls).

    On the CPU, ``sdpa`` and ``flex`` send calls whose inputs are not all finite to
    ``chunked`` (one reduction per tensor decides); on CUDA they run PyTorch's kernels
    as they are, so use ``eager`` or ``chunked`` there where NaN inputs matter.
    """
    call = prepare(q, k, v, mask=mask, score_mod=score_mod, bias=bias, scale=scale, q_offset=q_offset,
                   dropout_p=dropout_p, return_weights=return_weights, return_lse=return_lse)
    return run(call, backend)


def run(call: Call, backend: str = "auto"):
    """Execute a prepared call on ``backend``: what `attention` returns."""
    impl, call = backends.select(call, backend)
    B, Hq, Hkv, Tq, Tk, D, Dv = call.shape
    if Tq == 0 or Tk == 0:
        impl = backends.get("eager")  # empty inputs are valid; the reference handles them exactly
    out, weights, lse = impl.run(call)
    if not (call.return_weights or call.return_lse):
        return out
    result = [out]
    if call.return_weights:
        result.append(weights)
    if call.return_lse:
        result.append(lse)
    return tuple(result)


def attention_weights(
    q: torch.Tensor,
    k: torch.Tensor,
    *,
    mask=None,
    score_mod: Callable | None = None,
    bias: torch.Tensor | None = None,
    scale: float | None = None,
    q_offset: int | None = None,
    rows: Sequence[int] | torch.Tensor | None = None,
    topk: int | None = None,
):
    """Exact attention probabilities without the Tq x Tk matrix in memory.

    Same arguments and semantics as `attention` (no values needed). Memory is
    O(tile x Tk) beyond the result.

    Args:
        rows: query row indices; returns (B, Hq, len(rows), Tk).
        topk: keep the k largest probabilities per row; returns ``(values, indices)``
            of shape (B, Hq, Tq, topk) (or ``len(rows)``). Where a row has fewer than
            ``topk`` visible keys the extra entries have value 0 and index -1; a row that a
            NaN or +inf score reaches has NaN values, at keys that reach it (see `attention`).

    Returns:
        (B, Hq, Tq, Tk) probabilities, or as above. Not differentiable.
    """
    v = k.new_empty(*k.shape[:3], 0) if isinstance(k, torch.Tensor) and k.dim() == 4 else k
    call = prepare(q, k, v, mask=mask, score_mod=score_mod, bias=bias, scale=scale, q_offset=q_offset,
                     dropout_p=0.0, return_weights=True, return_lse=False)
    B, Hq, Hkv, Tq, Tk, D, Dv = call.shape
    if topk is not None and (isinstance(topk, bool) or not isinstance(topk, int) or not 1 <= topk <= max(Tk, 1)):
        raise ValueError(f"topk must be an int in [1, Tk={Tk}], got {topk!r}")
    if rows is not None:
        idx = _rows(rows, Tq, q.device)
        bias4 = call.bias
        if bias4 is not None and bias4.shape[-2] > 1:
            bias4 = bias4.index_select(-2, idx)
        call = call.replace(q=q.index_select(2, idx), bias=bias4, rows=idx)
    return _chunked.weights_of(call, topk=topk)


def stream_weights(q: torch.Tensor, k: torch.Tensor, fn: Callable, *, mask=None, score_mod: Callable | None = None,
                   bias: torch.Tensor | None = None, scale: float | None = None, q_offset: int | None = None) -> None:
    """The exact probabilities, tile by tile, for reductions of your own (top-k, head means, sums...).

    Calls ``fn(r0, r1, key_index (W,), p (B, Hq, r1 - r0, W))``: rows ``r0:r1`` attend
    to keys ``key_index`` with probabilities ``p``; keys not listed get 0. Rows never
    passed to ``fn`` see no key. Memory O(tile x Tk); arguments as `attention`.
    """
    v = k.new_empty(*k.shape[:3], 0) if isinstance(k, torch.Tensor) and k.dim() == 4 else k
    call = prepare(q, k, v, mask=mask, score_mod=score_mod, bias=bias, scale=scale, q_offset=q_offset,
                     dropout_p=0.0, return_weights=True, return_lse=False)
    stream_call(call, fn)


def stream_call(call: Call, fn: Callable) -> None:
    """`stream_weights` for a call `prepare` validated (its plan is reused, not rebuilt)."""
    _chunked.stream_of(call, fn)


def _rows(rows, tq: int, device) -> torch.Tensor:
    idx = torch.as_tensor(rows, device=device)
    if idx.dim() == 0:
        idx = idx[None]
    if idx.dim() != 1 or idx.is_floating_point() or idx.dtype == torch.bool:
        raise ValueError(f"rows must be a 1-D sequence of query row indices, got {idx.dtype} of shape {tuple(idx.shape)}")
    idx = idx.long()
    if idx.numel() and (int(idx.min()) < -tq or int(idx.max()) >= tq):
        raise ValueError(f"rows must index query rows in [0, Tq={tq}), got range {int(idx.min())}..{int(idx.max())}")
    return torch.where(idx < 0, idx + tq, idx)


def _shape(t: torch.Tensor) -> tuple[int, ...]:
    return tuple(t.shape)


def prepare(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *, mask=None, score_mod: Callable | None = None,
            bias: torch.Tensor | None = None, scale: float | None = None, q_offset: int | None = None,
            dropout_p: float = 0.0, return_weights: bool = False, return_lse: bool = False) -> Call:
    """Validate an attention call once: the `qkv.backends.Call` that `run` executes and `stream_call` reads.

    Same arguments as `attention`; every error is raised here. The call carries its
    query positions and tile plan (computed on first use), so a layer that runs it
    and also reads its probabilities (`qkv.explain.capture`) checks and plans it once.
    """
    for name, t in (("q", q), ("k", k), ("v", v)):
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"{name} must be a torch.Tensor of shape (B, H, T, D), got {type(t).__name__}")
        if t.dim() != 4:
            raise ValueError(
                f"{name} must have 4 dims (B, H, T, D), got shape {_shape(t)}; "
                "add a batch dim with .unsqueeze(0), or move heads before time with .transpose(1, 2)"
            )
        if not t.is_floating_point():
            raise TypeError(f"{name} has dtype {t.dtype}; use float16, bfloat16, float32 or float64")
    if not (q.dtype == k.dtype == v.dtype):
        raise TypeError(f"q, k, v must share a dtype, got q {q.dtype}, k {k.dtype}, v {v.dtype}; cast with .to(q.dtype)")
    if not (q.device == k.device == v.device):
        raise ValueError(f"q, k, v must be on one device, got q {q.device}, k {k.device}, v {v.device}; move with .to(q.device)")
    B, Hq, Tq, D = q.shape
    if not (k.shape[0] == B and v.shape[0] == B):
        raise ValueError(f"batch sizes differ: q {_shape(q)}, k {_shape(k)}, v {_shape(v)}; dim 0 must match")
    if k.shape[1] != v.shape[1] or k.shape[2] != v.shape[2]:
        raise ValueError(f"k {_shape(k)} and v {_shape(v)} must agree in heads (dim 1) and length (dim 2)")
    if k.shape[3] != D:
        raise ValueError(f"head dims differ: q has D={D}, k has D={k.shape[3]}; q and k must share D (v may differ)")
    Hkv, Tk = k.shape[1], k.shape[2]
    if Hkv == 0 or Hq % Hkv:
        raise ValueError(
            f"q has {Hq} heads, not a multiple of k/v's {Hkv}; grouped-query attention needs "
            f"Hq % Hkv == 0 (choose Hkv among the divisors of {Hq})"
        )
    scale = _scale(scale, D, q.dtype)
    q_offset = _offset(q_offset, Tq, Tk)
    if isinstance(dropout_p, bool) or not isinstance(dropout_p, numbers.Real) or not 0.0 <= dropout_p < 1.0:
        raise ValueError(f"dropout_p must be a number in [0, 1), got {dropout_p!r}")
    if score_mod is not None and not callable(score_mod):
        raise TypeError(f"score_mod must be a function fn(score, b, h, q_pos, k_pos) -> score, got {type(score_mod).__name__}")
    for name, flag in (("return_weights", return_weights), ("return_lse", return_lse)):
        if not isinstance(flag, bool):
            raise TypeError(f"{name} must be a bool, got {type(flag).__name__}")
    mask = _mask(mask, q, B, Hq, Tq, Tk, q_offset)
    bias = _bias(bias, q, B, Hq, Tq, Tk)
    return Call(q, k, v, mask=mask, score_mod=score_mod, bias=bias, scale=scale, q_offset=q_offset,
                         dropout_p=float(dropout_p), return_weights=return_weights, return_lse=return_lse)


def _scale(scale, d: int, dtype: torch.dtype) -> float:
    if scale is None:
        return 1.0 / math.sqrt(d) if d else 1.0
    if isinstance(scale, torch.Tensor) and scale.numel() == 1:
        scale = scale.item()
    if isinstance(scale, bool) or not isinstance(scale, numbers.Real) or not math.isfinite(scale):
        raise TypeError(f"scale must be a finite number (default 1/sqrt(D)), got {scale!r}")
    largest = torch.finfo(dtype).max
    if abs(scale) > largest:  # it would become inf in the kernels: every score inf or NaN
        raise ValueError(
            f"scale={scale!r} overflows {dtype} (largest {largest:.4g}); pass a scale within that range "
            f"(default 1/sqrt(D) = {1.0 / math.sqrt(d) if d else 1.0:.4g}) or cast q, k, v to torch.float64"
        )
    return float(scale)


def _offset(q_offset, tq: int, tk: int) -> int:
    if q_offset is None:
        return tk - tq
    if isinstance(q_offset, torch.Tensor) and q_offset.numel() == 1 and not q_offset.is_floating_point():
        q_offset = int(q_offset.item())
    if isinstance(q_offset, bool) or not isinstance(q_offset, numbers.Integral):
        raise TypeError(f"q_offset must be an int (position of query row 0), got {q_offset!r}")
    return int(q_offset)


def _mask(mask, q, B, Hq, Tq, Tk, q_offset) -> Mask | None:
    if isinstance(mask, torch.Tensor):
        if mask.dtype != torch.bool:
            raise TypeError(
                f"mask has dtype {mask.dtype}; masks are bool with True = may attend. "
                "Use mask.bool(), or pass additive float values as bias="
            )
        if mask.device != q.device:
            raise ValueError(f"mask is on {mask.device} but q is on {q.device}; move it with .to(q.device)")
        if mask.dim() > 4 or any(s not in (1, t) for s, t in zip(mask.shape[::-1], (Tk, Tq, Hq, B))):
            raise ValueError(
                f"mask of shape {_shape(mask)} is not broadcastable to (B, Hq, Tq, Tk) = {(B, Hq, Tq, Tk)}; "
                "each dim must be 1 or match"
            )
    mask = as_mask(mask)
    if mask is None:
        return None
    mask = mask.bind(q_offset)
    if Tq and Tk:
        mask.check(q_offset, q_offset + Tq - 1, Tk, B, Hq)
    return mask


def _bias(bias, q, B, Hq, Tq, Tk) -> torch.Tensor | None:
    if bias is None:
        return None
    if not isinstance(bias, torch.Tensor):
        raise TypeError(f"bias must be a float tensor broadcastable to (B, Hq, Tq, Tk), got {type(bias).__name__}")
    if not bias.is_floating_point():
        raise TypeError(f"bias has dtype {bias.dtype}; it must be floating point (for a bool mask use mask=)")
    if bias.device != q.device:
        raise ValueError(f"bias is on {bias.device} but q is on {q.device}; move it with .to(q.device)")
    if bias.dim() > 4 or any(s not in (1, t) for s, t in zip(bias.shape[::-1], (Tk, Tq, Hq, B))):
        raise ValueError(
            f"bias of shape {_shape(bias)} is not broadcastable to (B, Hq, Tq, Tk) = {(B, Hq, Tq, Tk)}; "
            "each dim must be 1 or match"
        )
    return bias.view(*([1] * (4 - bias.dim())), *bias.shape)
