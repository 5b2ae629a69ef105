"""Normalisation layers: LayerNorm (torch's) and RMSNorm (arXiv:1910.07467)."""

from __future__ import annotations

import torch
from torch import nn

LayerNorm = nn.LayerNorm


class RMSNorm(nn.Module):
    """``x / rms(x) * weight``, the statistic computed in float32 (Llama, T5).

    ``offset=1.0`` gives Gemma's ``x / rms(x) * (1 + weight)`` (weights stored as offsets from one,
    initialised to zero), the product taken in float32 before the cast back, as Gemma does.
    """

    def __init__(self, dim: int, eps: float = 1e-6, offset: float = 0.0):
        super().__init__()
        self.eps = eps
        self.offset = offset
        self.weight = nn.Parameter(torch.full((dim,), 1.0 - offset))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        xf = x.float()
        y = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + self.eps)
        if self.offset:
            return (y * (self.offset + self.weight.float())).to(x.dtype)
        return self.weight * y.to(x.dtype)

    def extra_repr(self) -> str:
        return f"{self.weight.shape[0]}, eps={self.eps}" + (f", offset={self.offset}" if self.offset else "")


NORMS = ("layer", "rms")


def make_norm(kind: str, dim: int, eps: float, bias: bool = True, offset: float = 0.0) -> nn.Module:
    """``"layer"`` (LayerNorm, with or without bias) or ``"rms"`` (RMSNorm; ``offset``: see `RMSNorm`)."""
    if kind == "layer":
        return nn.LayerNorm(dim, eps=eps, bias=bias)
    if kind == "rms":
        return RMSNorm(dim, eps=eps, offset=offset)
    raise ValueError(f"norm={kind!r} is not one of {NORMS}")
