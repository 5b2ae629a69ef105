"""The built-in masks. Each is a small predicate plus what it can say about its structure."""

from __future__ import annotations

from collections.abc import Sequence

import torch

from ._base import EMPTY, FULL, MAX_INTERVALS, PARTIAL, UNBOUNDED, Grid, Mask, states_from


def _int_arg(name: str, value, minimum: int, hint: str = "") -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"{name} must be an int, got {type(value).__name__} {value!r}")
    if value < minimum:
        raise ValueError(f"{name}={value} must be >= {minimum}" + (f" {hint}" if hint else ""))
    return value


def _long_tensor(name: str, value, dims: tuple[int, ...]) -> torch.Tensor:
    t = torch.as_tensor(value)
    if t.numel() == 0 and not isinstance(value, torch.Tensor):
        t = t.long()  # [] parses as float
    if t.is_floating_point() or t.dtype == torch.bool or t.is_complex():
        raise TypeError(f"{name} must hold integers, got dtype {t.dtype}")
    if t.dim() not in dims:
        raise ValueError(f"{name} must have {' or '.join(map(str, dims))} dims, got shape {tuple(t.shape)}")
    return t.detach().to("cpu", torch.long, copy=True)  # a snapshot: masks are immutable, plans are cached


def _counts(name: str, value) -> torch.Tensor:
    """One non-negative count per batch entry (or one for all), as a 1-D int64 tensor."""
    t = _long_tensor(name, value, (0, 1)).reshape(-1)
    if t.numel() and int(t.min()) < 0:
        raise ValueError(f"{name} must be >= 0, got min {int(t.min())}")
    return t


class _Tensors:
    """Per-device copies of a mask's tensors (masks are built on CPU, used anywhere)."""

    def __init__(self, **tensors: torch.Tensor):
        self._by_device = {torch.device("cpu"): tensors}
        self._cpu = {k: v.cpu() for k, v in tensors.items()}

    def on(self, device) -> dict[str, torch.Tensor]:
        device = torch.device(device)
        if device not in self._by_device:
            self._by_device[device] = {k: v.to(device) for k, v in self._cpu.items()}
        return self._by_device[device]


def _batch_index(b: torch.Tensor, size: int) -> torch.Tensor:
    return b if size > 1 else torch.zeros_like(b)


def _check_batch(name: str, size: int, batch: int) -> None:
    if size not in (1, batch):
        raise ValueError(
            f"{name} describes batch size {size} but the call has batch {batch}; "
            f"give one entry per batch element ({batch}) or a single one"
        )


class Causal(Mask):
    """Query at position q sees keys k <= q."""

    is_causal = True

    def __call__(self, b, h, q_pos, k_pos):
        return k_pos <= q_pos

    def intervals(self, q_pos):
        return torch.full_like(q_pos, -UNBOUNDED)[None], q_pos[None]

    def __repr__(self):
        return "causal()"


class SlidingWindow(Mask):
    """Key k visible from query q iff q - left <= k <= q + right."""

    def __init__(self, left: int, right: int = 0):
        self.left = _int_arg("sliding_window left", left, 0, "(0: each query sees only itself and its right keys)")
        self.right = _int_arg("sliding_window right", right, 0, "(0: no key after the query)")

    def __call__(self, b, h, q_pos, k_pos):
        return (k_pos >= q_pos - self.left) & (k_pos <= q_pos + self.right)

    def intervals(self, q_pos):
        return (q_pos - self.left)[None], (q_pos + self.right)[None]

    def __repr__(self):
        return f"sliding_window({self.left}, {self.right})"


class Padding(Mask):
    """Keys at k >= lengths[b] are hidden (right padding)."""

    def __init__(self, lengths):
        t = _counts("padding lengths", lengths)
        self.lengths = t
        self._t = _Tensors(lengths=t)

    def __call__(self, b, h, q_pos, k_pos):
        n = self._t.on(k_pos.device)["lengths"]
        return k_pos < n[_batch_index(b, n.numel())]

    def check(self, q_min, q_max, tk, batch, heads):
        _check_batch("padding lengths", self.lengths.numel(), batch)

    def intervals(self, q_pos):
        n = self._t.on(q_pos.device)["lengths"]
        hi = (n - 1)[:, None].expand(-1, q_pos.numel())
        return torch.full_like(hi, -UNBOUNDED), hi

    def __repr__(self):
        return f"padding({self.lengths.tolist()})"


class Document(Mask):
    """Packed sequences: query and key see each other iff they carry the same document id."""

    def __init__(self, ids):
        t = _long_tensor("document ids", ids, (1, 2))
        self.ids = t if t.dim() == 2 else t[None]  # (B or 1, T)
        starts, ends, contiguous = self._runs(self.ids)
        self.contiguous = contiguous
        self._t = _Tensors(ids=self.ids, starts=starts, ends=ends)

    @staticmethod
    def _runs(ids: torch.Tensor):
        """First and last position of the run holding each position, and whether each id is one run."""
        nb, n = ids.shape
        pos = torch.arange(n).expand(nb, n)
        new = torch.ones_like(ids, dtype=torch.bool)
        new[:, 1:] = ids[:, 1:] != ids[:, :-1]
        starts = torch.where(new, pos, 0).cummax(-1).values
        last = torch.ones_like(new)
        last[:, :-1] = new[:, 1:]
        ends = torch.where(last, pos, n).flip(-1).cummin(-1).values.flip(-1)
        runs = int(new.sum())
        distinct = sum(torch.unique(row).numel() for row in ids)
        return starts, ends, runs == distinct

    def __call__(self, b, h, q_pos, k_pos):
        ids = self._t.on(q_pos.device)["ids"]
        bi = _batch_index(b, ids.shape[0])
        return ids[bi, q_pos] == ids[bi, k_pos]

    def check(self, q_min, q_max, tk, batch, heads):
        _check_batch("document ids", self.ids.shape[0], batch)
        n = self.ids.shape[1]
        if q_min < 0 or q_max >= n or tk > n:
            raise ValueError(
                f"document ids cover positions 0..{n - 1} but the call needs queries at "
                f"{q_min}..{q_max} and keys 0..{tk - 1}; give one id per position"
            )

    def intervals(self, q_pos):
        if not self.contiguous:
            return None
        t = self._t.on(q_pos.device)
        return t["starts"][:, q_pos], t["ends"][:, q_pos]

    def __repr__(self):
        return f"document(ids of shape {tuple(self.ids.shape)})"


class PrefixLM(Mask):
    """Bidirectional over the first prefix_len keys, causal after (keys k <= q or k < prefix_len)."""

    def __init__(self, prefix_len):
        if isinstance(prefix_len, int) and not isinstance(prefix_len, bool):
            prefix_len = [_int_arg("prefix_len", prefix_len, 0)]
        t = _counts("prefix_len", prefix_len)
        self.prefix_len = t
        self._t = _Tensors(prefix=t)

    def __call__(self, b, h, q_pos, k_pos):
        p = self._t.on(q_pos.device)["prefix"]
        return (k_pos <= q_pos) | (k_pos < p[_batch_index(b, p.numel())])

    def check(self, q_min, q_max, tk, batch, heads):
        _check_batch("prefix_len", self.prefix_len.numel(), batch)

    def intervals(self, q_pos):
        p = self._t.on(q_pos.device)["prefix"]
        hi = torch.maximum(q_pos[None], (p - 1)[:, None])
        return torch.full_like(hi, -UNBOUNDED), hi

    def __repr__(self):
        return f"prefix_lm({self.prefix_len.tolist()})"


class GlobalTokens(Mask):
    """Tokens at the given positions attend to everything and are attended by everything."""

    def __init__(self, positions: Sequence[int] | torch.Tensor):
        t = _long_tensor("global_tokens positions", positions, (0, 1)).reshape(-1)
        if t.numel() and int(t.min()) < 0:
            raise ValueError(f"global_tokens positions must be >= 0, got {int(t.min())}")
        self.positions = t
        table = torch.zeros(int(t.max()) + 2 if t.numel() else 1, dtype=torch.bool)
        table[t] = True  # last entry stays False: positions past the table look it up
        self._t = _Tensors(table=table)

    def _is_global(self, pos: torch.Tensor) -> torch.Tensor:
        table = self._t.on(pos.device)["table"]
        return table[pos.clamp(0, table.numel() - 1)] & (pos >= 0)

    def __call__(self, b, h, q_pos, k_pos):
        return self._is_global(q_pos) | self._is_global(k_pos)

    def tile_states(self, grid: Grid):
        gq = grid.row_tiles(self._is_global(grid.q_pos).to(torch.int8), -1)  # (nQ, q_tile); -1 pads
        q_any = (gq == 1).any(-1)
        q_all = (gq != 0).all(-1)
        keys = torch.arange(grid.tk, device=grid.device)
        gk = torch.nn.functional.pad(self._is_global(keys).to(torch.int8), (0, grid.nk * grid.k_tile - grid.tk), value=-1)
        gk = gk.view(grid.nk, grid.k_tile)
        k_any = (gk == 1).any(-1)
        k_all = (gk != 0).all(-1)
        full = q_all[:, None] | k_all[None, :]
        visible = q_any[:, None] | k_any[None, :]
        return states_from(visible, full)[None, None]

    def interval_sets(self, q_pos):
        # a global query sees every key; any other sees the runs of consecutive global positions
        pos = torch.unique(self.positions).to(q_pos.device)
        cut = torch.nonzero(pos[1:] != pos[:-1] + 1).flatten() + 1
        starts = torch.cat([pos[:1], pos[cut]]) if pos.numel() else pos
        ends = torch.cat([pos[cut - 1], pos[-1:]]) if pos.numel() else pos
        R = max(1, starts.numel())
        if R > MAX_INTERVALS:
            return None
        lo = torch.ones(q_pos.numel(), R, dtype=torch.int64, device=q_pos.device)  # empty slots: lo > hi
        hi = torch.zeros_like(lo)
        lo[:, : starts.numel()] = starts
        hi[:, : ends.numel()] = ends
        g = self._is_global(q_pos)
        lo[g], hi[g] = 1, 0
        lo[g, 0], hi[g, 0] = 0, UNBOUNDED
        return lo[None, None], hi[None, None]

    def __repr__(self):
        return f"global_tokens({self.positions.tolist()})"


class Strided(Mask):
    """Key k visible from query q iff (q - k) is a multiple of stride (Sparse Transformer, arXiv:1904.10509)."""

    def __init__(self, stride: int):
        self.stride = _int_arg("strided stride", stride, 1)

    def __call__(self, b, h, q_pos, k_pos):
        return torch.remainder(q_pos - k_pos, self.stride) == 0

    def tile_states(self, grid: Grid):
        s = self.stride
        if s == 1:
            return torch.full((1, 1, grid.nq, grid.nk), FULL, dtype=torch.int8, device=grid.device)
        if grid.k_tile >= s:  # every key tile holds a key of every residue class
            return torch.full((1, 1, grid.nq, grid.nk), PARTIAL, dtype=torch.int8, device=grid.device)
        # Row q sees something in [k0, k1] iff the first k >= k0 with k = q (mod s) is <= k1.
        rows = []
        for i in range(grid.nq):
            qp = grid.q_pos[i * grid.q_tile : (i + 1) * grid.q_tile, None]
            first = grid.k_first + torch.remainder(qp - grid.k_first, s)
            rows.append((first <= grid.k_last).any(0))
        sees = torch.stack(rows) if rows else torch.zeros(0, grid.nk, dtype=torch.bool, device=grid.device)
        return torch.where(sees, PARTIAL, EMPTY).to(torch.int8)[None, None]

    def __repr__(self):
        return f"strided({self.stride})"


class BlockSparse(Mask):
    """Block (i, j) of size block_size x block_size is visible iff layout[..., i, j]."""

    def __init__(self, layout: torch.Tensor, block_size: int):
        if not isinstance(layout, torch.Tensor):
            layout = torch.as_tensor(layout)
        if layout.dtype != torch.bool:
            raise TypeError(f"block_sparse layout must be a bool tensor, got dtype {layout.dtype}")
        if not 2 <= layout.dim() <= 4:
            raise ValueError(
                "block_sparse layout must have shape (nq_blocks, nk_blocks), (H, nq, nk) or "
                f"(B, H, nq, nk); got {tuple(layout.shape)}"
            )
        self.block_size = _int_arg("block_sparse block_size", block_size, 1)
        self.layout = layout.view(*([1] * (4 - layout.dim())), *layout.shape).to("cpu", copy=True)
        counts = torch.nn.functional.pad(self.layout.to(torch.int32).cumsum(-1).cumsum(-2), (1, 0, 1, 0))
        self._t = _Tensors(layout=self.layout, counts=counts)  # counts: 2-D prefix sums

    def __call__(self, b, h, q_pos, k_pos):
        lay = self._t.on(q_pos.device)["layout"]
        bs = self.block_size
        return lay[_batch_index(b, lay.shape[0]), _batch_index(h, lay.shape[1]), q_pos // bs, k_pos // bs]

    def check(self, q_min, q_max, tk, batch, heads):
        nb, nh, nqb, nkb = self.layout.shape
        _check_batch("block_sparse layout", nb, batch)
        if nh not in (1, heads):
            raise ValueError(f"block_sparse layout has {nh} heads but the call has {heads}; give {heads} or 1")
        bs = self.block_size
        if q_min < 0 or q_max >= nqb * bs or tk > nkb * bs:
            raise ValueError(
                f"block_sparse layout {nqb}x{nkb} blocks of {bs} covers query positions "
                f"0..{nqb * bs - 1} and keys 0..{nkb * bs - 1}, but the call needs queries "
                f"{q_min}..{q_max} and keys 0..{tk - 1}; enlarge the layout"
            )

    def tile_states(self, grid: Grid):
        counts = self._t.on(grid.device)["counts"]  # (B', H', nqb+1, nkb+1)
        bs = self.block_size
        q_lo, q_hi = grid.q_hull()
        qb0, qb1 = q_lo // bs, q_hi // bs + 1  # block ranges of each query tile, (nQ,)
        kb0, kb1 = grid.k_first // bs, grid.k_last // bs + 1
        def at(i, j):
            return counts[:, :, i[:, None], j[None, :]]
        inside = at(qb1, kb1) - at(qb0, kb1) - at(qb1, kb0) + at(qb0, kb0)
        area = (qb1 - qb0)[:, None] * (kb1 - kb0)[None, :]
        return states_from(inside > 0, inside == area)

    def interval_sets(self, q_pos):
        # each row of blocks as its runs of visible blocks: (B', H', nqb, R) bounds, then one row per query
        lay = self._t.on(q_pos.device)["layout"]
        nkb = lay.shape[-1]
        pad = torch.zeros_like(lay[..., :1])
        starts = lay & ~torch.cat([pad, lay[..., :-1]], -1)
        ends = lay & ~torch.cat([lay[..., 1:], pad], -1)
        R = max(1, int(starts.sum(-1).max()) if lay.numel() else 1)
        if R > MAX_INTERVALS:
            return None
        idx = torch.arange(nkb, device=q_pos.device)
        first = torch.where(starts, idx, nkb).sort(-1).values[..., :R]  # nkb: no run
        last = torch.where(ends, idx, nkb).sort(-1).values[..., :R]
        bs = self.block_size
        lo = torch.where(first < nkb, first * bs, 1)
        hi = torch.where(last < nkb, (last + 1) * bs - 1, 0)
        qb = (q_pos // bs).clamp(0, lay.shape[2] - 1)
        return lo[:, :, qb], hi[:, :, qb]

    def __repr__(self):
        return f"block_sparse(layout of shape {tuple(self.layout.shape)}, {self.block_size})"


class KeyPadding(Mask):
    """Keys where ``attention_mask[b, k]`` is 0 are hidden (Hugging Face's ``attention_mask``, any padding side)."""

    def __init__(self, attention_mask):
        t = torch.as_tensor(attention_mask)
        if t.dim() != 2:
            raise ValueError(f"attention_mask must be (B, Tk), got shape {tuple(t.shape)}")
        if t.is_floating_point():
            raise TypeError(f"attention_mask must hold 0/1 integers or bools, got dtype {t.dtype}")
        keep = t.detach().to("cpu", torch.bool, copy=True)
        self.keep = keep
        n = keep.shape[1]
        idx = torch.arange(n)
        first = torch.where(keep, idx, n).amin(-1)
        last = torch.where(keep, idx, -1).amax(-1)
        self.contiguous = bool((keep.sum(-1) == (last - first + 1).clamp(min=0)).all())
        self._t = _Tensors(keep=keep, first=first, last=last)

    def __call__(self, b, h, q_pos, k_pos):
        keep = self._t.on(k_pos.device)["keep"]
        return keep[_batch_index(b, keep.shape[0]), k_pos]

    def check(self, q_min, q_max, tk, batch, heads):
        _check_batch("attention_mask", self.keep.shape[0], batch)
        if self.keep.shape[1] < tk:
            raise ValueError(f"attention_mask covers {self.keep.shape[1]} keys but the call has Tk={tk}; "
                             "give one entry per key (extend it by 1 per decoded token)")

    def intervals(self, q_pos):
        if not self.contiguous:
            return None
        t = self._t.on(q_pos.device)
        n = q_pos.numel()
        return t["first"][:, None].expand(-1, n), t["last"][:, None].expand(-1, n)

    def __repr__(self):
        return f"key_padding(shape={tuple(self.keep.shape)})"
