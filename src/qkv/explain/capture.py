"""Capturing attention from any qkv model, whichever backend runs it.

`capture` hooks every `MultiHeadAttention` of a model. The model's own forward
pass is untouched (same backend, same speed class); next to it, each hooked
layer recomputes its exact probabilities tile by tile with
`qkv.functional.stream_call` (on the layer's own validated call) and keeps what was asked for: the full
(H, Tq, Tk) matrices for short inputs, the top-k keys of every query for long
ones, and the head average when rollout needs it. Only batch element 0 is kept.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Sequence
from dataclasses import dataclass

import torch
from torch import nn

from ..functional import stream_call
from ..nn import MultiHeadAttention

FULL_LIMIT = 512  # capture full matrices when Tq, Tk <= this (and topk is not forced)
MEAN_LIMIT = 8192  # keep dense head averages (for rollout) up to this many positions
DEFAULT_TOPK = 16


@dataclass
class AttentionMaps:
    """The attention of one layer's self- (or cross-) attention, batch element 0."""

    name: str  # module name in the model
    layer: int  # index among the captured modules of the same kind
    kind: str  # "self" or "cross"
    heads: list[int]  # the heads kept, in the order of the tensors below
    tq: int
    tk: int
    dense: torch.Tensor | None = None  # (len(heads), Tq, Tk)
    top_values: torch.Tensor | None = None  # (len(heads), Tq, k), largest first
    top_index: torch.Tensor | None = None  # (len(heads), Tq, k) key indices; -1 where a row has fewer keys
    mean: torch.Tensor | None = None  # (Tq, Tk) average over all heads

    def head(self, h: int) -> torch.Tensor:
        """Dense (Tq, Tk) weights of head ``h`` (needs full capture)."""
        if self.dense is None:
            raise ValueError(f"{self.name}: only the top-k keys were captured; capture with full=True for dense maps")
        return self.dense[self.heads.index(h)]

    def topk(self, h: int | None, k: int) -> tuple[torch.Tensor, torch.Tensor]:
        """(values, indices) (Tq, k) of head ``h``, or of the head average for ``h=None``."""
        if h is None:
            if self.mean is None:
                raise ValueError(f"{self.name}: the head average was not kept (inputs longer than {MEAN_LIMIT})")
            src = self.mean
        elif self.dense is not None:
            src = self.head(h)
        else:
            i = self.heads.index(h)
            return self.top_values[i, :, :k], self.top_index[i, :, :k]
        n = min(k, src.shape[-1])
        val, idx = src.topk(n, dim=-1)
        if n < k:
            val = torch.nn.functional.pad(val, (0, k - n))
            idx = torch.nn.functional.pad(idx, (0, k - n), value=-1)
        return val, idx


class Capture:
    """What `capture` collects: ``maps`` (self-attention, in layer order) and ``cross_maps``."""

    def __init__(self):
        self.maps: list[AttentionMaps] = []
        self.cross_maps: list[AttentionMaps] = []

    def __len__(self) -> int:
        return len(self.maps)


def _attention_modules(model: nn.Module) -> list[tuple[str, MultiHeadAttention]]:
    return [(n, m) for n, m in model.named_modules() if isinstance(m, MultiHeadAttention)]


@contextlib.contextmanager
def capture(model: nn.Module, *, layers: Sequence[int] | None = None, heads: Sequence[int] | None = None,
            full: bool | None = None, topk: int = DEFAULT_TOPK, mean: bool = True,
            cross: bool = False) -> Iterator[Capture]:
    """Collect attention maps during the forward passes run inside the block.

    Args:
        layers: self-attention layers to keep (default all; negative indices count from the end).
        heads: heads to keep (default all).
        full: keep full matrices (default: when Tq and Tk <= FULL_LIMIT), else top-``topk`` per row.
        mean: also keep the dense head average (needed for rollout; skipped past MEAN_LIMIT).
        cross: also capture cross-attention (encoder-decoder models).
    """
    mods = _attention_modules(model)
    selfs = [(n, m) for n, m in mods if not m.is_cross]
    crosses = [(n, m) for n, m in mods if m.is_cross]
    keep = set(range(len(selfs))) if layers is None else {i % len(selfs) for i in layers}
    result = Capture()
    hooked = []
    for kind, group, store in (("self", selfs, result.maps), ("cross", crosses if cross else [], result.cross_maps)):
        for i, (name, mod) in enumerate(group):
            if kind == "self" and i not in keep:
                continue
            mod.observer = _observer(name, i, kind, heads, full, topk, mean, store)
            hooked.append(mod)
    try:
        yield result
    finally:
        for mod in hooked:
            mod.observer = None


def _observer(name, layer, kind, heads, full, topk, mean, store):
    def observe(mod, call):
        q = call.q
        Hq, Tq, Tk = q.shape[1], q.shape[2], call.k.shape[2]
        keep = list(range(Hq)) if heads is None else [h % Hq for h in heads]
        dense_mode = full if full is not None else (Tq <= FULL_LIMIT and Tk <= FULL_LIMIT)
        maps = AttentionMaps(name, layer, kind, keep, Tq, Tk)
        sel = torch.tensor(keep, device=q.device)
        if dense_mode:
            maps.dense = torch.zeros(len(keep), Tq, Tk)
        else:
            kk = min(topk, Tk)
            maps.top_values = torch.zeros(len(keep), Tq, kk)
            maps.top_index = torch.full((len(keep), Tq, kk), -1, dtype=torch.long)
        if mean and Tq <= MEAN_LIMIT and Tk <= MEAN_LIMIT:
            maps.mean = torch.zeros(Tq, Tk)

        def collect(r0, r1, kpos, p):
            p0 = p[0].float()  # (Hq, r, W), batch element 0
            kpos_cpu = kpos.cpu()
            if maps.mean is not None:
                maps.mean[r0:r1].index_copy_(1, kpos_cpu, p0.mean(0).cpu())
            ph = p0.index_select(0, sel)
            if maps.dense is not None:
                maps.dense[:, r0:r1].index_copy_(2, kpos_cpu, ph.cpu())
            else:
                n = min(maps.top_values.shape[-1], ph.shape[-1])
                val, idx = ph.topk(n, dim=-1)
                maps.top_values[:, r0:r1, :n] = val.cpu()
                maps.top_index[:, r0:r1, :n] = torch.where(val > 0, kpos[idx], -1).cpu()

        stream_call(call, collect)  # the layer's own call: validated and planned once (runs without grad)
        store.append(maps)

    return observe
