"""The chunked weights pass: exact probabilities tile by tile, for `attention_weights`, captures and top-k."""

from __future__ import annotations

import torch

from ..kernels import accumulation_dtype, probabilities, scores


def stream(run, q, k, bias, lse: torch.Tensor | None, fn) -> None:
    """Call ``fn(r0, r1, key_positions (W,), p (B, Hq, r1 - r0, W))`` with the exact probabilities of
    every tile chunk; rows a tile does not list see no key (all-zero rows).

    With the forward pass's log-sum-exp the probabilities are ``exp(score - lse)``,
    a second pass with no reduction; without it each chunk normalises itself
    (a tile holds every visible key of its rows).
    """
    for i, t in enumerate(run.plan.tiles):
        kpos = t.key_positions(q.device)
        for r0, r1 in run.chunks(t):
            if lse is None:
                p = run.math(q, k, None, bias, t, i, r0, r1, need_weights=True)[2]
            else:
                s = scores(q[:, :, r0:r1], run.keys(k, t), scale=run.scale, q_pos=run.q_pos[r0:r1], k_pos=kpos,
                           mask=run.tile_mask(t, r0, r1), bias=run.tile_bias(bias, t, r0, r1),
                           score_mod=run.score_mod)
                p = probabilities(s, lse[:, :, r0:r1])
            fn(r0, r1, kpos, p)


def weights(run, q, k, bias, lse: torch.Tensor | None = None, *, topk: int | None = None):
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
            index[:, :, r0:r1, :n] = torch.where(val != 0, kpos[idx], -1)  # -1: no key (NaN: a key that reaches)

        stream(run, q, k, bias, lse, keep)
        return values, index
    dense = torch.zeros(B, Hq, Tq, run.plan.tk, dtype=acc, device=q.device)

    def write(r0, r1, kpos, p):
        dense[:, :, r0:r1].index_copy_(3, kpos, p)

    stream(run, q, k, bias, lse, write)
    return dense
