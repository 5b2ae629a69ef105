"""Hugging Face checkpoints -> qkv: configs (``config.json`` dicts) and pure state-dict converters.

One function per architecture, each an explicit key map: every checkpoint key
is used or deliberately ignored (buffers, tied duplicates), every model key is
filled, or `ConversionError` names the keys.
"""

from __future__ import annotations

from collections.abc import Mapping

import torch

from .._keymap import ConversionError
from .speech import whisper, whisper_config
from .text import bart, bart_config, bert, bert_config, gpt2, gpt2_config, llama, llama_config, t5, t5_config
from .vision import vit, vit_config

CONVERTERS = {"bert": bert, "gpt2": gpt2, "llama": llama, "t5": t5, "bart": bart, "vit": vit, "whisper": whisper}


def config_from_hf(cfg: Mapping, keys: set[str] = frozenset(), extra: Mapping | None = None):
    """(family, qkv config) for a ``config.json`` dict; ``keys`` are the checkpoint's tensor names;
    ``extra`` is the side file a family reads (preprocessor_config.json, generation_config.json)."""
    kind = cfg.get("model_type")
    if kind == "bert":
        return "text_encoder", bert_config(cfg, keys)
    if kind in ("gpt2", "llama"):
        return "causal_lm", (gpt2_config if kind == "gpt2" else llama_config)(cfg)
    if kind in ("t5", "bart"):
        return "seq2seq", (t5_config if kind == "t5" else bart_config)(cfg)
    if kind == "vit":
        return "vision", vit_config(cfg, keys, extra)
    if kind == "whisper":
        return "speech", whisper_config(cfg, extra)
    raise ConversionError(f"model_type {kind!r} is not supported; supported: {sorted(CONVERTERS)}")


def convert(model_type: str, sd: Mapping[str, torch.Tensor], config) -> dict[str, torch.Tensor]:
    """Convert a Hugging Face state dict of ``model_type`` for a qkv model built from ``config``."""
    if model_type not in CONVERTERS:
        raise ConversionError(f"model_type {model_type!r} is not supported; supported: {sorted(CONVERTERS)}")
    return CONVERTERS[model_type](sd, config)


__all__ = ["CONVERTERS", "config_from_hf", "convert", "bert", "gpt2", "llama", "t5", "bart", "vit", "whisper",
           "bert_config", "gpt2_config", "llama_config", "t5_config", "bart_config", "vit_config", "whisper_config"]
