"""Aggregations of captured attention: rollout, per-head statistics, gradient-weighted relevance."""

from __future__ import annotations

from collections.abc import Sequence

import torch

from .capture import AttentionMaps


def rollout(means: Sequence[torch.Tensor], residual: float = 0.5) -> torch.Tensor:
    """Attention rollout (Abnar and Zuidema, arXiv:2005.00928).

    Each layer's head-averaged attention A (T, T) becomes ``residual * I + (1 -
    residual) * A`` (the residual stream), renormalised by row; rollout is their
    product from the first layer to the last. Row i: how much each input
    position flows into position i at the top.
    """
    if not means:
        raise ValueError("rollout needs at least one layer's head-averaged attention")
    T = means[0].shape[-1]
    eye = torch.eye(T, dtype=torch.float32)
    out = None
    for a in means:
        a = residual * eye + (1 - residual) * a.float()
        a = a / a.sum(-1, keepdim=True).clamp(min=1e-12)
        out = a if out is None else a @ out
    return out


def entropy(maps: AttentionMaps) -> torch.Tensor:
    """Mean entropy (nats) of each kept head's attention rows, (heads,). Exact for full capture; from
    the top-k keys only (a lower bound) otherwise."""
    p = maps.dense if maps.dense is not None else maps.top_values
    logs = torch.where(p > 0, p.clamp(min=1e-30).log(), 0.0)
    return -(p * logs).sum(-1).mean(-1)


def mean_distance(maps: AttentionMaps, positions: torch.Tensor | None = None) -> torch.Tensor:
    """Mean attention distance of each kept head, (heads,): ``sum_j p_ij |x_i - x_j|`` averaged over rows.

    ``positions`` (T, d) gives each token's coordinates (e.g. patch centres in pixels);
    by default the token index. Queries sit at the last ``Tq`` of ``Tk`` positions.
    """
    tq, tk = maps.tq, maps.tk
    pos = torch.arange(tk, dtype=torch.float32)[:, None] if positions is None else positions.float()
    q_pos = pos[tk - tq :]
    if maps.dense is not None:
        dist = torch.cdist(q_pos, pos)  # (Tq, Tk)
        return (maps.dense * dist).sum(-1).mean(-1)
    idx = maps.top_index.clamp(min=0)
    dist = (q_pos[None, :, None, :] - pos[idx]).norm(dim=-1)  # (H, Tq, k)
    return (maps.top_values * dist).sum(-1).mean(-1)


def head_stats(maps: Sequence[AttentionMaps], positions: torch.Tensor | None = None) -> list[dict]:
    """Entropy and mean distance of every captured head, one dict per (layer, head)."""
    out = []
    for m in maps:
        ent, dist = entropy(m), mean_distance(m, positions)
        for i, h in enumerate(m.heads):
            out.append({"layer": m.layer, "head": h, "entropy": float(ent[i]), "mean_distance": float(dist[i])})
    return out


def gradient_attention(model, inputs: dict, target: int | None = None) -> torch.Tensor:
    """Gradient-weighted attention relevance for a classifier (Chefer et al., arXiv:2103.15679).

    With A the attention of a layer and dA the gradient of the target logit,
    ``R <- R + mean_heads((dA * A)^+) @ R`` from R = I, layer by layer. Row 0 (the
    class token) says which inputs drove the prediction. ``inputs`` are the model's
    keyword arguments (e.g. input_ids, attention_mask; or pixel_values); the
    eager backend is used for this pass, as it keeps the weights' gradients.
    """
    from ..nn import MultiHeadAttention

    saved = [(m, m.backend) for m in model.modules() if isinstance(m, MultiHeadAttention)]
    model.set_backend("eager")
    try:
        with torch.enable_grad():
            out = model(**inputs, return_weights=True)
            if out.logits is None or out.logits.dim() != 2:
                raise ValueError("gradient_attention needs a classifier: a model whose logits are (B, classes)")
            for a in out.attentions:
                a.retain_grad()
            cls = int(out.logits[0].argmax()) if target is None else target
            out.logits[0, cls].backward()
    finally:
        for m, backend in saved:
            m.backend = backend
    T = out.attentions[0].shape[-1]
    relevance = torch.eye(T)
    for a in out.attentions:
        cam = (a.grad[0] * a[0]).clamp(min=0).mean(0).detach().float()
        relevance = relevance + cam @ relevance
    return relevance
