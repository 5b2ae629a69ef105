"""Attention of sequences decoded in a shared batch, row by row, as the engine computes them.

`qkv.explain.capture` reads one forward pass of batch element 0. A generation server decodes many
requests in one left-padded batch, a query row per step; `RowRecorder` keeps, for one request,
the exact probabilities of each of its positions as that position is fed to the model (the prompt
at prefill, then one row per generated token), mapped from the batch's cache columns to the
request's own positions. Together the rows are what `capture` gives for the whole sequence in one
pass (``qkv explain`` on the same token ids): full rows up to `FULL_LIMIT` positions (or with
``full=True``), else the top-``k`` keys of every query.

`observe_rows` hooks a model's self-attention layers for one model call and feeds the recorders of
the batch rows that asked.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Sequence

import torch

from ..functional import stream_call
from .capture import DEFAULT_TOPK, FULL_LIMIT, _attention_modules


class RowRecorder:
    """The attention rows of one sequence: ``rows[position][layer]`` is (heads, position + 1) dense
    weights over key positions 0..position, or a (values, indices) top-k pair (heads, k)."""

    def __init__(self, n_layers: int, n_heads: int, *, layers: Sequence[int] | None = None,
                 heads: Sequence[int] | None = None, topk: int = DEFAULT_TOPK, full: bool | None = None):
        self.layers = sorted({i % n_layers for i in layers}) if layers is not None else list(range(n_layers))
        self.heads = sorted({h % n_heads for h in heads}) if heads is not None else list(range(n_heads))
        self.n_heads, self.topk, self.full = n_heads, topk, full
        self.rows: dict[int, dict[int, object]] = {}
        self._sent = 0  # rows handed out by `take`

    def dense_at(self, position: int) -> bool:
        """Whether the row at ``position`` is kept whole (auto: while the sequence fits FULL_LIMIT)."""
        return self.full if self.full is not None else position < FULL_LIMIT

    def add(self, layer: int, positions: list[int], p: torch.Tensor) -> None:
        """Rows of one layer: ``p`` (len(positions), all heads, n_keys) over key positions 0..n_keys-1."""
        p = p[:, self.heads]
        for j, pos in enumerate(positions):
            row = p[j, :, : pos + 1]
            if self.dense_at(pos):
                self.rows.setdefault(pos, {})[layer] = row.clone()
            else:
                self.rows.setdefault(pos, {})[layer] = _top(row, self.topk)

    @property
    def length(self) -> int:
        """Positions recorded in every layer, counted from 0."""
        n = 0
        while len(self.rows.get(n, ())) == len(self.layers):
            n += 1
        return n

    def take(self, end: int | None = None) -> list[tuple[int, dict]]:
        """The complete rows not taken before (those before position ``end`` if given), as (position,
        {layer: row}), in order (for streaming)."""
        end = self.length if end is None else min(end, self.length)
        out = [(i, self.rows[i]) for i in range(self._sent, end)]
        self._sent = end
        return out

    def row_layers(self, position: int, layers: dict) -> list[dict]:
        """One row as the response's layer entries (``weights`` per head, or ``topk_values``/``topk_indices``)."""
        out = []
        for layer in self.layers:
            r = layers[layer]
            if isinstance(r, tuple):
                out.append({"layer": layer, "heads": self.heads, "topk_values": r[0].tolist(),
                            "topk_indices": r[1].tolist()})
            else:
                out.append({"layer": layer, "heads": self.heads, "weights": r.tolist()})
        return out

    def layer_entries(self) -> list[dict]:
        """Every recorded row as ``qkv explain --json`` lays a whole sequence out: per layer (heads, T, T)
        ``weights`` when the sequence is dense, else (heads, T, k) ``topk_values`` / ``topk_indices``."""
        T = self.length
        dense = self.full if self.full is not None else T <= FULL_LIMIT
        k = min(self.topk, T)
        entries = []
        for layer in self.layers:
            h = len(self.heads)
            if dense:
                w = torch.zeros(h, T, T)
                for i in range(T):
                    w[:, i, : i + 1] = self.rows[i][layer]
                entries.append({"layer": layer, "heads": self.heads, "weights": w.tolist()})
                continue
            val, idx = torch.zeros(h, T, k), torch.full((h, T, k), -1, dtype=torch.long)
            for i in range(T):
                r = self.rows[i][layer]
                v, ix = r if isinstance(r, tuple) else _top(r, self.topk)
                n = min(k, v.shape[-1])
                val[:, i, :n], idx[:, i, :n] = v[:, :n], ix[:, :n]
            entries.append({"layer": layer, "heads": self.heads, "topk_values": val.tolist(),
                            "topk_indices": idx.tolist()})
        return entries


def _top(row: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Top-``k`` (values, key positions) of (heads, n) weights; -1 where a weight is 0 (as `capture`)."""
    n = min(k, row.shape[-1])
    val, idx = row.topk(n, dim=-1)
    return val, torch.where(val > 0, idx, -1)


@contextlib.contextmanager
def observe_rows(model, rows: Sequence[tuple[int, RowRecorder, int, int]]) -> Iterator[None]:
    """Record attention during the model calls inside the block, for some rows of the batch.

    ``rows``: (batch index, recorder, query shift, key shift): query index ``r`` of the call is position
    ``r + query shift`` of that sequence (negative: padding, skipped), cache column ``c`` is position
    ``c - key shift``.
    """
    selfs = [m for _, m in _attention_modules(model) if not m.is_cross]
    wanted = {i for _, rec, _, _ in rows for i in rec.layers}
    hooked = []
    for i, mod in enumerate(selfs):
        if i in wanted:
            mod.observer = _observer(i, [r for r in rows if i in r[1].layers])
            hooked.append(mod)
    try:
        yield
    finally:
        for mod in hooked:
            mod.observer = None


def _observer(layer: int, rows):
    def observe(mod, call):
        Tq, Hq = call.q.shape[2], call.q.shape[1]
        targets = []
        for b, rec, qshift, kshift in rows:
            r0 = max(0, -qshift)  # first query index that is a real position
            if r0 < Tq:  # keys: positions 0..the last query's position
                targets.append((b, rec, r0, qshift, kshift, torch.zeros(Tq - r0, Hq, Tq + qshift)))
        if not targets:
            return

        def collect(c0, c1, kpos, p):  # one pass over the batch's probabilities feeds every target row
            for b, _, r0, _, kshift, out in targets:
                lo = max(c0, r0)
                if lo >= c1:
                    continue
                pos = kpos - kshift
                ok = (pos >= 0) & (pos < out.shape[-1])
                sub = p[b, :, lo - c0 : c1 - c0][..., ok].float().transpose(0, 1)  # (rows, Hq, keys)
                out[lo - r0 : c1 - r0].index_copy_(2, pos[ok].cpu(), sub.cpu())

        stream_call(call, collect)
        for _, rec, r0, qshift, _, out in targets:
            rec.add(layer, list(range(r0 + qshift, Tq + qshift)), out)

    return observe
