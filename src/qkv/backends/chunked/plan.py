"""Tile plans: which keys each block of query rows must visit.

A plan cuts the query rows into tiles and gives each tile the keys its mask
leaves visible (one contiguous range where possible, else an index list) and
whether the tile needs the elementwise mask. Keys outside are never touched,
which is where sparse masks save their work. Plans of masks with structure
(intervals, analytic tile states) cost O(Tq + tiles); the registry caches them
per call (`Call.plan`) and, for cacheable masks, across calls.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from ...masks import EMPTY, FULL, UNBOUNDED, Grid, Mask

Q_TILE = 64  # query rows per tile: small enough that band masks waste little
K_TILE = 64  # key granularity of skipping for masks without interval structure
ALIGN = 16  # masked tiles are widened to a multiple of this: the fused kernel runs faster
BAND_TILE = 32  # rows per tile inside bands: less band overlap wasted; batched calls hide the call overhead
_CACHE_SIZE = 8
SCRATCH_BYTES = 32 << 20  # per chunk of scores or per-tile kernel buffers; bounds memory for long rows


@dataclass(frozen=True)
class Tile:
    r0: int  # first query row
    r1: int  # one past the last query row
    keys: slice | torch.Tensor  # visited keys: a range, or sorted key indices
    width: int  # number of visited keys
    masked: bool  # whether the elementwise mask must be applied

    def key_positions(self, device) -> torch.Tensor:
        if isinstance(self.keys, slice):
            return torch.arange(self.keys.start, self.keys.stop, device=device)
        return self.keys


@dataclass(frozen=True)
class Band:
    """A run of equal row tiles sharing one mask pattern: tile ``t`` covers rows
    ``row + t*q_tile + [0, q_tile)`` and keys ``row + t*q_tile + shift + [0, width)``.

    Sliding windows and other translation-invariant masks give long bands; a
    backend can serve a whole band with one batched kernel call on strided views.
    """

    row: int  # first query row
    count: int  # number of tiles
    q_tile: int
    shift: int  # key start minus row start
    width: int
    rel_lo: int  # visible iff rel_lo <= k_pos - q_pos <= rel_hi
    rel_hi: int
    q_offset: int

    @property
    def rows(self) -> range:
        return range(self.row, self.row + self.count * self.q_tile)

    def pattern(self, device) -> torch.Tensor:
        """The shared (q_tile, width) bool mask of every tile in the band."""
        i = torch.arange(self.q_tile, device=device)[:, None]
        j = torch.arange(self.width, device=device)[None, :]
        rel = self.shift - self.q_offset + j - i  # k_pos - q_pos
        return (rel >= self.rel_lo) & (rel <= self.rel_hi)


@dataclass(frozen=True)
class Plan:
    tiles: tuple[Tile, ...]
    tq: int
    tk: int
    bands: tuple[Band, ...] = ()

    @property
    def visited(self) -> int:
        """(query, key) pairs the plan computes."""
        return sum((t.r1 - t.r0) * t.width for t in self.tiles)

    @property
    def density(self) -> float:
        total = self.tq * self.tk
        return self.visited / total if total else 0.0

    @property
    def unmasked_dense(self) -> bool:
        """Every row sees every key: the mask can be dropped."""
        return self.visited == self.tq * self.tk and not any(t.masked for t in self.tiles)


def call_plan(mask: Mask | None, q_offset: int, tq: int, tk: int, batch: int, heads: int, device) -> Plan:
    """The plan for contiguous query rows at ``q_offset .. q_offset + tq - 1`` (uncached; for inspection)."""
    return plan_for(mask, torch.arange(tq, device=device) + q_offset, tk, batch, heads)


def plan_for(mask: Mask | None, q_pos: torch.Tensor, tk: int, batch: int, heads: int,
             q_tile: int | None = None, k_tile: int | None = None, cache: dict | None = None, cache_key=None) -> Plan:
    """The tile plan of `mask` for query rows at `q_pos` against keys 0..tk-1; kept in ``cache`` (a dict the
    caller owns, e.g. `qkv.backends.registry.plan_cache`) under ``cache_key`` when both are given."""
    q_tile = q_tile or Q_TILE
    k_tile = k_tile or K_TILE
    if mask is not None and cache_key is not None and cache is not None:
        key = (cache_key, tk, batch, heads, q_tile, k_tile, str(q_pos.device))
        plan = cache.get(key)
        if plan is None:
            plan = _build(mask, q_pos, tk, batch, heads, q_tile, k_tile)
            if len(cache) >= _CACHE_SIZE:
                cache.pop(next(iter(cache)))
            cache[key] = plan
        return plan
    return _build(mask, q_pos, tk, batch, heads, q_tile, k_tile)


def _build(mask, q_pos, tk, batch, heads, q_tile, k_tile) -> Plan:
    tq = q_pos.numel()
    if mask is None:
        tiles = [Tile(r0, min(r0 + q_tile, tq), slice(0, tk), tk, False) for r0 in range(0, tq, q_tile)] if tk else []
        return Plan(tuple(tiles), tq, tk)
    iv = mask.intervals(q_pos)
    if iv is not None:
        return _interval_plan(*iv, q_pos, tk, q_tile)
    grid = Grid(q_pos, tk, q_tile, k_tile, batch, heads)
    return _state_plan(mask.tile_states(grid), grid)


def _interval_plan(lo: torch.Tensor, hi: torch.Tensor, q_pos: torch.Tensor, tk: int, q_tile: int) -> Plan:
    """Exact key range per tile from per-row bounds ``lo <= k <= hi`` (B', Tq)."""
    tq = q_pos.numel()
    grid = Grid(q_pos, tk, q_tile, 1, 1, 1)
    lo_c, hi_c = lo.clamp(min=0), hi.clamp(max=tk - 1)
    live = lo_c <= hi_c
    first = grid.row_tiles(torch.where(live, lo_c, UNBOUNDED), UNBOUNDED).amin(-1).amin(0)  # (nQ,)
    last = grid.row_tiles(torch.where(live, hi_c, -UNBOUNDED), -UNBOUNDED).amax(-1).amax(0)
    # Unmasked iff every row (of every batch entry) sees exactly [first, last].
    row_lo = grid.row_tiles(torch.where(live, lo, UNBOUNDED), -UNBOUNDED).amax(-1).amax(0)
    row_hi = grid.row_tiles(torch.where(live, hi, -UNBOUNDED), UNBOUNDED).amin(-1).amin(0)
    exact = (row_lo <= first) & (row_hi >= last)
    tiles = []
    for i, (k0, k1, ex) in enumerate(zip(first.tolist(), last.tolist(), exact.tolist())):
        if k0 > k1:
            continue  # no row of this tile sees any key
        k1 += 1
        if not ex:
            k0, k1 = _align(k0, k1, tk)
        r0 = i * q_tile
        tiles.append(Tile(r0, min(r0 + q_tile, tq), slice(k0, k1), k1 - k0, not ex))
    return Plan(tuple(tiles), tq, tk, _bands(lo, hi, q_pos, tk, q_tile, grid, live))


def _bands(lo, hi, q_pos, tk, q_tile, grid: Grid, live) -> tuple[Band, ...]:
    """Runs of whole tiles whose rows all see ``q_pos + [rel_lo, rel_hi]``, unclipped: one pattern per run."""
    tq = q_pos.numel()
    if lo.shape[0] != 1 or tq < 2 * q_tile:
        return ()
    off = int(q_pos[0])
    if not torch.equal(q_pos, torch.arange(tq, device=q_pos.device) + off):
        return ()
    n = tq // q_tile  # whole tiles only
    rl = (lo[0, : n * q_tile] - q_pos[: n * q_tile]).view(n, q_tile)
    rh = (hi[0, : n * q_tile] - q_pos[: n * q_tile]).view(n, q_tile)
    ok = (rl == rl[:, :1]).all(1) & (rh == rh[:, :1]).all(1) & live[0, : n * q_tile].view(n, q_tile).all(1)
    rl, rh = rl[:, 0], rh[:, 0]
    k0 = torch.arange(n, device=q_pos.device) * q_tile + off + rl
    k1 = k0 + q_tile + rh - rl  # one past the last visible key of the tile (rl, rh: per-tile constants)
    ok &= (k0 >= 0) & (k1 <= tk) & (rl > -UNBOUNDED // 2) & (rh < UNBOUNDED // 2)
    bands = []
    ok_l, rl_l, rh_l = ok.tolist(), rl.tolist(), rh.tolist()
    sub = BAND_TILE if q_tile % BAND_TILE == 0 else q_tile
    i = 0
    while i < n:
        j = i
        while j + 1 < n and ok_l[i] and ok_l[j + 1] and rl_l[j + 1] == rl_l[i] and rh_l[j + 1] == rh_l[i]:
            j += 1
        if ok_l[i] and j > i:
            row, lo_rel, hi_rel = i * q_tile, rl_l[i], rh_l[i]
            width = sub + hi_rel - lo_rel
            shift = off + lo_rel  # key start minus row start, unaligned
            aligned = -(-width // ALIGN) * ALIGN
            if row + shift - (aligned - width) >= 0:
                shift, width = shift - (aligned - width), aligned
            count = (j - i + 1) * (q_tile // sub)
            bands.append(Band(row, count, sub, shift, width, lo_rel, hi_rel, off))
        i = j + 1
    return tuple(bands)


def _align(k0: int, k1: int, tk: int) -> tuple[int, int]:
    width = -(-(k1 - k0) // ALIGN) * ALIGN
    if width >= tk:
        return 0, tk
    k0 = max(0, min(k0, k1 - width))
    return k0, k0 + width


def _state_plan(states: torch.Tensor, grid: Grid) -> Plan:
    """Plan from tile states (B', H', nQ, nK): union of visible tiles over batch and heads."""
    flat = states.flatten(0, 1)
    visit = (flat != EMPTY).any(0).cpu().numpy()
    full = (flat == FULL).all(0).cpu().numpy()
    kt, tk, tq = grid.k_tile, grid.tk, grid.tq
    tiles = []
    for i in range(grid.nq):
        cols = np.flatnonzero(visit[i])
        if cols.size == 0:
            continue
        masked = not bool(full[i, cols].all())
        r0 = i * grid.q_tile
        r1 = min(r0 + grid.q_tile, tq)
        breaks = np.flatnonzero(np.diff(cols) != 1)
        if breaks.size == 0:
            k0, k1 = int(cols[0]) * kt, min(int(cols[-1] + 1) * kt, tk)
            tiles.append(Tile(r0, r1, slice(k0, k1), k1 - k0, masked))
            continue
        idx = (cols[:, None] * kt + np.arange(kt)[None, :]).reshape(-1)
        idx = torch.from_numpy(idx[idx < tk]).to(grid.device)
        tiles.append(Tile(r0, r1, idx, idx.numel(), masked))
    return Plan(tuple(tiles), tq, tk)
