"""Hugging Face image captioning: VisionEncoderDecoderModel with a ViT encoder and a GPT-2 decoder
(``add_cross_attention=True``) -> `qkv.models.ImageCaptioner`.

The nested configs are read by their own families' tables (`vision.vit_config`, `text.gpt2_config`), the
weights by their own converters (`vision.vit`, `text.gpt2`) on the keys under ``encoder.`` and
``decoder.``; this file adds what the pair has beyond them: the decoder's cross-attention, the
``enc_to_dec_proj`` bridge, and the token ids as transformers' ``generate`` finds them.
"""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Callable, Mapping

import torch

from ...models import CaptionerConfig
from .._keymap import ConversionError, KeyMap
from . import _tables
from ._common import build
from ._fields import Fields, read_fields
from ._layers import linear
from .text import gpt2, gpt2_config
from .vision import vit, vit_config

ENCODERS = ("vit",)
DECODERS = ("gpt2",)
_CROSS = re.compile(r"decoder\.transformer\.h\.\d+\.(crossattention|ln_cross_attn)\..*")
_POOLER = re.compile(r"encoder\.pooler\..*")  # a ViTModel's pooler: transformers' captioner never reads it


def _part(cfg: Fields, name: str, kinds: tuple[str, ...]) -> dict:
    part = cfg[name]
    kind = part.get("model_type")
    if kind not in kinds:
        raise ConversionError(f"{cfg.source} field {name}.model_type={kind!r} is not implemented by qkv's "
                              f"vision-encoder-decoder loader (it reads {name}s of model_type {list(kinds)}); "
                              "use transformers")
    return dict(part)


def _tokens(top: Fields, decoder: Mapping, generation: Mapping | None, source: str) -> dict:
    """Generation's start, stop and pad ids as transformers' generate finds them: generation_config.json
    alone when the folder has one, else the outer config with the decoder's config for what it leaves unset;
    the start falls back to the bos token. Training's ids (labels shifted right) are the outer config's."""
    if generation is not None:
        g = read_fields(generation, _tables.CAPTIONING_TOKENS, "vision-encoder-decoder",
                        source.replace("config.json", "generation_config.json"), strict=False)
        ids = {k: g[k] for k in _tables.CAPTIONING_TOKENS}
    else:
        d = read_fields(decoder, _tables.CAPTIONING_TOKENS, "vision-encoder-decoder", f"{source} (decoder)",
                        strict=False)
        ids = {k: top[k] if top[k] is not None else d[k] for k in _tables.CAPTIONING_TOKENS}
    start = ids["decoder_start_token_id"] if ids["decoder_start_token_id"] is not None else ids["bos_token_id"]
    out = dict(decoder_start_token_id=start, eos_token_id=ids["eos_token_id"], pad_token_id=ids["pad_token_id"])
    for label, name in (("label_start_token_id", "decoder_start_token_id"), ("label_pad_token_id", "pad_token_id")):
        if top[name] is not None and top[name] != out[name]:
            out[label] = top[name]
    return out


def captioning_config(cfg: Mapping, keys: set[str] = frozenset(), extra: Mapping | None = None,
                      source: str = "config.json") -> CaptionerConfig:
    """A VisionEncoderDecoderModel ``config.json`` -> CaptionerConfig. ``extra``: the side files by name
    (``preprocessor_config.json``: normalisation and resize filter; ``generation_config.json``: token ids)."""
    f = read_fields(cfg, _tables.VISION_ENCODER_DECODER, "vision-encoder-decoder", source)
    extra = extra or {}
    for name, side in extra.items():
        if not isinstance(side, Mapping):
            raise ConversionError(f"{source}: side file {name} must hold a JSON object, found {type(side).__name__}")
    encoder_cfg, decoder_cfg = _part(f, "encoder", ENCODERS), _part(f, "decoder", DECODERS)
    if decoder_cfg.pop("add_cross_attention", False) is not True:
        raise ConversionError(f"{source} field decoder.add_cross_attention must be true: a decoder without "
                              "cross-attention never reads the image; qkv's captioner needs one that does")
    encoder = vit_config(encoder_cfg, frozenset(), extra.get("preprocessor_config.json"), source=f"{source} (encoder)")
    decoder = gpt2_config(decoder_cfg, source=f"{source} (decoder)")
    # transformers builds the encoder with AutoModel: no classification head, whatever its architectures say
    encoder = dataclasses.replace(encoder, num_labels=0, labels=None, pooler=False)
    tokens = _tokens(f, decoder_cfg, extra.get("generation_config.json"), source)
    return build(CaptionerConfig, f, {}, encoder=encoder, decoder=decoder, **tokens)


def _delegate(km: KeyMap, prefix: str, target: str, convert: Callable, config, skip: re.Pattern) -> None:
    """The keys under ``prefix`` (but ``skip``) converted by their family's converter, its results written
    under ``target``; that converter's own accounting covers them (its errors name the full keys)."""
    part = {k[len(prefix):]: v for k, v in km.source.items() if k.startswith(prefix) and not skip.fullmatch(k)}
    try:
        out = convert(part, config)
    except ConversionError as e:
        raise ConversionError(f"checkpoint keys under {prefix!r}: {e}") from None
    km.used.update(prefix + k for k in part)
    for name, tensor in out.items():
        km.put(target + name, tensor)


def vision_encoder_decoder(sd: Mapping[str, torch.Tensor], config: CaptionerConfig) -> dict[str, torch.Tensor]:
    """VisionEncoderDecoderModel (ViT + GPT-2 with cross-attention) -> ImageCaptioner. GPT-2's Conv1D
    weights are (in, out): transposed; its cross-attention key/value projection ``c_attn`` is k then v,
    as qkv's fused ``cross.kv``."""
    km = KeyMap(sd)
    km.ignore(_POOLER.pattern, r"decoder\.transformer\.h\.\d+\.crossattention\.(bias|masked_bias)")  # buffers
    _delegate(km, "encoder.", "encoder.", vit, config.encoder, _POOLER)
    _delegate(km, "decoder.", "decoder.", gpt2, config.decoder, _CROSS)
    for i in range(config.decoder.n_layers):
        lk = km.within(f"decoder.transformer.h.{i}.", f"decoder.stack.layers.{i}.")
        for target, source in (("cross.q", "crossattention.q_attn"), ("cross.kv", "crossattention.c_attn"),
                               ("cross.o", "crossattention.c_proj")):
            linear(lk, target, source, transpose=True)
        linear(lk, "cross_norm", "ln_cross_attn")
    if config.encoder.dim != config.decoder.dim:
        linear(km, "project", "enc_to_dec_proj")
    return km.result()
