"""Hugging Face detection checkpoints: YOLOS (YolosForObjectDetection)."""

from __future__ import annotations

from collections.abc import Mapping

import torch

from ...models.detection import YolosConfig
from .._keymap import KeyMap
from . import _tables
from ._common import _activation, _arch, _labels, build
from ._fields import read_fields
from ._layers import encoder_layer, linear
from .vision import FILTERS

HEADS = ("class_labels_classifier", "bbox_predictor")


def _preprocessing(processor: Mapping | None, source: str) -> dict:
    """Normalisation, resize filter and the shortest / longest edge from preprocessor_config.json."""
    if processor is None:
        return {}
    where = source.replace("config.json", "preprocessor_config.json")
    p = read_fields(processor, _tables.YOLOS_PROCESSOR, "YOLOS", where, strict=False)
    if p["resample"] is not None and p["resample"] not in FILTERS:
        raise p.refuse("resample", f"qkv knows PIL's filters {FILTERS}")
    extra = {name: p[name] for name in ("image_mean", "image_std") if p[name] is not None}
    if p["resample"] is not None:
        extra["resample"] = FILTERS[p["resample"]]
    size = p["size"]
    if size is not None:
        short, long = size.get("shortest_edge"), size.get("longest_edge")
        if set(size) - {"shortest_edge", "longest_edge"} or not isinstance(short, int) or isinstance(short, bool) \
                or not (long is None or (isinstance(long, int) and not isinstance(long, bool))):
            raise p.refuse("size", 'qkv resizes detection inputs by {"shortest_edge": int, "longest_edge": int}')
        extra.update(shortest_edge=short, longest_edge=long)
    return extra


def yolos_config(cfg: Mapping, keys: set[str] = frozenset(), processor: Mapping | None = None,
                 source: str = "config.json") -> YolosConfig:
    """YolosForObjectDetection; ``keys`` are the checkpoint's tensor names, ``processor`` its
    preprocessor_config.json, if any."""
    f = read_fields(cfg, _tables.YOLOS, "YOLOS", source)
    arch = _arch(f)
    if (arch and not arch.endswith("ForObjectDetection")) or (keys and f"{HEADS[0]}.layers.0.weight" not in keys):
        raise f.refuse("architectures", "qkv loads YOLOS with its detection heads (YolosForObjectDetection); "
                                        "load a bare YolosModel with transformers")
    n_labels, labels = _labels(f)
    names = dict(dim="hidden_size", n_layers="num_hidden_layers", n_heads="num_attention_heads",
                 ffn_dim="intermediate_size", channels="num_channels", norm_eps="layer_norm_eps",
                 mid_positions="use_mid_position_embeddings", dropout="hidden_dropout_prob",
                 attn_dropout="attention_probs_dropout_prob")
    return build(
        YolosConfig, f, names,
        image_size=f["image_size"], patch_size=f["patch_size"], channels=f["num_channels"], dim=f["hidden_size"],
        n_layers=f["num_hidden_layers"], n_heads=f["num_attention_heads"], ffn_dim=f["intermediate_size"],
        activation=_activation(f["hidden_act"]), norm_eps=f["layer_norm_eps"], qkv_bias=f["qkv_bias"],
        dropout=f["hidden_dropout_prob"], attn_dropout=f["attention_probs_dropout_prob"],
        num_detection_tokens=f["num_detection_tokens"], mid_positions=f["use_mid_position_embeddings"],
        num_labels=n_labels, labels=labels, auxiliary_loss=f["auxiliary_loss"],
        **{k: f[k] for k in ("class_cost", "bbox_cost", "giou_cost", "bbox_loss_coefficient",
                             "giou_loss_coefficient", "eos_coefficient")},
        **_preprocessing(processor, source),
    )


def yolos(sd: Mapping[str, torch.Tensor], config: YolosConfig) -> dict[str, torch.Tensor]:
    """YolosForObjectDetection -> ObjectDetector."""
    km = KeyMap(sd, "vit.")
    km.copy("cls", "embeddings.cls_token")
    km.copy("det", "embeddings.detection_tokens")
    km.copy("pos", "embeddings.position_embeddings")
    linear(km, "patch", "embeddings.patch_embeddings.projection")
    # saved files (and the hub's) name it encoder.mid_position_embeddings; the module holds it one level down
    mid = next((k for k in ("encoder.interpolation.mid_position_embeddings", "encoder.mid_position_embeddings")
                if km.has(k)), "encoder.mid_position_embeddings")
    if config.mid_positions and config.n_layers > 1:
        km.copy("mid_pos", mid, fn=lambda t: t.reshape(t.shape[0], *t.shape[2:]))  # (L - 1, 1, T, C) -> (L - 1, T, C)
    elif config.mid_positions:  # one layer: transformers stores an empty (0, 1, T, C) table
        km.ignore(r"vit\." + mid.replace(".", r"\."))
    for i in range(config.n_layers):
        encoder_layer(km.within(f"encoder.layer.{i}.", f"encoder.layers.{i}."), "attention",
                      ("layernorm_before", "layernorm_after"), qkv_bias=config.qkv_bias)
    linear(km, "encoder.norm", "layernorm")
    heads = km.scope("")  # the heads sit outside the "vit." prefix
    for target, source in zip(("class_head", "box_head"), HEADS):
        for j in range(3):
            linear(heads, f"{target}.layers.{j}", f"{source}.layers.{j}")
    return km.result()
