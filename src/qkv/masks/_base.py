"""The `Mask` protocol, tilings, and the combinators `&`, `|`, `~`.

A mask is a predicate over absolute positions: ``mask(b, h, q_pos, k_pos)``
returns a bool tensor, True where the query may attend to the key. Arguments
are integer tensors that broadcast against each other (as FlexAttention's
``mask_mod`` does under ``vmap``), so one definition serves dense evaluation,
tiles, and FlexAttention alike.

The mask protocol: what backends (and user-written masks) rely on. A mask
subclass must define ``__call__``; everything else has a correct default and
is overridden where a mask can say more, which is what lets a backend skip work:

- ``bind(q_offset) -> Mask``: the mask for a call whose query row 0 sits at
  ``q_offset`` (tensor masks resolve their row alignment here; others return
  themselves). `qkv.attention` binds once per call.
- ``check(q_min, q_max, tk, batch, heads)``: raise ValueError, naming the fix,
  when the mask cannot describe that call (a per-batch table of the wrong size).
- ``intervals(q_pos) -> (lo, hi) | None``: for masks where each query sees one
  contiguous key range ``lo <= k <= hi`` (causal, windows, documents, padding,
  prefix-LM, their intersections), the bounds per query row, each (B', Tq).
  Tile states and per-tile key ranges then follow exactly in ``O(Tq + tiles)``,
  and the native kernel needs no mask tensor at all.
- ``interval_sets(q_pos) -> (lo, hi) | None``: for masks where each query sees
  the union of a few key intervals (window | global tokens, block-sparse
  layouts, and the masks of ``intervals``), the bounds per row, each
  (B', H', Tq, R) int64, empty slots with ``lo > hi``. The native kernel takes
  them as they are; `MAX_INTERVALS` bounds R.
- ``tile_states(grid) -> (B', H', nQ, nK) int8``: EMPTY / PARTIAL / FULL per
  tile of a `Grid`, exact or conservative (never wrongly EMPTY or FULL). The
  default derives them from ``intervals`` or evaluates the predicate.
- ``dense(q_pos, tk, batch, heads)``: the bool mask of the rows at ``q_pos``,
  broadcastable to (batch, heads, len(q_pos), tk); ``materialize`` is the
  same by sizes and offset, for tests and debugging.
- ``is_causal``: True only for exactly ``k <= q`` (SDPA's ``is_causal`` can serve it);
  ``is_tensor``: True for a stored bool tensor (hand it to kernels as it is).
- ``cacheable``: whether its answers never change, so backends may cache plans
  for it (keyed weakly on the mask object, never stored on it).
"""

from __future__ import annotations

import math
from typing import Callable

import torch

from ._indexed import call_indexed

EMPTY, PARTIAL, FULL = 0, 1, 2
"""Tile states. Ordered so that AND is ``min``, OR is ``max`` and NOT is ``2 - s``."""

UNBOUNDED = 1 << 62  # "no bound" in interval bounds; still safe to add small offsets to
MAX_INTERVALS = 64  # interval_sets with more intervals per row than this are not offered (None)


def as_sets(lo: torch.Tensor, hi: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """One interval per row, (B', Tq) bounds, as interval sets (B', 1, Tq, 1)."""
    return lo[:, None, :, None], hi[:, None, :, None]


def _broadcast_sets(sets):
    """Interval sets of several masks broadcast to common (B', H', Tq) leading dims."""
    B = max(lo.shape[0] for lo, _ in sets)
    H = max(lo.shape[1] for lo, _ in sets)
    return [(lo.expand(B, H, *lo.shape[2:]), hi.expand(B, H, *hi.shape[2:])) for lo, hi in sets]


def index_grid(batch: int, heads: int, q_pos: torch.Tensor, k_pos: torch.Tensor):
    """Broadcastable index tensors: b (B,1,1,1), h (1,H,1,1), q (1,1,Tq,1), k (1,1,1,Tk)."""
    dev = q_pos.device
    b = torch.arange(batch, device=dev).view(-1, 1, 1, 1)
    h = torch.arange(heads, device=dev).view(1, -1, 1, 1)
    return b, h, q_pos.view(1, 1, -1, 1), k_pos.view(1, 1, 1, -1)


def evaluate(mask: Callable, b, h, q, k) -> torch.Tensor:
    """``mask(b, h, q, k)`` checked to be a bool tensor; on qkv's 4-D index grids the result is 4-D
    (constant predicates broadcast). Scalars (an outer ``vmap``) pass through untouched."""
    out = mask(b, h, q, k)
    if not isinstance(out, torch.Tensor):
        raise TypeError(
            f"mask function returned {type(out).__name__}; it must return a bool tensor "
            "computed from its tensor arguments, e.g. `return q_pos >= k_pos`"
        )
    if out.dtype != torch.bool:
        raise TypeError(
            f"mask function returned dtype {out.dtype}; masks are boolean (True = may attend). "
            "Compare instead of computing numbers (e.g. `q_pos >= k_pos`), or pass "
            "additive float values as `bias=`"
        )
    if isinstance(q, torch.Tensor) and q.dim() == 4 and out.dim() < 4:
        out = out.view(*([1] * (4 - out.dim())), *out.shape)
    return out


class Grid:
    """A tiling of one attention call.

    Query rows (with absolute positions ``q_pos``) are cut into tiles of
    ``q_tile`` consecutive rows, keys ``0..tk-1`` into tiles of ``k_tile``.
    """

    def __init__(self, q_pos: torch.Tensor, tk: int, q_tile: int, k_tile: int, batch: int, heads: int):
        if q_tile <= 0 or k_tile <= 0:
            raise ValueError(f"tile sizes must be positive, got q_tile={q_tile}, k_tile={k_tile}")
        self.q_pos = q_pos
        self.tq = q_pos.numel()
        self.tk = tk
        self.q_tile = q_tile
        self.k_tile = k_tile
        self.batch = batch
        self.heads = heads
        self.nq = math.ceil(self.tq / q_tile)
        self.nk = math.ceil(tk / k_tile)
        self.device = q_pos.device
        starts = torch.arange(self.nk, device=self.device) * k_tile
        self.k_first = starts  # (nK,) first key index of each key tile
        self.k_last = (starts + k_tile - 1).clamp(max=tk - 1)  # (nK,)

    def row_tiles(self, values: torch.Tensor, fill: int) -> torch.Tensor:
        """Reshape per-row values (..., Tq) to (..., nQ, q_tile), padding the last tile with `fill`."""
        pad = self.nq * self.q_tile - self.tq
        if pad:
            values = torch.nn.functional.pad(values, (0, pad), value=fill)
        return values.view(*values.shape[:-1], self.nq, self.q_tile)

    def q_hull(self) -> tuple[torch.Tensor, torch.Tensor]:
        """Smallest and largest query position in each query tile, (nQ,) each."""
        lo = self.row_tiles(self.q_pos, UNBOUNDED).amin(-1)
        hi = self.row_tiles(self.q_pos, -UNBOUNDED).amax(-1)
        return lo, hi

    def evaluate(self, mask: Callable) -> torch.Tensor:
        """Tile states by evaluating the predicate, one query tile at a time: (B', H', nQ, nK) int8."""
        k_pos = torch.arange(self.tk, device=self.device)
        pad = self.nk * self.k_tile - self.tk
        rows = []
        for i in range(self.nq):
            qp = self.q_pos[i * self.q_tile : (i + 1) * self.q_tile]
            m = evaluate(mask, *index_grid(self.batch, self.heads, qp, k_pos))
            m = m.expand(*m.shape[:2], qp.numel(), self.tk)  # (B', H', r, Tk)
            any_ = torch.nn.functional.pad(m, (0, pad), value=False)
            all_ = torch.nn.functional.pad(m, (0, pad), value=True)
            shape = (*m.shape[:2], qp.numel(), self.nk, self.k_tile)
            any_ = any_.reshape(shape).any(-1).any(-2)  # (B', H', nK)
            all_ = all_.reshape(shape).all(-1).all(-2)
            rows.append(states_from(any_, all_))
        if not rows:
            return torch.zeros(1, 1, 0, self.nk, dtype=torch.int8, device=self.device)
        return torch.stack(rows, dim=-2)


def states_from(any_visible: torch.Tensor, all_visible: torch.Tensor) -> torch.Tensor:
    s = torch.where(all_visible, FULL, torch.where(any_visible, PARTIAL, EMPTY))
    return s.to(torch.int8)


def interval_states(lo: torch.Tensor, hi: torch.Tensor, grid: Grid) -> torch.Tensor:
    """Exact tile states of an interval mask ``lo[b, i] <= k <= hi[b, i]``: (B', 1, nQ, nK) int8."""
    lo_c = lo.clamp(min=0)
    hi_c = hi.clamp(max=grid.tk - 1)
    live = lo_c <= hi_c  # (B', Tq) rows that see at least one key
    nb = lo.shape[0]
    # Visible tiles: each live row covers key tiles lo//k_tile .. hi//k_tile of its query tile.
    # A difference array over key tiles turns that into O(Tq + nQ*nK) work.
    diff = torch.zeros(nb, grid.nq, grid.nk + 1, dtype=torch.int32, device=lo.device)
    row_tile = (torch.arange(grid.tq, device=lo.device) // grid.q_tile).expand(nb, -1)
    flat = diff.view(nb, -1)
    one = live.to(torch.int32)
    t0 = torch.where(live, lo_c // grid.k_tile, 0)
    t1 = torch.where(live, hi_c // grid.k_tile + 1, 0)
    flat.scatter_add_(1, row_tile * (grid.nk + 1) + t0, one)
    flat.scatter_add_(1, row_tile * (grid.nk + 1) + t1, -one)
    visible = diff.cumsum(-1)[..., : grid.nk] > 0
    # Full tiles: every row of the query tile sees every key of the key tile.
    max_lo = grid.row_tiles(lo, -UNBOUNDED).amax(-1)  # (B', nQ)
    min_hi = grid.row_tiles(hi, UNBOUNDED).amin(-1)
    full = (max_lo[..., None] <= grid.k_first) & (min_hi[..., None] >= grid.k_last)
    return states_from(visible, full & visible).unsqueeze(1)


class Mask:
    """What may attend to what: a predicate ``mask(b, h, q_pos, k_pos) -> bool tensor``.

    Positions are absolute: query row ``i`` of a call sits at ``q_offset + i``.
    Combine masks with ``&``, ``|`` and ``~``; plain functions with the same
    signature combine too (``causal() & my_fn``).
    """

    #: Whether backends may cache plans for this mask: its answer never changes.
    cacheable = True
    #: True only for exactly ``k <= q``.
    is_causal = False
    #: True for a stored bool tensor: ``dense`` is a view and there is no structure to exploit.
    is_tensor = False

    def __call__(self, b, h, q_pos, k_pos) -> torch.Tensor:
        raise NotImplementedError

    # -- structure hooks; subclasses override what they can say exactly --------

    def bind(self, q_offset: int) -> Mask:
        """Resolve anything that depends on the call's query offset (tensor masks)."""
        return self

    def check(self, q_min: int, q_max: int, tk: int, batch: int, heads: int) -> None:
        """Raise ValueError if the mask cannot describe this call."""

    def intervals(self, q_pos: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor] | None:
        """Per-row visible key bounds ``(lo, hi)``, each (B', Tq) int64, or None."""
        return None

    def interval_sets(self, q_pos: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor] | None:
        """Per-row visible keys as unions of intervals ``(lo, hi)``, each (B', H', Tq, R) int64, or None."""
        iv = self.intervals(q_pos)
        return None if iv is None else as_sets(*iv)

    def tile_states(self, grid: Grid) -> torch.Tensor:
        """Tile states (B', H', nQ, nK) int8, exact or conservative (never wrongly EMPTY/FULL)."""
        iv = self.intervals(grid.q_pos)
        if iv is not None:
            return interval_states(*iv, grid)
        return grid.evaluate(self)

    def dense(self, q_pos: torch.Tensor, tk: int, batch: int, heads: int) -> torch.Tensor:
        """Dense bool mask, broadcastable to (batch, heads, Tq, tk)."""
        k_pos = torch.arange(tk, device=q_pos.device)
        return evaluate(self, *index_grid(batch, heads, q_pos, k_pos))

    # -- public -----------------------------------------------------------------

    def materialize(self, tq: int, tk: int, *, batch: int = 1, heads: int = 1,
                    q_offset: int | None = None, device=None) -> torch.Tensor:
        """The mask as a dense bool tensor of shape (batch, heads, tq, tk), for tests and debugging.

        Query row ``i`` sits at position ``q_offset + i``; ``q_offset`` defaults to
        ``tk - tq`` (bottom-right alignment). The result may be a broadcast view.
        """
        q_pos, mask = _prepare(self, tq, tk, batch, heads, q_offset, device)
        return mask.dense(q_pos, tk, batch, heads).expand(batch, heads, tq, tk)

    def tiles(self, tq: int, tk: int, *, q_tile: int = 128, k_tile: int = 128, batch: int = 1,
              heads: int = 1, q_offset: int | None = None, device=None) -> torch.Tensor:
        """Classify each (query tile, key tile) as EMPTY (0), PARTIAL (1) or FULL (2).

        Returns an int8 tensor (batch, heads, ceil(tq/q_tile), ceil(tk/k_tile)).
        EMPTY and FULL are always exact; PARTIAL may be reported for a tile
        that is in fact empty or full when the structure is unknown (combinations).
        """
        q_pos, mask = _prepare(self, tq, tk, batch, heads, q_offset, device)
        grid = Grid(q_pos, tk, q_tile, k_tile, batch, heads)
        s = mask.tile_states(grid)
        return s.expand(batch, heads, grid.nq, grid.nk)

    def classify(self, q_range: tuple[int, int], k_range: tuple[int, int], *, batch: int = 1,
                 heads: int = 1) -> int:
        """State of one tile: queries at absolute positions ``q_range = (start, stop)`` against keys ``k_range``.

        Returns EMPTY (0), PARTIAL (1) or FULL (2), over every batch entry and head
        (EMPTY only if empty for all, FULL only if full for all). Exact.
        """
        (q0, q1), (k0, k1) = q_range, k_range
        if q1 <= q0 or k1 <= k0:
            return EMPTY
        q_pos = torch.arange(q0, q1)
        mask = self.bind(0)  # tensor masks: rows are positions
        iv = mask.intervals(q_pos)
        if iv is not None:
            lo, hi = iv
            any_ = bool((torch.maximum(lo, torch.tensor(k0)) <= torch.minimum(hi, torch.tensor(k1 - 1))).any())
            all_ = bool(((lo <= k0) & (hi >= k1 - 1)).all())
        else:
            k_pos = torch.arange(k0, k1)
            m = evaluate(mask, *index_grid(batch, heads, q_pos, k_pos))
            any_, all_ = bool(m.any()), bool(m.all())
        return FULL if all_ else PARTIAL if any_ else EMPTY

    def __and__(self, other) -> Mask:
        return And([self, as_mask(other)])

    def __rand__(self, other) -> Mask:
        return And([as_mask(other), self])

    def __or__(self, other) -> Mask:
        return Or([self, as_mask(other)])

    def __ror__(self, other) -> Mask:
        return Or([as_mask(other), self])

    def __invert__(self) -> Mask:
        return Not(self)


def _prepare(mask: Mask, tq, tk, batch, heads, q_offset, device):
    for name, val in (("tq", tq), ("tk", tk), ("batch", batch), ("heads", heads)):
        if not isinstance(val, int) or val < 0:
            raise ValueError(f"{name} must be a non-negative int, got {val!r}")
    off = tk - tq if q_offset is None else int(q_offset)
    device = torch.device("cpu") if device is None else torch.device(device)
    mask = mask.bind(off)
    q_pos = torch.arange(tq, device=device) + off
    if tq and tk:
        mask.check(off, off + tq - 1, tk, batch, heads)
    return q_pos, mask


class _Combination(Mask):
    def __init__(self, parts: list[Mask]):
        flat: list[Mask] = []
        for p in parts:
            flat.extend(p.parts if type(p) is type(self) else [p])
        self.parts = flat
        self.cacheable = all(p.cacheable for p in flat)

    def bind(self, q_offset):
        bound = [p.bind(q_offset) for p in self.parts]
        if all(b is p for b, p in zip(bound, self.parts)):
            return self  # keep the object (and the plans cached on it)
        return type(self)(bound)

    def check(self, *args):
        for p in self.parts:
            p.check(*args)


class And(_Combination):
    """Visible iff every part says visible."""

    def __call__(self, b, h, q_pos, k_pos):
        out = evaluate(self.parts[0], b, h, q_pos, k_pos)
        for p in self.parts[1:]:
            out = out & evaluate(p, b, h, q_pos, k_pos)
        return out

    def intervals(self, q_pos):
        ivs = [p.intervals(q_pos) for p in self.parts]
        if any(iv is None for iv in ivs):
            return None
        lo, hi = ivs[0]
        for l2, h2 in ivs[1:]:
            lo, hi = torch.maximum(lo, l2), torch.minimum(hi, h2)
        return lo, hi

    def interval_sets(self, q_pos):
        iv = self.intervals(q_pos)
        if iv is not None:
            return as_sets(*iv)
        sets = [p.interval_sets(q_pos) for p in self.parts]
        if any(s is None for s in sets) or math.prod(s[0].shape[-1] for s in sets) > MAX_INTERVALS:
            return None
        lo, hi = sets[0]
        for l2, h2 in sets[1:]:  # (A1 | A2) & (B1 | B2): every Ai & Bj
            lo = torch.maximum(lo[..., :, None], l2[..., None, :]).flatten(-2)
            hi = torch.minimum(hi[..., :, None], h2[..., None, :]).flatten(-2)
        return lo, hi

    def tile_states(self, grid):
        iv = self.intervals(grid.q_pos)
        if iv is not None:
            return interval_states(*iv, grid)
        out = self.parts[0].tile_states(grid)
        for p in self.parts[1:]:
            out = torch.minimum(out, p.tile_states(grid))
        return out

    def __repr__(self):
        return " & ".join(f"({p!r})" if isinstance(p, Or) else repr(p) for p in self.parts)


class Or(_Combination):
    """Visible iff any part says visible."""

    def __call__(self, b, h, q_pos, k_pos):
        out = evaluate(self.parts[0], b, h, q_pos, k_pos)
        for p in self.parts[1:]:
            out = out | evaluate(p, b, h, q_pos, k_pos)
        return out

    def interval_sets(self, q_pos):
        sets = [p.interval_sets(q_pos) for p in self.parts]
        if any(s is None for s in sets) or sum(s[0].shape[-1] for s in sets) > MAX_INTERVALS:
            return None
        sets = _broadcast_sets(sets)
        return torch.cat([lo for lo, _ in sets], -1), torch.cat([hi for _, hi in sets], -1)

    def tile_states(self, grid):
        out = self.parts[0].tile_states(grid)
        for p in self.parts[1:]:
            out = torch.maximum(out, p.tile_states(grid))
        return out

    def __repr__(self):
        return " | ".join(repr(p) for p in self.parts)


class Not(Mask):
    """Visible iff the inner mask says hidden."""

    def __init__(self, inner: Mask):
        self.inner = inner
        self.cacheable = inner.cacheable

    def __call__(self, b, h, q_pos, k_pos):
        return ~evaluate(self.inner, b, h, q_pos, k_pos)

    def bind(self, q_offset):
        bound = self.inner.bind(q_offset)
        return self if bound is self.inner else Not(bound)

    def check(self, *args):
        self.inner.check(*args)

    def interval_sets(self, q_pos):
        iv = self.inner.intervals(q_pos)  # the keys outside one interval: below it and above it
        if iv is None:
            return None
        lo, hi = iv
        return (torch.stack([torch.full_like(lo, -UNBOUNDED), hi + 1], -1)[:, None],
                torch.stack([lo - 1, torch.full_like(hi, UNBOUNDED)], -1)[:, None])

    def tile_states(self, grid):
        return (FULL - self.inner.tile_states(grid)).to(torch.int8)

    def __repr__(self):
        return f"~({self.inner!r})"


class FunctionMask(Mask):
    """A plain FlexAttention-style ``fn(b, h, q_pos, k_pos) -> bool tensor``."""

    def __init__(self, fn: Callable, cacheable: bool = True):
        if not callable(fn):
            raise TypeError(f"mask function must be callable, got {type(fn).__name__}")
        self.fn = fn
        self.cacheable = cacheable  # False when wrapped implicitly: the function may close over changing state

    def __call__(self, b, h, q_pos, k_pos):
        return call_indexed(self.fn, b, h, q_pos, k_pos)  # broadcast grids, or vmap for scalar-style functions

    def __repr__(self):
        return f"from_function({getattr(self.fn, '__name__', self.fn)!r})"


class TensorMask(Mask):
    """A bool tensor broadcastable to (B, H, Tq, Tk), indexed by query row and key.

    Row ``i`` of the tensor is the query at absolute position ``q_offset + i``;
    with ``q_offset=None`` the rows follow the call they are used in. The tensor
    is not copied (it may be large), so plans are never cached on it.
    """

    cacheable = False
    is_tensor = True

    def __init__(self, tensor: torch.Tensor, q_offset: int | None = None):
        if not isinstance(tensor, torch.Tensor):
            raise TypeError(f"from_tensor expects a torch.Tensor, got {type(tensor).__name__}")
        if tensor.dtype != torch.bool:
            raise TypeError(
                f"mask tensor has dtype {tensor.dtype}; masks are bool with True = may attend. "
                "Convert with `mask.bool()`, or pass additive float values as `bias=`"
            )
        if tensor.dim() > 4:
            raise ValueError(
                f"mask tensor must have at most 4 dims, broadcastable to (B, H, Tq, Tk); got shape {tuple(tensor.shape)}"
            )
        self.tensor = tensor.view(*([1] * (4 - tensor.dim())), *tensor.shape)
        self.q_offset = q_offset

    def bind(self, q_offset):
        return self if self.q_offset is not None else TensorMask(self.tensor, q_offset)

    def _offset(self) -> int:
        if self.q_offset is not None:
            return self.q_offset
        return self.tensor.shape[-1] - self.tensor.shape[-2]  # bottom-right

    def check(self, q_min, q_max, tk, batch, heads):
        t = self.tensor
        tq = q_max - q_min + 1
        for dim, (name, want) in enumerate((("batch", batch), ("heads", heads))):
            if t.shape[dim] not in (1, want):
                raise ValueError(
                    f"mask tensor of shape {tuple(t.shape)} does not broadcast to "
                    f"(B={batch}, H={heads}, Tq={tq}, Tk={tk}): its {name} dim is {t.shape[dim]}"
                )
        rows = t.shape[-2]
        if t.shape[-1] not in (1, tk) or (rows != 1 and (q_min - self._offset() < 0 or q_max - self._offset() >= rows)):
            raise ValueError(
                f"mask tensor of shape {tuple(t.shape)} does not broadcast to "
                f"(B={batch}, H={heads}, Tq={tq}, Tk={tk}); give it shape (..., {tq}, {tk})"
            )

    def __call__(self, b, h, q_pos, k_pos):
        t = self.tensor.to(q_pos.device)
        idx = []
        for dim, i in enumerate((b, h, q_pos - self._offset(), k_pos)):
            idx.append(i if t.shape[dim] > 1 else torch.zeros_like(i))
        return t[idx[0], idx[1], idx[2], idx[3]]

    def dense(self, q_pos, tk, batch, heads):
        t = self.tensor.to(q_pos.device)
        n = q_pos.numel()
        if t.shape[-2] == 1 or n == 0:
            return t
        start = int(q_pos[0]) - self._offset()
        if torch.equal(q_pos, torch.arange(n, device=q_pos.device) + int(q_pos[0])):
            return t[..., start : start + n, :]  # contiguous rows: a view, no gather
        return t.index_select(-2, q_pos - self._offset())

    def __repr__(self):
        return f"from_tensor(shape={tuple(self.tensor.shape)})"


def as_mask(mask) -> Mask | None:
    """Normalise what users pass as ``mask=``: None, a Mask, a function, or a bool tensor.

    A plain function is wrapped anew on every call, so nothing about it is
    cached (it may close over state that changes); wrap it once with
    `qkv.masks.from_function` to let backends cache its tile plans.
    """
    if mask is None or isinstance(mask, Mask):
        return mask
    if isinstance(mask, torch.Tensor):
        return TensorMask(mask)
    if callable(mask):
        return FunctionMask(mask, cacheable=False)
    raise TypeError(
        f"mask must be None, a qkv.masks.Mask, a function fn(b, h, q_pos, k_pos) -> bool tensor, "
        f"or a bool tensor; got {type(mask).__name__}"
    )
