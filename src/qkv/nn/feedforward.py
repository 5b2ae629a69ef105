"""Position-wise feed-forward layers, plain and gated (GLU variants, arXiv:2002.05202)."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from .linear import Linear


def _gelu_tanh(x):
    return F.gelu(x, approximate="tanh")


ACTIVATIONS = {
    "relu": F.relu,
    "gelu": F.gelu,  # erf form (BERT, BART)
    "gelu_tanh": _gelu_tanh,  # tanh approximation (GPT-2's gelu_new, T5 v1.1)
    "silu": F.silu,
}
GATED = {"swiglu": F.silu, "geglu": F.gelu, "geglu_tanh": _gelu_tanh, "reglu": F.relu}


class FeedForward(nn.Module):
    """``down(act(up(x)))``, or gated ``down(act(gate(x)) * up(x))`` for swiglu / geglu / reglu.

    Gated layers keep gate and up in one `Linear` of width ``2 * hidden`` (gate
    first): one matrix product instead of two.
    """

    def __init__(self, dim: int, hidden: int, activation: str = "gelu", bias: bool = True, dropout: float = 0.0):
        super().__init__()
        if activation not in ACTIVATIONS and activation not in GATED:
            raise ValueError(f"activation={activation!r} is not one of {sorted(ACTIVATIONS) + sorted(GATED)}")
        self.activation = activation
        self.gated = activation in GATED
        self.act = GATED[activation] if self.gated else ACTIVATIONS[activation]
        self.up = Linear(dim, hidden * (2 if self.gated else 1), bias=bias)
        self.down = Linear(hidden, dim, bias=bias)
        self.dropout = nn.Dropout(dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.up(x)
        if self.gated:
            gate, up = h.chunk(2, dim=-1)
            h = self.act(gate) * up
        else:
            h = self.act(h)
        return self.down(self.dropout(h))

    def extra_repr(self) -> str:
        return f"activation={self.activation!r}"
