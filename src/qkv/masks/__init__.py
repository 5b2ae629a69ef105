"""Masks: what may attend to what.

Every mask is a predicate over absolute positions, ``mask(b, h, q_pos, k_pos)
-> bool tensor`` with True meaning "may attend" (the convention of SDPA and
FlexAttention). Query row ``i`` of a call sits at position ``q_offset + i``.

>>> import qkv
>>> m = qkv.masks.causal() & qkv.masks.sliding_window(256)
>>> m.materialize(4, 4).shape
torch.Size([1, 1, 4, 4])

Combine with ``&``, ``|``, ``~``. Plain FlexAttention-style functions and
bool tensors are accepted wherever a mask is (see :func:`as_mask`). Masks copy
the tensors they are built from: they are immutable, which lets backends cache
their tile plans on them.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch

from ._base import (
    EMPTY,
    FULL,
    MAX_INTERVALS,
    PARTIAL,
    UNBOUNDED,
    And,
    FunctionMask,
    Grid,
    Mask,
    Not,
    Or,
    TensorMask,
    as_mask,
    evaluate,
    index_grid,
)
from ._indexed import call_indexed
from ._library import (
    BlockSparse,
    Causal,
    Document,
    GlobalTokens,
    KeyPadding,
    Padding,
    PrefixLM,
    SlidingWindow,
    Strided,
)

__all__ = [
    "Mask", "EMPTY", "PARTIAL", "FULL", "UNBOUNDED", "MAX_INTERVALS", "as_mask", "Grid", "index_grid", "evaluate",
    "call_indexed",
    "And", "Or", "Not", "FunctionMask", "TensorMask",
    "causal", "sliding_window", "padding", "document", "prefix_lm", "global_tokens",
    "strided", "block_sparse", "from_tensor", "from_function", "key_padding",
]


def causal() -> Mask:
    """Query at position q sees keys k <= q."""
    return Causal()


def sliding_window(left: int, right: int = 0) -> Mask:
    """Key k visible from query q iff ``q - left <= k <= q + right`` (Longformer / Mistral local attention).

    ``right=0`` (the default) makes the window causal. ``left, right >= 0``: ``sliding_window(0)``
    lets each query see only itself, as FlashAttention's ``window_size=(0, 0)``.
    """
    return SlidingWindow(left, right)


def padding(lengths: Sequence[int] | torch.Tensor) -> Mask:
    """Hide keys at ``k >= lengths[b]`` (right-padded batches). ``lengths``: (B,) ints."""
    return Padding(lengths)


def key_padding(attention_mask: torch.Tensor) -> Mask:
    """Hide keys where ``attention_mask[b, k] == 0``: the (B, Tk) 0/1 mask of Hugging Face tokenizers,
    left or right padded. Rows whose kept keys are contiguous get exact interval plans."""
    return KeyPadding(attention_mask)


def document(ids: Sequence[int] | torch.Tensor) -> Mask:
    """Packed sequences: attend only within the same document id. ``ids``: (T,) or (B, T) ints, one per position."""
    return Document(ids)


def prefix_lm(prefix_len: int | Sequence[int] | torch.Tensor) -> Mask:
    """Bidirectional over the first ``prefix_len`` keys, causal after (T5 / UniLM prefix LM). Int or (B,) ints."""
    return PrefixLM(prefix_len)


def global_tokens(positions: Sequence[int] | torch.Tensor) -> Mask:
    """Tokens at ``positions`` attend everywhere and are seen from everywhere (Longformer, arXiv:2004.05150).

    Combine with a local pattern: ``sliding_window(128, 128) | global_tokens([0])``.
    """
    return GlobalTokens(positions)


def strided(stride: int) -> Mask:
    """Key k visible from query q iff ``(q - k) % stride == 0`` (Sparse Transformer, arXiv:1904.10509).

    Usually combined: ``causal() & (sliding_window(stride) | strided(stride))``.
    """
    return Strided(stride)


def block_sparse(layout: torch.Tensor, block_size: int) -> Mask:
    """Block-sparse attention: block (i, j) of ``block_size`` positions is visible iff ``layout[..., i, j]``.

    ``layout``: bool (nq_blocks, nk_blocks), (H, nq, nk) or (B, H, nq, nk), indexed by absolute positions // block_size.
    """
    return BlockSparse(layout, block_size)


def from_tensor(mask: torch.Tensor, q_offset: int | None = None) -> Mask:
    """A dense bool tensor broadcastable to (B, H, Tq, Tk), indexed by query row and key (as SDPA's ``attn_mask``).

    Row ``i`` is the query at position ``q_offset + i``; by default the rows follow the call.
    """
    return TensorMask(mask, q_offset)


def from_function(fn: Callable) -> Mask:
    """Wrap a FlexAttention-style ``fn(b, h, q_pos, k_pos) -> bool tensor``.

    Wrapping once and reusing the mask lets backends cache its tile plan (found by
    evaluating the function), so do it only for functions whose answer never changes.
    """
    return FunctionMask(fn)
