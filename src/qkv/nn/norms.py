"""Normalisation layers: LayerNorm (torch's) and RMSNorm (arXiv:1910.07467)."""

from __future__ import annotations

import torch
from torch import nn

LayerNorm = nn.LayerNorm


class RMSNorm(nn.Module):
    """``x / rms(x) * weight``, the statistic computed in float32 (Llama, T5)."""

    def __init__(self, dim: int, eps: float = 1e-6):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        xf = x.float()
        y = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * y.to(x.dtype)

    def extra_repr(self) -> str:
        return f"{self.weight.shape[0]}, eps={self.eps}"


NORMS = ("layer", "rms")


def make_norm(kind: str, dim: int, eps: float, bias: bool = True) -> nn.Module:
    """``"layer"`` (LayerNorm, with or without bias) or ``"rms"`` (RMSNorm)."""
    if kind == "layer":
        return nn.LayerNorm(dim, eps=eps, bias=bias)
    if kind == "rms":
        return RMSNorm(dim, eps=eps)
    raise ValueError(f"norm={kind!r} is not one of {NORMS}")
