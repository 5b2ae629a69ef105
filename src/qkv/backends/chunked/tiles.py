"""The chunked strategy for everything the fused kernel cannot do: `math_attention` per row chunk.

Score mods, dropout, bias gradients, D != Dv and non-CPU devices run here.
Forward keeps no graph; backward recomputes each chunk under autograd and adds
its gradients, so memory stays O(chunk x tile width).
"""

from __future__ import annotations

import torch

from ..kernels import math_attention
from .plan import Tile


def math_forward(run, t: Tile, i: int, q, k, v, bias, out, lse):
    for r0, r1 in run.chunks(t):
        o, l, _ = run.math(q, k, v, bias, t, i, r0, r1)
        out[:, :, r0:r1] = o
        lse[:, :, r0:r1] = l


def math_backward(run, t: Tile, i: int, r0: int, r1: int, dout, dlse, q, k, v, bias, grads):
    leaves = [
        q[:, :, r0:r1].detach().requires_grad_(grads[0] is not None),
        run.keys(k, t).detach().requires_grad_(grads[1] is not None),
        run.keys(v, t).detach().requires_grad_(grads[2] is not None),
    ]
    b = run.tile_bias(bias, t, r0, r1)
    leaves.append(None if b is None else b.detach().requires_grad_(grads[3] is not None))
    with torch.enable_grad():
        o, l, _ = math_attention(
            leaves[0], leaves[1], leaves[2], scale=run.scale, q_pos=run.q_pos[r0:r1],
            k_pos=t.key_positions(q.device), mask=run.tile_mask(t, r0, r1), bias=leaves[3],
            score_mod=run.score_mod, dropout_p=run.dropout_p, generator=run.generator(i, r0, q.device),
            finite=run.finite(q, k, v),
        )
        outs, gouts = [o], [dout[:, :, r0:r1]]
        if dlse is not None:
            outs.append(l)
            gouts.append(dlse[:, :, r0:r1].to(l.dtype))
        wanted = [x for x in leaves if x is not None and x.requires_grad]
        got = iter(torch.autograd.grad(outs, wanted, gouts, allow_unused=True))
    g = [next(got) if x is not None and x.requires_grad else None for x in leaves]
    run.accumulate(t, r0, r1, grads, g)
