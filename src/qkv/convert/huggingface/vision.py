"""Hugging Face vision checkpoints: ViT (ViTModel, ViTForImageClassification)."""

from __future__ import annotations

from collections.abc import Mapping

import torch

from ...models import ViTConfig
from .._keymap import KeyMap
from ._common import _activation, _arch, _labels, _no_leftovers, _prefix


def vit_config(cfg: Mapping, keys: set[str] = frozenset(), processor: Mapping | None = None) -> ViTConfig:
    """ViTModel / ViTForImageClassification; ``processor`` is preprocessor_config.json, if any."""
    head = _arch(cfg).endswith("ForImageClassification")
    n_labels, labels = _labels(cfg)
    proc = dict(processor or {})
    filters = {0: "nearest", 1: "lanczos", 2: "bilinear", 3: "bicubic"}
    extra = {}
    if "image_mean" in proc:
        extra["image_mean"] = list(proc["image_mean"])
    if "image_std" in proc:
        extra["image_std"] = list(proc["image_std"])
    if "resample" in proc:
        extra["resample"] = filters.get(proc["resample"], "bilinear")
    return ViTConfig(
        image_size=cfg.get("image_size", 224), patch_size=cfg.get("patch_size", 16),
        channels=cfg.get("num_channels", 3), dim=cfg["hidden_size"], n_layers=cfg["num_hidden_layers"],
        n_heads=cfg["num_attention_heads"], ffn_dim=cfg["intermediate_size"],
        activation=_activation(cfg.get("hidden_act", "gelu")), norm_eps=cfg.get("layer_norm_eps", 1e-12),
        qkv_bias=cfg.get("qkv_bias", True), pooler=any(k.endswith("pooler.dense.weight") for k in keys),
        num_labels=n_labels if head else 0, labels=labels if head else None, **extra,
    )


def vit(sd: Mapping[str, torch.Tensor], config: ViTConfig) -> dict[str, torch.Tensor]:
    """ViTModel / ViTForImageClassification -> VisionTransformer."""
    p = _prefix(sd, "embeddings.cls_token", ("", "vit."))
    km = KeyMap(sd, p)
    km.ignore(r".*mask_token")
    km.copy("cls", "embeddings.cls_token")
    km.copy("pos", "embeddings.position_embeddings")
    km.copy("patch.weight", "embeddings.patch_embeddings.projection.weight")
    km.copy("patch.bias", "embeddings.patch_embeddings.projection.bias")
    ws = ("weight", "bias") if config.qkv_bias else ("weight",)
    for i in range(config.n_layers):
        s, t = f"encoder.layer.{i}.", f"encoder.layers.{i}."
        for w in ws:
            km.cat(t + f"attn.qkv.{w}", [s + f"attention.attention.{n}.{w}" for n in ("query", "key", "value")])
        for w in ("weight", "bias"):
            km.copy(t + f"attn.o.{w}", s + f"attention.output.dense.{w}")
            km.copy(t + f"ffn.up.{w}", s + f"intermediate.dense.{w}")
            km.copy(t + f"ffn.down.{w}", s + f"output.dense.{w}")
            km.copy(t + f"attn_norm.{w}", s + f"layernorm_before.{w}")
            km.copy(t + f"ffn_norm.{w}", s + f"layernorm_after.{w}")
    for w in ("weight", "bias"):
        km.copy(f"encoder.norm.{w}", f"layernorm.{w}")
        if config.pooler:
            km.copy(f"pooler.{w}", f"pooler.dense.{w}")
    head = KeyMap(sd)
    if config.num_labels:
        head.copy("classifier.weight", "classifier.weight")
        head.copy("classifier.bias", "classifier.bias")
    _no_leftovers(sd, km, head)
    return {**km.out, **head.out}
