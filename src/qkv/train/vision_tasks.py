"""The `qkv train` tasks detect (YOLOS), segment (SegFormer) and caption (ViT + GPT-2): what the data fixes
in each model config, the loss of a batch, and the split-wide metrics evaluation reports.

Batches are `qkv.data.scenes.vision_table` rows: ``pixel_values`` (B, 3, H, W) in [-1, 1] and
  detect:  ``boxes`` (B, M, 4) pixel x0, y0, x1, y1 and ``labels`` (B, M) class ids, `IGNORE` past the objects;
  segment: ``labels`` (B, H, W) class ids (`IGNORE`: unlabelled);
  caption: ``labels`` (B, L) token ids, ``<eos>``, then `IGNORE`.

Metrics need the whole split, so each task has a scorer: ``add(model, batch, output)`` per batch and
``result()`` at the end.
  detect:  ``map50`` (COCO mAP at IoU 0.5) and ``map`` (0.5:0.95), pycocotools' COCOeval on every [DET]
           token's best real class (as DETR evaluates: no score threshold, up to 100 per image);
  segment: ``mean_iou`` over the classes present and ``pixel_accuracy``, from one confusion matrix;
  caption: ``exact_match`` and ``bleu4`` of greedy captions (KV-cached generation) against the references.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from ..data import IGNORE, Data
from ..models.set_loss import box_corners
from . import vision_metrics as M

HALF = [0.5, 0.5, 0.5]  # the data's normalisation: pixels / 127.5 - 1, so images preprocess to the same values


def _fill_image(values: dict, data: Data) -> None:
    """Input size, classes and normalisation, shared by the three configs (the captioner's encoder too)."""
    shape = data.info["input_shape"]  # (channels, H, W)
    values.setdefault("channels", shape[0])
    values.setdefault("image_size", list(shape[1:]))
    values.setdefault("image_mean", HALF[: shape[0]])
    values.setdefault("image_std", HALF[: shape[0]])


def fill_detect(values: dict, cfg, data: Data) -> None:
    _fill_image(values, data)
    values.update(num_labels=data.info["num_labels"])
    values.setdefault("labels", data.labels)
    size = values["image_size"]
    side = [size, size] if isinstance(size, int) else list(size)
    values.setdefault("shortest_edge", min(side))  # detect() resizes images to the training size
    values.setdefault("longest_edge", max(side))


def fill_segment(values: dict, cfg, data: Data) -> None:
    _fill_image(values, data)
    values.update(num_labels=data.info["num_labels"], ignore_index=IGNORE)
    values.setdefault("labels", data.labels)


CAPTION_ENCODER = dict(patch_size=8, dim=128, n_layers=4, n_heads=4, ffn_dim=256, dropout=0.0, num_labels=0)
CAPTION_DECODER = dict(dim=128, n_layers=2, n_heads=4, ffn_dim=256, activation="gelu", dropout=0.0)


def fill_caption(values: dict, cfg, data: Data) -> None:
    """``[model.encoder]`` (a `ViTConfig`) and ``[model.decoder]`` (a `CausalLMConfig`) over the defaults
    above; the tokenizer trained on the training captions fixes the vocabulary and the token ids."""
    from ..models import CausalLMConfig, ViTConfig
    from .tasks import _config

    tok = data.tokenizer
    enc = {**CAPTION_ENCODER, **values.get("encoder", {})}
    _fill_image(enc, data)
    dec = {**CAPTION_DECODER, **values.get("decoder", {})}
    dec.setdefault("vocab_size", data.info["vocab_size"])
    dec.setdefault("max_positions", data.info["max_length"] + 1)  # the start token, then the labels
    dec.update(bos_token_id=tok.bos_id, eos_token_id=tok.eos_id, pad_token_id=tok.pad_id)
    values["encoder"] = _config(ViTConfig, enc, "model.encoder")
    values["decoder"] = _config(CausalLMConfig, dec, "model.decoder")
    values.update(decoder_start_token_id=tok.bos_id, eos_token_id=tok.eos_id, pad_token_id=tok.pad_id)


def detection_targets(batch: dict) -> list[dict[str, torch.Tensor]]:
    """The set loss's labels: per image ``class_labels`` (n,) and ``boxes`` (n, 4) normalised cx, cy, w, h."""
    H, W = batch["pixel_values"].shape[-2:]
    scale = batch["boxes"].new_tensor([W, H, W, H])
    out = []
    for boxes, labels in zip(batch["boxes"], batch["labels"]):
        keep = labels != IGNORE
        b = boxes[keep] / scale
        cxcywh = torch.cat([(b[:, :2] + b[:, 2:]) / 2, b[:, 2:] - b[:, :2]], dim=1)
        out.append({"class_labels": labels[keep], "boxes": cxcywh})
    return out


def detect_loss(model, batch, smoothing):
    """The DETR set loss (Hungarian matching; class, L1 and GIoU terms; auxiliary layers if configured)."""
    out = model(batch["pixel_values"], labels=detection_targets(batch))
    return out.loss, {"count": batch["labels"].shape[0], "output": out}


def balance_weights(labels: torch.Tensor, n_classes: int, power: float) -> torch.Tensor | None:
    """Class weights (n_classes,) ``(pixels / class pixels) ** power`` over the labels (classes absent from
    them weigh as the rarest present), scaled to mean 1; None for ``power == 0``. Mean IoU counts every class
    alike, so a rare class (a digit's thin strokes) should pull the loss more than its pixel share."""
    if not power:
        return None
    counts = torch.bincount(labels[labels != IGNORE].flatten(), minlength=n_classes).float()
    present = counts > 0
    w = torch.zeros(n_classes, device=labels.device)
    w[present] = (counts.sum() / counts[present]) ** power
    w[~present] = w[present].max() if bool(present.any()) else 1.0
    return w / w.mean()


def segment_loss(model, batch, smoothing, class_balance: float = 0.0):
    """Pixel cross-entropy of the logits upsampled to the labels (`IGNORE` skipped), classes weighted by
    `balance_weights` (``train.class_balance``)."""
    labels = batch["labels"]
    out = model(batch["pixel_values"])
    up = F.interpolate(out.logits.float(), size=labels.shape[-2:], mode="bilinear", align_corners=False)
    w = balance_weights(labels, up.shape[1], class_balance)
    loss = F.cross_entropy(up, labels, weight=w, ignore_index=IGNORE, label_smoothing=smoothing)
    out.logits = up
    keep = labels != IGNORE
    right = ((up.argmax(1) == labels) & keep).sum()
    # count: pixels (what the loss and accuracy average over); examples: images (the progress rate's unit)
    return loss, {"correct": int(right), "count": int(keep.sum()), "examples": labels.shape[0], "output": out}


def caption_loss(model, batch, smoothing):
    """Teacher-forced next-token cross-entropy; a caption counts as right when every token is (which is
    when greedy decoding would reproduce it)."""
    labels = batch["labels"]
    out = model(batch["pixel_values"], input_ids=model.shift_labels(labels))
    loss = F.cross_entropy(out.logits.flatten(0, 1).float(), labels.flatten(), ignore_index=IGNORE,
                           label_smoothing=smoothing)
    keep = labels != IGNORE
    exact = ((out.logits.argmax(-1) == labels) | ~keep).all(-1).sum()
    return loss, {"correct": int(exact), "count": labels.shape[0], "output": out}


class DetectionScore:
    def __init__(self, model):
        self.preds: list[dict] = []
        self.targets: list[dict] = []

    def add(self, model, batch: dict, out) -> None:
        scores, ids = out.logits.float().softmax(-1)[..., :-1].max(-1)  # (B, Q): best real class per token
        H, W = batch["pixel_values"].shape[-2:]
        boxes = box_corners(out.pred_boxes.float()) * out.pred_boxes.new_tensor([W, H, W, H])
        for b, s, k, tb, tl in zip(boxes, scores, ids, batch["boxes"], batch["labels"]):
            keep = tl != IGNORE
            self.preds.append({"boxes": b.cpu(), "scores": s.cpu(), "labels": k.cpu()})
            self.targets.append({"boxes": tb[keep].cpu(), "labels": tl[keep].cpu()})

    def result(self) -> dict:
        m = M.mean_average_precision(self.preds, self.targets, backend="pycocotools")
        return {"map50": m["map_50"], "map": m["map"], "map75": m["map_75"]}


class SegmentationScore:
    def __init__(self, model):
        self.n = model.config.num_labels
        self.cm = torch.zeros(self.n, self.n, dtype=torch.long)

    def add(self, model, batch: dict, out) -> None:
        self.cm += M.confusion_matrix(out.logits.argmax(1), batch["labels"], self.n, IGNORE)

    def result(self) -> dict:
        iou = M.confusion_iou(self.cm)
        total = int(self.cm.sum())
        return {"mean_iou": M.mean_of_present(iou), "pixel_accuracy": float(self.cm.diagonal().sum()) / max(total, 1)}


class CaptionScore:
    def __init__(self, model):
        self.preds: list[str] = []
        self.refs: list[str] = []

    def add(self, model, batch: dict, out) -> None:
        tok, c = model.tokenizer, model.config
        labels = batch["labels"]
        ids = model.generate(batch["pixel_values"], max_new_tokens=labels.shape[1], do_sample=False, num_beams=1)
        for row, ref in zip(ids[:, 1:].tolist(), labels.tolist()):
            self.preds.append(tok.decode(_until(row, c.eos_token_id)))
            self.refs.append(tok.decode(_until([t for t in ref if t != IGNORE], c.eos_token_id)))

    def result(self) -> dict:
        return {"exact_match": M.exact_match(self.preds, self.refs), "bleu4": M.bleu4(self.preds, self.refs)}


def _until(row: list[int], eos: int) -> list[int]:
    return row[: row.index(eos)] if eos in row else row
