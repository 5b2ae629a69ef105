"""Hugging Face vision checkpoints: ViT (ViTModel, ViTForImageClassification)."""

from __future__ import annotations

from collections.abc import Mapping

import torch

from ...models import ViTConfig
from .._keymap import KeyMap, find_prefix
from . import _tables
from ._common import _activation, _arch, _labels, build
from ._fields import read_fields
from ._layers import encoder_layer, linear

FILTERS = {0: "nearest", 1: "lanczos", 2: "bilinear", 3: "bicubic"}  # PIL's resample codes


def _preprocessing(processor: Mapping | None, source: str) -> dict:
    """Normalisation and resize filter from preprocessor_config.json (the other settings are not read)."""
    if processor is None:
        return {}
    p = read_fields(processor, _tables.VIT_PROCESSOR, "ViT", source.replace("config.json", "preprocessor_config.json"),
                    strict=False)
    if p["resample"] is not None and p["resample"] not in FILTERS:
        raise p.refuse("resample", f"qkv knows PIL's filters {FILTERS}")
    extra = {name: p[name] for name in ("image_mean", "image_std") if p[name] is not None}
    if p["resample"] is not None:
        extra["resample"] = FILTERS[p["resample"]]
    return extra


def vit_config(cfg: Mapping, keys: set[str] = frozenset(), processor: Mapping | None = None,
               source: str = "config.json") -> ViTConfig:
    """ViTModel / ViTForImageClassification; ``processor`` is preprocessor_config.json, if any."""
    f = read_fields(cfg, _tables.VIT, "ViT", source)
    head = _arch(f).endswith("ForImageClassification")
    n_labels, labels = _labels(f)
    if f["pooler_output_size"] not in (None, f["hidden_size"]):
        raise f.refuse("pooler_output_size", f"qkv's pooler keeps the width: set it to hidden_size={f['hidden_size']}")
    names = dict(dim="hidden_size", n_layers="num_hidden_layers", n_heads="num_attention_heads",
                 ffn_dim="intermediate_size", channels="num_channels", norm_eps="layer_norm_eps")
    return build(
        ViTConfig, f, names,
        image_size=f["image_size"], patch_size=f["patch_size"], channels=f["num_channels"], dim=f["hidden_size"],
        n_layers=f["num_hidden_layers"], n_heads=f["num_attention_heads"], ffn_dim=f["intermediate_size"],
        activation=_activation(f["hidden_act"]), norm_eps=f["layer_norm_eps"], qkv_bias=f["qkv_bias"],
        pooler=any(k.endswith("pooler.dense.weight") for k in keys),
        num_labels=n_labels if head else 0, labels=labels if head else None, **_preprocessing(processor, source),
    )


def vit(sd: Mapping[str, torch.Tensor], config: ViTConfig) -> dict[str, torch.Tensor]:
    """ViTModel / ViTForImageClassification -> VisionTransformer."""
    km = KeyMap(sd, find_prefix(sd, "embeddings.cls_token", ("", "vit.")))
    km.ignore(r".*mask_token")
    km.copy("cls", "embeddings.cls_token")
    km.copy("pos", "embeddings.position_embeddings")
    linear(km, "patch", "embeddings.patch_embeddings.projection")
    for i in range(config.n_layers):
        encoder_layer(km.within(f"encoder.layer.{i}.", f"encoder.layers.{i}."), "attention",
                      ("layernorm_before", "layernorm_after"), qkv_bias=config.qkv_bias)
    linear(km, "encoder.norm", "layernorm")
    if config.pooler:
        linear(km, "pooler", "pooler.dense")
    if config.num_labels:  # the classifier sits outside the "vit." prefix
        linear(km.scope(""), "classifier", "classifier")
    return km.result()
