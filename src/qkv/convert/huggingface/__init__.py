"""Hugging Face checkpoints -> qkv: configs (``config.json`` dicts) and pure state-dict converters.

Configs: every ``config.json`` field is in its family's table (`_tables`): implemented, accepted at
one value, or harmless; any other field is refused by name. Converters: one function per
architecture, each an explicit key map ending in `KeyMap.result`: every checkpoint key is used or
deliberately ignored (buffers, tied duplicates), every key looked for exists, or `ConversionError`
names the keys.
"""

from __future__ import annotations

from collections.abc import Mapping

import torch

from .._keymap import ConversionError
from ._tables import TABLES
from .decoders import (
    decoder,
    gemma_config,
    mistral_config,
    phi3,
    phi3_config,
    qwen_config,
)
from .speech import whisper, whisper_config
from .text import (
    bart,
    bart_config,
    bert,
    bert_config,
    gpt2,
    gpt2_config,
    llama,
    llama_config,
    t5,
    t5_config,
)
from .detection import yolos, yolos_config
from .segformer import segformer, segformer_config
from .vision import vit, vit_config
from .captioning import captioning_config, vision_encoder_decoder

CONVERTERS = {"bert": bert, "gpt2": gpt2, "llama": llama, "t5": t5, "bart": bart, "vit": vit, "whisper": whisper,
              "qwen2": decoder, "qwen3": decoder, "mistral": decoder, "gemma2": decoder, "gemma3_text": decoder,
              "phi3": phi3, "yolos": yolos, "segformer": segformer}
CONVERTERS["vision-encoder-decoder"] = vision_encoder_decoder
# decoder-only families: model_type -> config builder
_DECODERS = {
    "qwen2": lambda cfg, source: qwen_config(cfg, source, "qwen2"),
    "qwen3": lambda cfg, source: qwen_config(cfg, source, "qwen3"),
    "mistral": mistral_config, "phi3": phi3_config,
    "gemma2": lambda cfg, source: gemma_config(cfg, source, "gemma2"),
    "gemma3_text": lambda cfg, source: gemma_config(cfg, source, "gemma3_text"),
}


def config_from_hf(cfg: Mapping, keys: set[str] = frozenset(), extra: Mapping | None = None,
                   source: str = "config.json"):
    """(family, qkv config) for a ``config.json`` dict; ``keys`` are the checkpoint's tensor names;
    ``extra`` is the side file a family reads (preprocessor_config.json, generation_config.json);
    ``source`` names the file in error messages."""
    if not isinstance(cfg, Mapping):
        raise ConversionError(f"{source}: expected a JSON object ({{...}}), found a {type(cfg).__name__}")
    if extra is not None and not isinstance(extra, Mapping):
        raise ConversionError(f"{source}: its side file must be a JSON object, found a {type(extra).__name__}")
    kind = cfg.get("model_type")
    if kind == "bert":
        return "text_encoder", bert_config(cfg, keys, source=source)
    if kind in ("gpt2", "llama"):
        return "causal_lm", (gpt2_config if kind == "gpt2" else llama_config)(cfg, source=source)
    if isinstance(kind, str) and kind in _DECODERS:
        return "causal_lm", _DECODERS[kind](cfg, source)
    if kind == "gemma3":
        raise ConversionError(f"{source}: model_type 'gemma3' (Gemma3ForConditionalGeneration: text and images) is "
                              "not supported; qkv loads the text-only Gemma 3 (model_type 'gemma3_text', "
                              "Gemma3ForCausalLM): use transformers for the multimodal model")
    if kind == "t5":
        return "seq2seq", t5_config(cfg, keys, source=source)
    if kind == "bart":
        return "seq2seq", bart_config(cfg, source=source)
    if kind == "vit":
        return "vision", vit_config(cfg, keys, extra, source=source)
    if kind == "vision-encoder-decoder":  # extra: {side file name: its JSON} (image processor, generation)
        return "captioning", captioning_config(cfg, keys, extra, source=source)
    if kind == "yolos":
        return "detection", yolos_config(cfg, keys, extra, source=source)
    if kind == "segformer":
        return "segmentation", segformer_config(cfg, keys, extra, source=source)
    if kind == "whisper":
        return "speech", whisper_config(cfg, extra, source=source)
    if kind is None:
        raise ConversionError(f"{source} has no field 'model_type'; supported: {sorted(CONVERTERS)}")
    raise ConversionError(f"{source}: model_type {kind!r} is not supported; supported: {sorted(CONVERTERS)}")


def convert(model_type: str, sd: Mapping[str, torch.Tensor], config) -> dict[str, torch.Tensor]:
    """Convert a Hugging Face state dict of ``model_type`` for a qkv model built from ``config``."""
    if model_type not in CONVERTERS:
        raise ConversionError(f"model_type {model_type!r} is not supported; supported: {sorted(CONVERTERS)}")
    return CONVERTERS[model_type](sd, config)


__all__ = ["CONVERTERS", "TABLES", "config_from_hf", "convert", "bert", "gpt2", "llama", "t5", "bart", "vit",
           "whisper", "bert_config", "gpt2_config", "llama_config", "t5_config", "bart_config", "vit_config",
           "whisper_config"]
