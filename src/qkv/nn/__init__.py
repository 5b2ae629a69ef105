"""Transformer layers as small composable modules. The attention math is `qkv.attention`; modules hold
parameters, project and reshape.

Shapes: (B, T, C) between layers, (B, H, T, D) inside attention.
"""

from .attention import KVCache, MultiHeadAttention
from .blocks import BlockConfig, StackOutput, TransformerBlock, TransformerDecoder, TransformerEncoder
from .feedforward import FeedForward
from .linear import Linear
from .norms import LayerNorm, RMSNorm, make_norm
from .positions import (
    LearnedPositions,
    RelativePositionBias,
    RotaryEmbedding,
    SinusoidalPositions,
    alibi_slopes,
)

__all__ = [
    "MultiHeadAttention", "KVCache", "RotaryEmbedding", "SinusoidalPositions", "LearnedPositions",
    "RelativePositionBias", "alibi_slopes", "FeedForward", "LayerNorm", "RMSNorm", "make_norm", "Linear",
    "BlockConfig", "TransformerBlock", "TransformerEncoder", "TransformerDecoder", "StackOutput",
]
