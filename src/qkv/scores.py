"""Score modifiers: ``fn(score, b, h, q_pos, k_pos) -> score`` (FlexAttention's ``score_mod`` signature).

A score modifier sees the scaled score ``scale * q . k`` and absolute positions,
as broadcastable tensors; it must be elementwise. Backends apply it before
``bias`` and the mask, so an additive float mask passed as ``bias`` is never
squashed by, say, ``softcap``.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

ScoreMod = Callable[..., torch.Tensor]

__all__ = ["alibi", "softcap", "compose", "ScoreMod"]


def alibi(slopes: torch.Tensor) -> ScoreMod:
    """ALiBi (Press et al., arXiv:2108.12409): ``score + slopes[h] * (k_pos - q_pos)``.

    ``slopes``: (H,) per-head slopes, e.g. ``qkv.nn.alibi_slopes(H)``. For causal
    attention the added term is ``-slope * distance``.
    """
    slopes = torch.as_tensor(slopes)
    if slopes.dim() != 1 or not slopes.is_floating_point():
        raise ValueError(f"alibi slopes must be a 1-D float tensor (one per head), got {slopes.dtype} {tuple(slopes.shape)}")
    cache: dict[torch.device, torch.Tensor] = {}

    def alibi_mod(score, b, h, q_pos, k_pos):
        s = cache.get(score.device)
        if s is None:
            s = cache[score.device] = slopes.to(score.device)
        return score + s[h].to(score.dtype) * (k_pos - q_pos).to(score.dtype)

    alibi_mod.slopes = slopes
    return alibi_mod


def softcap(cap: float) -> ScoreMod:
    """Logit soft-capping (Gemma 2): ``cap * tanh(score / cap)``. ``cap > 0``."""
    if isinstance(cap, bool) or not isinstance(cap, (int, float)) or not cap > 0:
        raise ValueError(f"softcap cap must be a positive number, got {cap!r}")
    cap = float(cap)

    def softcap_mod(score, b, h, q_pos, k_pos):
        return cap * torch.tanh(score / cap)

    return softcap_mod


def compose(*mods: ScoreMod) -> ScoreMod:
    """Apply score modifiers left to right: ``compose(f, g)(s, ...) == g(f(s, ...), ...)``."""
    for i, m in enumerate(mods):
        if not callable(m):
            raise TypeError(f"compose argument {i} is {type(m).__name__}, not a score_mod function")
    if len(mods) == 1:
        return mods[0]

    def composed(score, b, h, q_pos, k_pos):
        for m in mods:
            score = m(score, b, h, q_pos, k_pos)
        return score

    return composed
