"""qkv: self-attention for PyTorch.

One attention function, exact at any length and with any mask, that can always
return the attention probabilities::

    import qkv
    out = qkv.attention(q, k, v, mask=qkv.masks.causal() & qkv.masks.sliding_window(256))
    top = qkv.attention_weights(q, k, mask=qkv.masks.causal(), topk=8)
"""

from . import backends, masks, scores
from .functional import attention, attention_weights

__version__ = "0.1.0"

__all__ = ["attention", "attention_weights", "masks", "scores", "backends", "__version__"]
