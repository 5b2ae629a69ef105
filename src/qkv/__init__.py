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

__all__ = ["attention", "attention_weights", "masks", "scores", "backends", "load", "__version__"]


def load(name_or_path, **kwargs):
    """Load a model and its tokenizer: see `qkv.pretrained.load`."""
    from .pretrained import load as _load

    return _load(name_or_path, **kwargs)


def __getattr__(name):  # the heavier layers load on first use: `import qkv` stays light
    if name in ("nn", "models", "convert", "pretrained"):
        import importlib

        return importlib.import_module(f"qkv.{name}")
    raise AttributeError(f"module 'qkv' has no attribute {name!r}")
