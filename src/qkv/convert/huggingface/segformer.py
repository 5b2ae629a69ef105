"""Hugging Face SegFormer checkpoints: SegformerModel, SegformerForSemanticSegmentation.

Keys are the names ``save_pretrained`` writes (and hub checkpoints hold): ``segformer.encoder.block.{i}.{j}...``,
``decode_head.linear_c.{i}...``.
"""

from __future__ import annotations

from collections.abc import Mapping

import torch

from ...models.segformer import SegformerConfig
from .._keymap import ConversionError, KeyMap, find_prefix
from . import _tables
from ._common import _activation, _arch, _labels, build
from ._fields import read_fields
from ._layers import linear
from .vision import FILTERS

_ARCHS = ("SegformerModel", "SegformerForSemanticSegmentation")
_STAGE_FIELDS = {"dims": "hidden_sizes", "depths": "depths", "n_heads": "num_attention_heads",
                 "patch_sizes": "patch_sizes", "strides": "strides", "sr_ratios": "sr_ratios",
                 "mlp_ratios": "mlp_ratios"}


def _preprocessing(processor: Mapping | None, source: str) -> dict:
    """Resize size and filter, normalisation from preprocessor_config.json (label settings are not read)."""
    if processor is None:
        return {}
    where = source.replace("config.json", "preprocessor_config.json")
    p = read_fields(processor, _tables.SEGFORMER_PROCESSOR, "SegFormer", where, strict=False)
    for name, want in (("do_resize", True), ("do_rescale", True), ("do_normalize", True)):
        if p[name] is not want:
            raise p.refuse(name, f"qkv's segment() always resizes, rescales and normalises: set it to {want}")
    if abs(p["rescale_factor"] - 1 / 255) > 1e-9:
        raise p.refuse("rescale_factor", "qkv's segment() scales pixels by 1/255: set it to 0.00392156862745098")
    extra = {name: p[name] for name in ("image_mean", "image_std") if p[name] is not None}
    if p["resample"] is not None:
        if p["resample"] not in FILTERS:
            raise p.refuse("resample", f"qkv knows PIL's filters {FILTERS}")
        extra["resample"] = FILTERS[p["resample"]]
    size = p["size"]
    if size is not None:
        if set(size) != {"height", "width"} or not all(isinstance(size[k], int) and size[k] > 0 for k in size):
            raise p.refuse("size", 'qkv resizes to a fixed {"height": h, "width": w} (positive integers)')
        extra["image_size"] = [size["height"], size["width"]]
    return extra


def segformer_config(cfg: Mapping, keys: set[str] = frozenset(), processor: Mapping | None = None,
                     source: str = "config.json") -> SegformerConfig:
    """SegformerModel / SegformerForSemanticSegmentation; ``processor`` is preprocessor_config.json, if any."""
    f = read_fields(cfg, _tables.SEGFORMER, "SegFormer", source)
    arch = _arch(f)
    if arch and arch not in _ARCHS:
        raise f.refuse("architectures", f"qkv loads {list(_ARCHS)}; use transformers for {arch}")
    head = arch == "SegformerForSemanticSegmentation" or any(k.startswith("decode_head.") for k in keys)
    n_labels, labels = _labels(f)
    for name in _STAGE_FIELDS.values():
        if len(f[name]) != f["num_encoder_blocks"]:
            raise f.refuse(name, f"give one value per stage (num_encoder_blocks={f['num_encoder_blocks']})")
    names = dict(_STAGE_FIELDS, channels="num_channels", decoder_dim="decoder_hidden_size", num_labels="num_labels")
    return build(
        SegformerConfig, f, names,
        channels=f["num_channels"], **{q: list(f[h]) for q, h in _STAGE_FIELDS.items()},
        activation=_activation(f["hidden_act"]), decoder_dim=f["decoder_hidden_size"],
        num_labels=n_labels if head else 0, labels=labels if head else None,
        ignore_index=f["semantic_loss_ignore_index"], dropout=f["hidden_dropout_prob"],
        attn_dropout=f["attention_probs_dropout_prob"], drop_path=f["drop_path_rate"],
        head_dropout=f["classifier_dropout_prob"], **_preprocessing(processor, source),
    )


def _block(km: KeyMap, sr: int) -> None:
    """One encoder block (``segformer.encoder.block.{i}.{j}.``)."""
    linear(km, "attn_norm", "layer_norm_1")
    linear(km, "attn.q", "attention.self.query")
    for w in ("weight", "bias"):
        km.cat(f"attn.kv.{w}", [f"attention.self.key.{w}", f"attention.self.value.{w}"])
    linear(km, "attn.o", "attention.output.dense")
    if sr > 1:
        linear(km, "attn.sr", "attention.self.sr")
        linear(km, "attn.sr_norm", "attention.self.layer_norm")
    linear(km, "ffn_norm", "layer_norm_2")
    linear(km, "ffn.up", "mlp.dense1")
    linear(km, "ffn.conv", "mlp.dwconv.dwconv")
    linear(km, "ffn.down", "mlp.dense2")


def segformer(sd: Mapping[str, torch.Tensor], config: SegformerConfig) -> dict[str, torch.Tensor]:
    """SegformerModel / SegformerForSemanticSegmentation -> SemanticSegmenter."""
    if any(k.startswith(("stages.", "segformer.stages.")) for k in sd):
        raise ConversionError("checkpoint holds transformers' in-memory SegFormer names (stages.*); qkv reads the "
                              "names save_pretrained writes: save the model with save_pretrained")
    km = KeyMap(sd, find_prefix(sd, "encoder.patch_embeddings.0.proj.weight", ("segformer.", "")))
    for i in range(config.n_stages):
        stage = km.within("encoder.", f"stages.{i}.")
        linear(stage, "patch", f"patch_embeddings.{i}.proj")
        linear(stage, "patch_norm", f"patch_embeddings.{i}.layer_norm")
        for j in range(config.depths[i]):
            _block(stage.within(f"block.{i}.{j}.", f"layers.{j}."), config.sr_ratios[i])
        linear(stage, "norm", f"layer_norm.{i}")
    if config.num_labels:  # the decode head sits outside the "segformer." prefix
        head = km.scope("").within("decode_head.", "head.")
        for i in range(config.n_stages):
            linear(head, f"proj.{i}", f"linear_c.{i}.proj")
        head.copy("fuse.weight", "linear_fuse.weight")
        for name in ("weight", "bias", "running_mean", "running_var", "num_batches_tracked"):
            head.copy(f"norm.{name}", f"batch_norm.{name}")
        linear(head, "classifier", "classifier")
    return km.result()
