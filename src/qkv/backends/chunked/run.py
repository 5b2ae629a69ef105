"""`Run`: one chunked call's shared state and per-tile pieces, and the order of its passes.

Forward and backward visit the plan's tiles. Each tile is served by one of
three strategies, chosen once per call (`Run.fused`):

- bands (`fused.band_forward` / `band_backward`): runs of equal tiles of a
  translation-invariant mask (sliding windows) in one batched fused-kernel call;
- fused tiles (`fused.tile_forward` / `tile_backward`): PyTorch's fused CPU
  flash kernel per tile with an additive mask;
- math tiles (`tiles.math_forward` / `math_backward`): `math_attention` per
  row chunk, for what the fused kernel cannot do (score_mod, dropout, bias
  gradients, D != Dv, other devices), recomputed under autograd in backward.

The weights pass (`weights.stream`) reads the same tiles a second time.
"""

from __future__ import annotations

import torch

from ...masks import evaluate, index_grid
from ..kernels import (
    NEG_INF,
    accumulation_dtype,
    flash_available,
    fusable,
    math_attention,
    maybe_nonfinite,
)
from . import fused, tiles
from .plan import SCRATCH_BYTES, Band, Plan, Tile


def in_bands(row: int, bands) -> bool:
    return any(row in b.rows for b in bands)


class Run:
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
        self._fusable: bool | None = None  # inputs the fused kernel handles exactly (asked once per call)
        self._finite: bool | None = None  # q, k, v hold no NaN or inf: the math kernel skips its checks

    # -- per-tile pieces ------------------------------------------------------

    @staticmethod
    def keys(x: torch.Tensor, t: Tile) -> torch.Tensor:
        return x[:, :, t.keys] if isinstance(t.keys, slice) else x.index_select(2, t.keys)

    def tile_mask(self, t: Tile, r0: int, r1: int) -> torch.Tensor | None:
        if not t.masked:
            return None
        qp = self.q_pos[r0:r1]
        return evaluate(self.mask, *index_grid(self.batch, self.heads, qp, t.key_positions(qp.device)))

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
        step = max(1, min(t.r1 - t.r0, SCRATCH_BYTES // per_row))
        for r0 in range(t.r0, t.r1, step):
            yield r0, min(r0 + step, t.r1)

    def generator(self, tile_index: int, r0: int, device) -> torch.Generator | None:
        if self.dropout_p == 0:
            return None
        g = torch.Generator(device=device)
        g.manual_seed((self.seed + 1_000_003 * tile_index + r0) % (2**63))
        return g

    def finite(self, q, k, v) -> bool:
        """Whether q, k, v are known to hold no NaN or inf (asked once per call, on the CPU only)."""
        if self._finite is None:
            self._finite = not maybe_nonfinite(q, k, v)
        return self._finite

    def math(self, q, k, v, bias, t: Tile, i: int, r0: int, r1: int, need_weights=False):
        return math_attention(
            q[:, :, r0:r1], self.keys(k, t), None if v is None else self.keys(v, t),
            scale=self.scale, q_pos=self.q_pos[r0:r1], k_pos=t.key_positions(q.device),
            mask=self.tile_mask(t, r0, r1), bias=self.tile_bias(bias, t, r0, r1), score_mod=self.score_mod,
            dropout_p=self.dropout_p, generator=self.generator(i, r0, q.device), need_weights=need_weights,
            finite=self.finite(q, k, v),
        )

    def fused(self, q, k, v, bias) -> bool:
        """Whether the fused kernel serves this call's tiles (else the math kernel does). Inputs holding NaN
        or inf go to the math kernel, which applies qkv's rule for them exactly (`kernels.fusable`)."""
        if not (
            self.score_mod is None
            and self.dropout_p == 0
            and not (bias is not None and bias.requires_grad)
            and flash_available(q, v)
        ):
            return False
        if self._fusable is None:
            self._fusable = fusable(q, k, v, bias, self.scale)
        return self._fusable

    def bands(self, bias) -> tuple[Band, ...]:
        """Bands served by batched kernel calls (a bias differs per tile, so it rules them out)."""
        return () if bias is not None else self.plan.bands

    # -- passes ------------------------------------------------------------------

    def forward(self, q, k, v, bias):
        """out (B, Hq, Tq, Dv), the kernels' raw lse (for backward) and the public lse (-inf on empty rows)."""
        B, Hq, Tq = q.shape[:3]
        # (B, Tq, Hq, Dv) in memory, as the fused kernel lays out its own outputs: copying a band's result in
        # is one contiguous block, and callers merging heads (out.transpose(1, 2).reshape) get a view, not a copy.
        out = q.new_empty(B, Tq, Hq, v.shape[-1]).transpose(1, 2)
        lse = torch.full((B, Hq, Tq), NEG_INF, dtype=accumulation_dtype(q.dtype), device=q.device)
        flash = self.fused(q, k, v, bias)
        raw = torch.zeros_like(lse) if flash else lse
        bands = self.bands(bias) if flash else ()
        for band in bands:
            fused.band_forward(self, band, q, k, v, out, raw, lse if self.need_lse else None)
        covered = 0
        for i, t in enumerate(self.plan.tiles):
            if covered < t.r0:
                out[:, :, covered : t.r0] = 0  # rows that see no key
            covered = t.r1
            if in_bands(t.r0, bands):
                continue
            if flash:
                fused.tile_forward(self, t, q, k, v, bias, out, raw, lse if self.need_lse else None)
            else:
                tiles.math_forward(self, t, i, q, k, v, bias, out, lse)
        if covered < Tq:
            out[:, :, covered:] = 0
        return out, raw, lse

    def backward(self, dout, dlse, q, k, v, bias, out, raw, needs):
        dq = torch.zeros_like(q) if needs[0] else None
        dk = torch.zeros(k.shape, dtype=accumulation_dtype(k.dtype), device=k.device) if needs[1] else None
        dv = torch.zeros(v.shape, dtype=accumulation_dtype(v.dtype), device=v.device) if needs[2] else None
        dbias = torch.zeros_like(bias) if needs[3] else None
        if dout is None:
            dout = torch.zeros_like(out)
        flash = self.fused(q, k, v, bias) and dlse is None
        bands = self.bands(bias) if flash else ()
        for band in bands:
            fused.band_backward(self, band, dout, q, k, v, out, raw, dq, dk, dv)
        for i, t in enumerate(self.plan.tiles):
            if in_bands(t.r0, bands):
                continue
            if flash:
                fused.tile_backward(self, t, dout, q, k, v, bias, out, raw, (dq, dk, dv))
            else:
                for r0, r1 in self.chunks(t):
                    tiles.math_backward(self, t, i, r0, r1, dout, dlse, q, k, v, bias, (dq, dk, dv, dbias))
        cast = lambda g, x: None if g is None else g.to(x.dtype)  # noqa: E731
        return dq, cast(dk, k), cast(dv, v), dbias

    def accumulate(self, t: Tile, r0, r1, grads, g):
        """Add one tile's gradients (dq, dk, dv[, dbias]) into the full ones."""
        dq, dk, dv = grads[:3]
        dbias = grads[3] if len(grads) > 3 else None
        if dq is not None and g[0] is not None:
            dq[:, :, r0:r1] += g[0]
        for full, part in ((dk, g[1]), (dv, g[2])):
            if full is None or part is None:
                continue
            if isinstance(t.keys, slice):
                full[:, :, t.keys] += part
            else:
                full.index_add_(2, t.keys, part.to(full.dtype))
        if dbias is not None and len(g) > 3 and g[3] is not None:
            target = dbias[:, :, r0:r1] if dbias.shape[-2] > 1 else dbias
            if dbias.shape[-1] == 1:
                target += g[3]
            elif isinstance(t.keys, slice):
                target[..., t.keys] += g[3]
            else:
                target.index_add_(-1, t.keys, g[3])
