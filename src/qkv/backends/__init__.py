"""Attention backends: a registry of functions and what each supports.

>>> import qkv
>>> sorted(qkv.backends.available())
['chunked', 'eager', 'flex', 'native', 'sdpa']

One module or package per backend:

- ``eager`` (`eager.py`): the reference; materialises the scores; any dtype, float64 included.
- ``sdpa`` (`sdpa.py`): ``torch.nn.functional.scaled_dot_product_attention``.
- ``chunked`` (`chunked/`): tiles of query rows visiting only the keys the mask
  leaves visible; memory O(Tq * tile); forward, backward, weights, top-k weights.
- ``native`` (`native/`): qkv's CPU kernel for masks whose rows each see one key
  interval (causal, windows, documents, padding, prefix-LM), float32/64; backward
  and weights by chunked's tiles.
- ``flex`` (`flex.py`): compiled FlexAttention where the torch build and device support it.

`registry` holds `Call` (one validated call, with its query positions and tile
plan computed once) and `register`; `kernels` the tile math eager and chunked
share. ``backend="auto"`` picks, once per call, the fastest backend that
supports it (see :func:`choose`). ``register(name, fn, **capabilities)`` adds one.
"""

from __future__ import annotations

from . import chunked, eager, flex, native, sdpa
from .registry import ALL_DTYPES, Backend, Call, Capabilities, available, get, names, register, unregister

__all__ = ["Capabilities", "Call", "Backend", "register", "unregister", "get", "available", "names", "choose",
           "select"]

_EVERYTHING = dict(masks=True, score_mod=True, bias=True, dropout=True, weights=True, lse=True, backward=True)
register("eager", eager.eager, takes_call=True, **_EVERYTHING, notes="reference; O(Tq*Tk) memory")
register("chunked", chunked.chunked, takes_call=True, **_EVERYTHING,
         notes="skips empty tiles; O(Tq*tile) memory; weights by a second pass")
register("native", native.native, takes_call=True, check=native.check, masks=True, weights=True, lse=True,
         backward=True, dtypes=(*native.DTYPES, ALL_DTYPES[1]), devices=("cpu",),  # bfloat16: AVX-512 BF16 CPUs
         available=lambda: (native.available(), "" if native.available() else native.status()),
         notes="CPU kernel for a few key intervals per row (causal, windows, documents, padding, prefix-LM, "
               "window | global tokens, block-sparse), forward and backward; weights by chunked's tiles")
register("sdpa", sdpa.sdpa, takes_call=True, bias=True, dropout=True, backward=True,
         notes="torch SDPA; structured masks are materialised")
register(
    "flex", flex.flex, check=flex.check, score_mod=True, bias=True, lse=True, backward=True,
    dtypes=(ALL_DTYPES[0], ALL_DTYPES[1], ALL_DTYPES[2]), devices=("cpu", "cuda"),
    available=not flex.UNAVAILABLE, reason=flex.UNAVAILABLE,
    notes="compiled FlexAttention; CPU: inference only, no lse; first call per shape compiles",
)

_TINY = 1 << 14  # below this many scores per call, one eager pass beats any tiling
_DENSE_MASK_LIMIT = 1 << 27  # largest dense bool mask auto hands to SDPA
_SKIP_WORTHWHILE = 0.85  # auto tiles when the plan visits at most this share of the scores


def _tiled(call: Call) -> str:
    """The tiling backend for a call: the native kernel where its check passes, else chunked."""
    return "native" if not get("native").missing(call) else "chunked"


def choose(call: Call) -> tuple[str, Call]:
    """The backend ``auto`` uses for `call`, and the call as that backend should see it.

    Decided once, here, from the backends' declared capabilities and the mask's
    structure: SDPA serves dense and aligned-causal calls (its fused kernels are
    the fastest there); masks that leave tiles empty (work is skipped), long rows
    whose dense mask would not fit, weights, log-sum-exp and score mods are
    tiled, by `native` where the mask gives a few key intervals per row and the call
    has no score mod, bias or dropout, else by `chunked`; `eager` serves tiny
    calls with extras. A mask whose plan shows every key visible is dropped.
    """
    B, Hq, Hkv, Tq, Tk, D, Dv = call.shape
    if Tq == 0 or Tk == 0:
        return "eager", call
    extras = call.return_weights or call.return_lse or call.score_mod is not None
    if extras:
        return ("eager" if B * Hq * Tq * Tk <= _TINY else _tiled(call)), call
    mask = call.mask
    if mask is None or mask.is_tensor:
        return "sdpa", call
    if mask.is_causal and call.q_offset == 0:
        return "sdpa", call
    plan = call.plan
    if plan.unmasked_dense:
        return "sdpa", call.replace(mask=None)
    if plan.density <= _SKIP_WORTHWHILE or B * Hq * Tq * Tk > _DENSE_MASK_LIMIT:
        return _tiled(call), call
    return "sdpa", call


def select(call: Call, backend: str) -> tuple[Backend, Call]:
    """Resolve ``backend`` (a name or "auto") for `call`, raising a clear error if it cannot serve it."""
    if not isinstance(backend, str):
        raise TypeError(f"backend must be a string such as 'auto' or 'sdpa', got {type(backend).__name__}")
    if backend == "auto":
        name, call = choose(call)
        b = get(name)
        if b.missing(call):  # e.g. a dtype the fast path lacks: fall back to the reference tiles
            b = get("chunked")
        return b, call
    b = get(backend)
    lacks = b.missing(call)
    if lacks:
        able = [n for n in names() if not get(n).missing(call)]
        raise ValueError(
            f"backend={backend!r} cannot serve this call: it lacks {', '.join(lacks)}. "
            f"Backends that can: {able or 'none'}; or use backend='auto'"
        )
    return b, call
