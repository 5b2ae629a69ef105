"""Key maps shared by the Hugging Face converters: one attention, one linear or norm, one layer.

Each takes a `KeyMap` scoped to the layer (``km.within(source_prefix, target_prefix)``) and writes
qkv's names: ``attn.qkv`` (fused q, k, v), ``cross.q`` / ``cross.kv``, ``attn.o``, ``ffn.up`` (gate
and up fused for gated activations), ``ffn.down``, and the norms ``attn_norm``, ``cross_norm``, ``ffn_norm``.
"""

from __future__ import annotations

from collections.abc import Sequence

from .._keymap import KeyMap

BART_ATTENTION = ("q_proj", "k_proj", "v_proj", "out_proj")


def linear(km: KeyMap, target: str, source: str, bias: bool = True, transpose: bool = False) -> None:
    """``target.weight`` (and ``.bias``) from ``source.weight`` (and ``.bias``); norms too."""
    km.copy(target + ".weight", source + ".weight", transpose)
    if bias:
        km.copy(target + ".bias", source + ".bias")


def attention(km: KeyMap, target: str, source: str, names: Sequence[str], *, cross: bool = False,
              bias: bool = True, out_bias: bool | None = None, k_bias: bool = True) -> None:
    """One attention from separate q, k, v, o projections (``names``, under ``source``): q, k, v fused
    into ``target + "qkv"`` (cross-attention: ``q`` and fused ``kv``), and ``o``. ``k_bias=False``: the
    key projection has no bias (Whisper), its part of the fused bias is zero."""
    q, k, v, o = (source + n for n in names)
    for w in ("weight", "bias") if bias else ("weight",):
        key = None if w == "bias" and not k_bias else f"{k}.{w}"
        if cross:
            km.copy(f"{target}q.{w}", f"{q}.{w}")
            km.cat(f"{target}kv.{w}", [key, f"{v}.{w}"])
        else:
            km.cat(f"{target}qkv.{w}", [f"{q}.{w}", key, f"{v}.{w}"])
    linear(km, target + "o", o, bias if out_bias is None else out_bias)


def encoder_layer(km: KeyMap, inner: str, norms: tuple[str, str], qkv_bias: bool = True) -> None:
    """A BERT / ViT layer: ``attention.{inner}.query|key|value``, ``attention.output.dense``,
    ``intermediate.dense``, ``output.dense``; ``norms`` are the (attention, feed-forward) norm names."""
    names = (f"{inner}.query", f"{inner}.key", f"{inner}.value", "output.dense")
    attention(km, "attn.", "attention.", names, bias=qkv_bias, out_bias=True)
    linear(km, "attn_norm", norms[0])
    linear(km, "ffn.up", "intermediate.dense")
    linear(km, "ffn.down", "output.dense")
    linear(km, "ffn_norm", norms[1])


def bart_layer(km: KeyMap, decoder: bool, k_bias: bool = True) -> None:
    """A BART layer, which Whisper's layers copy name for name (``k_bias=False``: Whisper's key
    projections have no bias)."""
    attention(km, "attn.", "self_attn.", BART_ATTENTION, k_bias=k_bias)
    linear(km, "attn_norm", "self_attn_layer_norm")
    if decoder:
        attention(km, "cross.", "encoder_attn.", BART_ATTENTION, cross=True, k_bias=k_bias)
        linear(km, "cross_norm", "encoder_attn_layer_norm")
    linear(km, "ffn.up", "fc1")
    linear(km, "ffn.down", "fc2")
    linear(km, "ffn_norm", "final_layer_norm")


def bart_stacks(km: KeyMap, n_encoder: int, n_decoder: int, k_bias: bool = True) -> None:
    """Every layer of BART's (or Whisper's) ``encoder.layers.*`` and ``decoder.layers.*``."""
    for stack, n in (("encoder", n_encoder), ("decoder", n_decoder)):
        for i in range(n):
            bart_layer(km.within(f"{stack}.layers.{i}.", f"{stack}.layers.{i}."), stack == "decoder", k_bias)
