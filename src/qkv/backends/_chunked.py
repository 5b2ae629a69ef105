"""The `chunked` backend: tiles of query rows, each visiting only the keys its mask leaves visible.

Forward runs one kernel call per tile over that tile's visible keys, so memory
is O(Tq * tile) and work is proportional to the visible area. Backward is a
custom autograd function that recomputes per tile from the saved output and
log-sum-exp (as FlashAttention does, arXiv:2205.14135) and adds key/value
gradients in place, so nothing the size of the score matrix is ever held.

On the CPU, in float32/float64 without score_mod, bias or dropout, masks whose
rows each see one key interval (causal, windows, documents, padding, prefix-LM,
their intersections) run the whole forward pass in qkv's native kernel
(`_native.py`): exact row bounds, no mask tensor, output written in place.
The fused CPU flash kernel serves tiles when it can (float mask, no
score_mod, no dropout, no bias gradient, D == Dv); otherwise `math_attention`
runs per tile, recomputed under autograd in the backward pass.
Probabilities (`return_weights`, `attention_weights`) come from a second pass
per tile, exact because each tile sees all visible keys of its rows at once.
"""

from __future__ import annotations

import torch

from ..masks._base import Mask, evaluate4d
from ._kernels import (
    NEG_INF,
    accumulation_dtype,
    flash_available,
    flash_backward,
    flash_forward,
    index_grids,
    math_attention,
    probabilities,
    scores,
    unit_stride,
)
from . import _native
from ._plan import Band, Plan, Tile, plan_for

_SCRATCH_BYTES = 32 << 20  # per chunk of scores or per-tile kernel buffers; bounds memory for long rows


def call_plan(mask: Mask | None, q_offset: int, tq: int, tk: int, batch: int, heads: int, device) -> Plan:
    """Plan for a call with contiguous query rows at q_offset..q_offset+tq-1 (cached on the mask)."""
    q_pos = torch.arange(tq, device=device) + q_offset
    return plan_for(mask, q_pos, tk, batch, heads, cache_key=("rows", q_offset, tq))


def _tiles(x: torch.Tensor, b: int, row: int, count: int, step: int, rows: int) -> torch.Tensor:
    """Strided view (count, H, rows, ...) of batch entry b: tile t starts at row + t * step. Views may overlap."""
    st = x.stride()
    size = (count, x.shape[1], rows, *x.shape[3:])
    stride = (step * st[2], st[1], st[2], *st[3:])
    return x.as_strided(size, stride, x.storage_offset() + b * st[0] + row * st[2])


def _in_bands(row: int, bands) -> bool:
    return any(row in b.rows for b in bands)


class _Run:
    """Everything a chunked call needs besides q, k, v, bias; shared by forward, backward and the weights pass."""

    def __init__(self, plan: Plan, mask, score_mod, scale, q_pos, batch, heads, dropout_p=0.0, need_lse=True):
        self.plan = plan
        self.mask = mask
        self.score_mod = score_mod
        self.scale = scale
        self.q_pos = q_pos
        self.batch = batch
        self.heads = heads
        self.dropout_p = dropout_p
        self.seed = int(torch.randint(0, 2**62, (1,)).item()) if dropout_p > 0 else 0
        self.need_lse = need_lse  # the public lse (-inf on empty rows) costs a pass over each tile's mask

    # -- per-tile pieces ------------------------------------------------------

    @staticmethod
    def keys(x: torch.Tensor, t: Tile) -> torch.Tensor:
        return x[:, :, t.keys] if isinstance(t.keys, slice) else x.index_select(2, t.keys)

    def tile_mask(self, t: Tile, r0: int, r1: int) -> torch.Tensor | None:
        if not t.masked:
            return None
        qp = self.q_pos[r0:r1]
        return evaluate4d(self.mask, *index_grids(self.batch, self.heads, qp, t.key_positions(qp.device)))

    @staticmethod
    def tile_bias(bias: torch.Tensor | None, t: Tile, r0: int, r1: int) -> torch.Tensor | None:
        if bias is None:
            return None
        if bias.shape[-2] > 1:
            bias = bias[:, :, r0:r1]
        if bias.shape[-1] > 1:
            bias = bias[..., t.keys] if isinstance(t.keys, slice) else bias.index_select(-1, t.keys)
        return bias

    def additive(self, t: Tile, bias, dtype) -> torch.Tensor | None:
        """Mask and bias of a tile as one additive float tensor for the fused kernel."""
        m = self.tile_mask(t, t.r0, t.r1)
        b = self.tile_bias(bias, t, t.r0, t.r1)
        if m is None:
            return None if b is None else b.to(dtype)
        add = torch.zeros(m.shape, dtype=dtype, device=m.device).masked_fill_(~m, NEG_INF)
        return add if b is None else add + b.to(dtype)

    def chunks(self, t: Tile):
        """Row sub-ranges of a tile for the math kernel, sized so scores fit the scratch budget."""
        per_row = max(1, self.batch * self.heads * t.width * 4 * 3)
        step = max(1, min(t.r1 - t.r0, _SCRATCH_BYTES // per_row))
        for r0 in range(t.r0, t.r1, step):
            yield r0, min(r0 + step, t.r1)

    def generator(self, tile_index: int, r0: int, device) -> torch.Generator | None:
        if self.dropout_p == 0:
            return None
        g = torch.Generator(device=device)
        g.manual_seed((self.seed + 1_000_003 * tile_index + r0) % (2**63))
        return g

    def math(self, q, k, v, bias, t: Tile, i: int, r0: int, r1: int, need_weights=False):
        return math_attention(
            q[:, :, r0:r1], self.keys(k, t), None if v is None else self.keys(v, t),
            scale=self.scale, q_pos=self.q_pos[r0:r1], k_pos=t.key_positions(q.device),
            mask=self.tile_mask(t, r0, r1), bias=self.tile_bias(bias, t, r0, r1), score_mod=self.score_mod,
            dropout_p=self.dropout_p, generator=self.generator(i, r0, q.device), need_weights=need_weights,
        )

    def use_flash(self, q, v, bias) -> bool:
        return (
            self.score_mod is None
            and self.dropout_p == 0
            and not (bias is not None and bias.requires_grad)
            and flash_available(q, v)
        )

    # -- passes ------------------------------------------------------------------

    def forward(self, q, k, v, bias):
        """Returns out (B, Hq, Tq, Dv), the kernels' raw lse (for backward) and the public lse (-inf on empty rows)."""
        native = self._native_forward(q, k, v, bias)
        if native is not None:
            return native
        B, Hq, Tq = q.shape[:3]
        # (B, Tq, Hq, Dv) in memory, as the fused kernel lays out its own outputs: copying a band's result in
        # is one contiguous block, and callers merging heads (out.transpose(1, 2).reshape) get a view, not a copy.
        out = q.new_empty(B, Tq, Hq, v.shape[-1]).transpose(1, 2)
        lse = torch.full((B, Hq, Tq), NEG_INF, dtype=accumulation_dtype(q.dtype), device=q.device)
        flash = self.use_flash(q, v, bias)
        raw = torch.zeros_like(lse) if flash else lse
        bands = self._bands(bias) if flash else ()
        for band in bands:
            self._band_forward(band, q, k, v, out, raw, lse if self.need_lse else None)
        covered = 0
        for i, t in enumerate(self.plan.tiles):
            if covered < t.r0:
                out[:, :, covered : t.r0] = 0  # rows that see no key
            covered = t.r1
            if _in_bands(t.r0, bands):
                continue
            if not flash:
                for r0, r1 in self.chunks(t):
                    o, l, _ = self.math(q, k, v, bias, t, i, r0, r1)
                    out[:, :, r0:r1] = o
                    lse[:, :, r0:r1] = l
                continue
            add = self.additive(t, bias, q.dtype)
            o, l = flash_forward(q[:, :, t.r0 : t.r1], self.keys(k, t), self.keys(v, t), add, self.scale)
            out[:, :, t.r0 : t.r1] = o
            raw[:, :, t.r0 : t.r1] = l
            if self.need_lse:
                if add is not None:  # the kernel reports 0, not -inf, on rows that see no key
                    l = l.masked_fill(torch.isneginf(add).all(-1), NEG_INF)
                lse[:, :, t.r0 : t.r1] = l
        if covered < Tq:
            out[:, :, covered:] = 0
        return out, raw, lse

    def _native_forward(self, q, k, v, bias):
        """The whole forward pass by the native interval kernel, where the call and the mask allow it."""
        if self.score_mod is not None or self.dropout_p or bias is not None or not _native.supports(q, k, v):
            return None
        Tk = k.shape[2]
        if self.mask is None:
            lo = torch.zeros(1, self.q_pos.numel(), dtype=torch.int64, device=q.device)
            iv = (lo, lo + Tk - 1)
        else:
            iv = self.mask._intervals(self.q_pos)
        if iv is None:
            return None
        out, lse = _native.interval_attention(q, k, v, *iv, self.scale)
        raw = lse.masked_fill(torch.isneginf(lse), 0.0)  # what the fused backward expects on rows that see no key
        return out, raw, lse

    def _bands(self, bias) -> tuple[Band, ...]:
        """Bands served by batched kernel calls (a bias differs per tile, so it rules them out)."""
        return () if bias is not None else self.plan.bands

    def _band_add(self, band: Band, dtype, device) -> torch.Tensor:
        add = torch.zeros(band.q_tile, band.width, dtype=dtype, device=device)
        return add.masked_fill_(~band.pattern(device), NEG_INF)[None, None]  # (1, 1, q_tile, width)

    def _band_forward(self, band: Band, q, k, v, out, raw, lse):
        add = self._band_add(band, q.dtype, q.device)
        r, n, qt = band.row, band.count, band.q_tile
        for b in range(q.shape[0]):
            o, l = flash_forward(
                _tiles(q, b, r, n, qt, qt), _tiles(k, b, r + band.shift, n, qt, band.width),
                _tiles(v, b, r + band.shift, n, qt, band.width), add, self.scale,
            )
            _tiles(out, b, r, n, qt, qt).copy_(o)
            _tiles(raw, b, r, n, qt, qt).copy_(l)
            if lse is not None:
                _tiles(lse, b, r, n, qt, qt).copy_(l)  # band rows always see keys

    def _band_backward(self, band: Band, dout, q, k, v, out, raw, dq, dk, dv):
        add = self._band_add(band, q.dtype, q.device)
        qt, w = band.q_tile, band.width
        # The kernel returns key/value gradients per tile window (width/q_tile times the keys they
        # cover), so take the band in slices of tiles that keep those buffers within the scratch budget.
        per_tile = 4 * w * k.shape[1] * (k.shape[-1] + v.shape[-1]) * k.element_size()
        step = max(1, min(band.count, _SCRATCH_BYTES // max(1, per_tile)))
        for b in range(q.shape[0]):
            for c0 in range(0, band.count, step):
                n = min(step, band.count - c0)
                r = band.row + c0 * qt
                gq, gk, gv = flash_backward(
                    _tiles(dout, b, r, n, qt, qt), _tiles(q, b, r, n, qt, qt), _tiles(k, b, r + band.shift, n, qt, w),
                    _tiles(v, b, r + band.shift, n, qt, w), _tiles(out, b, r, n, qt, qt), _tiles(raw, b, r, n, qt, qt),
                    add, self.scale,
                )
                if dq is not None:
                    _tiles(dq, b, r, n, qt, qt).copy_(gq)
                # Windows of neighbouring tiles overlap; add them back one tile-width slice at a time,
                # within which the tiles' key ranges are disjoint.
                for full, part in ((dk, gk), (dv, gv)):
                    if full is None:
                        continue
                    for w0 in range(0, w, qt):
                        w1 = min(w, w0 + qt)
                        _tiles(full, b, r + band.shift + w0, n, qt, w1 - w0).add_(part[:, :, w0:w1])

    def backward(self, dout, dlse, q, k, v, bias, out, raw, needs):
        dq = torch.zeros_like(q) if needs[0] else None
        dk = torch.zeros(k.shape, dtype=accumulation_dtype(k.dtype), device=k.device) if needs[1] else None
        dv = torch.zeros(v.shape, dtype=accumulation_dtype(v.dtype), device=v.device) if needs[2] else None
        dbias = torch.zeros_like(bias) if needs[3] else None
        if dout is None:
            dout = torch.zeros_like(out)
        flash = self.use_flash(q, v, bias) and dlse is None
        bands = self._bands(bias) if flash else ()
        for band in bands:
            self._band_backward(band, dout, q, k, v, out, raw, dq, dk, dv)
        for i, t in enumerate(self.plan.tiles):
            if _in_bands(t.r0, bands):
                continue
            if flash:
                g = flash_backward(
                    dout[:, :, t.r0 : t.r1], q[:, :, t.r0 : t.r1], self.keys(k, t), self.keys(v, t),
                    out[:, :, t.r0 : t.r1], raw[:, :, t.r0 : t.r1], self.additive(t, bias, q.dtype), self.scale,
                )
                self._accumulate(t, t.r0, t.r1, (dq, dk, dv, None), g)
                continue
            for r0, r1 in self.chunks(t):
                self._math_backward(dout, dlse, q, k, v, bias, t, i, r0, r1, (dq, dk, dv, dbias))
        cast = lambda g, x: None if g is None else g.to(x.dtype)  # noqa: E731
        return dq, cast(dk, k), cast(dv, v), dbias

    def _math_backward(self, dout, dlse, q, k, v, bias, t, i, r0, r1, grads):
        leaves = [
            q[:, :, r0:r1].detach().requires_grad_(grads[0] is not None),
            self.keys(k, t).detach().requires_grad_(grads[1] is not None),
            self.keys(v, t).detach().requires_grad_(grads[2] is not None),
        ]
        b = self.tile_bias(bias, t, r0, r1)
        leaves.append(None if b is None else b.detach().requires_grad_(grads[3] is not None))
        with torch.enable_grad():
            o, l, _ = math_attention(
                leaves[0], leaves[1], leaves[2], scale=self.scale, q_pos=self.q_pos[r0:r1],
                k_pos=t.key_positions(q.device), mask=self.tile_mask(t, r0, r1), bias=leaves[3],
                score_mod=self.score_mod, dropout_p=self.dropout_p, generator=self.generator(i, r0, q.device),
            )
            outs, gouts = [o], [dout[:, :, r0:r1]]
            if dlse is not None:
                outs.append(l)
                gouts.append(dlse[:, :, r0:r1].to(l.dtype))
            wanted = [x for x in leaves if x is not None and x.requires_grad]
            got = iter(torch.autograd.grad(outs, wanted, gouts, allow_unused=True))
        g = [next(got) if x is not None and x.requires_grad else None for x in leaves]
        self._accumulate(t, r0, r1, grads, g)

    def _accumulate(self, t: Tile, r0, r1, grads, g):
        dq, dk, dv, dbias = grads
        if dq is not None and g[0] is not None:
            dq[:, :, r0:r1] += g[0]
        for full, part in ((dk, g[1]), (dv, g[2])):
            if full is None or part is None:
                continue
            if isinstance(t.keys, slice):
                full[:, :, t.keys] += part
            else:
                full.index_add_(2, t.keys, part.to(full.dtype))
        if dbias is not None and g[3] is not None:
            target = dbias[:, :, r0:r1] if dbias.shape[-2] > 1 else dbias
            if dbias.shape[-1] == 1:
                target += g[3]
            elif isinstance(t.keys, slice):
                target[..., t.keys] += g[3]
            else:
                target.index_add_(-1, t.keys, g[3])

    def stream(self, q, k, bias, lse: torch.Tensor | None, fn) -> None:
        """Call ``fn(r0, r1, key_positions (W,), p (B, Hq, r1 - r0, W))`` with the exact probabilities of
        every tile chunk; rows a tile does not list see no key (all-zero rows).

        With the forward pass's log-sum-exp the probabilities are ``exp(score - lse)``,
        a second pass with no reduction; without it each chunk normalises itself
        (a tile holds every visible key of its rows).
        """
        for i, t in enumerate(self.plan.tiles):
            kpos = t.key_positions(q.device)
            for r0, r1 in self.chunks(t):
                if lse is None:
                    p = self.math(q, k, None, bias, t, i, r0, r1, need_weights=True)[2]
                else:
                    s = scores(q[:, :, r0:r1], self.keys(k, t), scale=self.scale, q_pos=self.q_pos[r0:r1], k_pos=kpos,
                               mask=self.tile_mask(t, r0, r1), bias=self.tile_bias(bias, t, r0, r1),
                               score_mod=self.score_mod)
                    p = probabilities(s, lse[:, :, r0:r1])
                fn(r0, r1, kpos, p)

    def weights(self, q, k, bias, lse: torch.Tensor | None = None, *, topk: int | None = None):
        """Exact probabilities: dense (B, Hq, Tq, Tk), or top-k (values, key indices) per row."""
        B, Hq, Tq = q.shape[:3]
        acc = accumulation_dtype(q.dtype)
        if topk is not None:
            values = torch.zeros(B, Hq, Tq, topk, dtype=acc, device=q.device)
            index = torch.full((B, Hq, Tq, topk), -1, dtype=torch.long, device=q.device)

            def keep(r0, r1, kpos, p):
                n = min(topk, p.shape[-1])
                val, idx = p.topk(n, dim=-1)
                values[:, :, r0:r1, :n] = val
                index[:, :, r0:r1, :n] = torch.where(val > 0, kpos[idx], -1)  # -1: no (visible) key

            self.stream(q, k, bias, lse, keep)
            return values, index
        dense = torch.zeros(B, Hq, Tq, self.plan.tk, dtype=acc, device=q.device)

        def write(r0, r1, kpos, p):
            dense[:, :, r0:r1].index_copy_(3, kpos, p)

        self.stream(q, k, bias, lse, write)
        return dense


class _ChunkedAttention(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, k, v, bias, run: _Run):
        ctx.set_materialize_grads(False)
        q, k, v = unit_stride(q), unit_stride(k), unit_stride(v)
        out, raw, lse = run.forward(q, k, v, bias)
        ctx.save_for_backward(q, k, v, bias, out, raw)
        ctx.run = run
        return out, lse

    @staticmethod
    def backward(ctx, dout, dlse):
        q, k, v, bias, out, raw = ctx.saved_tensors
        needs = ctx.needs_input_grad[:4]
        dq, dk, dv, dbias = ctx.run.backward(dout, dlse, q, k, v, bias, out, raw, needs)
        return dq, dk, dv, dbias, None


def chunked(q, k, v, *, mask, score_mod, bias, scale, q_offset, dropout_p, return_weights, return_lse):
    """The `chunked` backend: see the module docstring."""
    B, Hq, Tq = q.shape[:3]
    Tk = k.shape[2]
    plan = call_plan(mask, q_offset, Tq, Tk, B, Hq, q.device)
    q_pos = torch.arange(Tq, device=q.device) + q_offset
    run = _Run(plan, mask, score_mod, scale, q_pos, B, Hq, dropout_p, need_lse=return_lse or return_weights)
    out, lse = _ChunkedAttention.apply(q, k, v, bias, run)
    weights = None
    if return_weights:
        with torch.no_grad():
            weights = run.weights(q, k, bias, lse.detach())
    return out, weights, lse if return_lse else None


def _weights_run(q, k, *, mask, score_mod, bias, scale, q_pos) -> _Run:
    B, Hq = q.shape[:2]
    Tk = k.shape[2]
    contiguous = q_pos.numel() == 0 or torch.equal(q_pos, torch.arange(q_pos.numel(), device=q_pos.device) + int(q_pos[0]))
    key = ("rows", int(q_pos[0]), q_pos.numel()) if contiguous and q_pos.numel() else None
    plan = plan_for(mask, q_pos, Tk, B, Hq, cache_key=key)
    return _Run(plan, mask, score_mod, scale, q_pos, B, Hq)


def chunked_weights(q, k, *, mask, score_mod, bias, scale, q_pos, topk):
    """Probabilities for query rows at absolute positions `q_pos` (any order), without the full matrix in memory."""
    run = _weights_run(q, k, mask=mask, score_mod=score_mod, bias=bias, scale=scale, q_pos=q_pos)
    with torch.no_grad():
        return run.weights(q, k, bias, topk=topk)


def stream_weights(q, k, fn, *, mask, score_mod, bias, scale, q_pos) -> None:
    """Exact probabilities tile by tile: ``fn(r0, r1, key_positions, p (B, Hq, r1 - r0, W))`` (see `_Run.stream`).

    Arguments as `chunked_weights` (validated by the caller); memory O(tile x Tk).
    """
    run = _weights_run(q, k, mask=mask, score_mod=score_mod, bias=bias, scale=scale, q_pos=q_pos)
    with torch.no_grad():
        run.stream(q, k, bias, None, fn)
