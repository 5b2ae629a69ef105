"""Chunked strategies on PyTorch's fused CPU flash kernel: bands of equal tiles, and single tiles.

A band (`plan.Band`) is a run of tiles that share one mask pattern, shifted
along the diagonal (sliding windows): its tiles are strided views of q, k, v
and go to the kernel as one batch. Other tiles go one by one with an additive
mask. Backward reuses the kernel's own log-sum-exp from the forward pass.
"""

from __future__ import annotations

import torch

from ..kernels import NEG_INF, flash_backward, flash_forward
from .plan import SCRATCH_BYTES, Band, Tile


def strided_tiles(x: torch.Tensor, b: int, row: int, count: int, step: int, rows: int) -> torch.Tensor:
    """Strided view (count, H, rows, ...) of batch entry b: tile t starts at row + t * step. Views may overlap."""
    st = x.stride()
    size = (count, x.shape[1], rows, *x.shape[3:])
    stride = (step * st[2], st[1], st[2], *st[3:])
    return x.as_strided(size, stride, x.storage_offset() + b * st[0] + row * st[2])


def _band_add(band: Band, dtype, device) -> torch.Tensor:
    add = torch.zeros(band.q_tile, band.width, dtype=dtype, device=device)
    return add.masked_fill_(~band.pattern(device), NEG_INF)[None, None]  # (1, 1, q_tile, width)


def band_forward(run, band: Band, q, k, v, out, raw, lse):
    add = _band_add(band, q.dtype, q.device)
    r, n, qt = band.row, band.count, band.q_tile
    for b in range(q.shape[0]):
        o, l = flash_forward(
            strided_tiles(q, b, r, n, qt, qt), strided_tiles(k, b, r + band.shift, n, qt, band.width),
            strided_tiles(v, b, r + band.shift, n, qt, band.width), add, run.scale,
        )
        strided_tiles(out, b, r, n, qt, qt).copy_(o)
        strided_tiles(raw, b, r, n, qt, qt).copy_(l)
        if lse is not None:
            strided_tiles(lse, b, r, n, qt, qt).copy_(l)  # band rows always see keys


def band_backward(run, band: Band, dout, q, k, v, out, raw, dq, dk, dv):
    add = _band_add(band, q.dtype, q.device)
    qt, w = band.q_tile, band.width
    # The kernel returns key/value gradients per tile window (width/q_tile times the keys they
    # cover), so take the band in slices of tiles that keep those buffers within the scratch budget.
    per_tile = 4 * w * k.shape[1] * (k.shape[-1] + v.shape[-1]) * k.element_size()
    step = max(1, min(band.count, SCRATCH_BYTES // max(1, per_tile)))
    for b in range(q.shape[0]):
        for c0 in range(0, band.count, step):
            n = min(step, band.count - c0)
            r = band.row + c0 * qt
            view = lambda x, start, rows: strided_tiles(x, b, start, n, qt, rows)  # noqa: E731
            gq, gk, gv = flash_backward(
                view(dout, r, qt), view(q, r, qt), view(k, r + band.shift, w), view(v, r + band.shift, w),
                view(out, r, qt), view(raw, r, qt), add, run.scale,
            )
            if dq is not None:
                view(dq, r, qt).copy_(gq)
            # Windows of neighbouring tiles overlap; add them back one tile-width slice at a time,
            # within which the tiles' key ranges are disjoint.
            for full, part in ((dk, gk), (dv, gv)):
                if full is None:
                    continue
                for w0 in range(0, w, qt):
                    w1 = min(w, w0 + qt)
                    view(full, r + band.shift + w0, w1 - w0).add_(part[:, :, w0:w1])


def tile_forward(run, t: Tile, q, k, v, bias, out, raw, lse):
    add = run.additive(t, bias, q.dtype)
    o, l = flash_forward(q[:, :, t.r0 : t.r1], run.keys(k, t), run.keys(v, t), add, run.scale)
    out[:, :, t.r0 : t.r1] = o
    raw[:, :, t.r0 : t.r1] = l
    if lse is not None:
        if add is not None:  # the kernel reports 0, not -inf, on rows that see no key
            l = l.masked_fill(torch.isneginf(add).all(-1), NEG_INF)
        lse[:, :, t.r0 : t.r1] = l


def tile_backward(run, t: Tile, dout, q, k, v, bias, out, raw, grads):
    g = flash_backward(
        dout[:, :, t.r0 : t.r1], q[:, :, t.r0 : t.r1], run.keys(k, t), run.keys(v, t),
        out[:, :, t.r0 : t.r1], raw[:, :, t.r0 : t.r1], run.additive(t, bias, q.dtype), run.scale,
    )
    run.accumulate(t, t.r0, t.r1, grads, g)
