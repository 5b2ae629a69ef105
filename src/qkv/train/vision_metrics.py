"""Metrics for detection (COCO mAP), segmentation (mean IoU) and captioning (BLEU-4, exact match).

Plain functions over lists and tensors. mAP is the COCO definition computed by pycocotools' ``COCOeval``
(through torchmetrics' ``MeanAveragePrecision(backend="pycocotools")`` when torchvision is installed, which
that class needs; directly otherwise: the same computation). BLEU is torchmetrics' corpus ``BLEUScore``
(Papineni et al., 2002): whitespace tokens, no smoothing.
"""

from __future__ import annotations

import contextlib
import io
from collections.abc import Sequence

import torch

from ..data import IGNORE


def _as_tensor(x, dtype) -> torch.Tensor:
    return torch.as_tensor(x, dtype=dtype).detach().cpu()


def _check_detections(preds: Sequence[dict], targets: Sequence[dict]) -> None:
    if len(preds) != len(targets):
        raise ValueError(f"preds has {len(preds)} images but targets has {len(targets)}; give one entry per image")
    checks = (("preds", preds, ("boxes", "scores", "labels")), ("targets", targets, ("boxes", "labels")))
    for name, items, keys in checks:
        for i, d in enumerate(items):
            missing = [k for k in keys if k not in d]
            if missing:
                raise ValueError(f"{name}[{i}] has no {missing}; each entry needs {list(keys)}")
            n = _as_tensor(d["boxes"], torch.float64).reshape(-1, 4).shape[0]
            if any(_as_tensor(d[k], torch.float64).reshape(-1).shape[0] != n for k in keys[1:]):
                raise ValueError(f"{name}[{i}]: boxes, {', '.join(keys[1:])} differ in length; one row per box")


def _coco(preds: Sequence[dict], targets: Sequence[dict]):
    """Ground truth as a pycocotools ``COCO`` and detections as a list of result dicts (boxes xywh)."""
    from pycocotools.coco import COCO

    images, anns, dets, cats = [], [], [], set()
    for i, (p, t) in enumerate(zip(preds, targets)):
        images.append({"id": i + 1})
        for box, label in zip(_as_tensor(t["boxes"], torch.float64).reshape(-1, 4).tolist(),
                              _as_tensor(t["labels"], torch.long).reshape(-1).tolist()):
            w, h = box[2] - box[0], box[3] - box[1]
            # ids from 1: COCOeval takes a matched id of 0 for "unmatched"
            anns.append({"id": len(anns) + 1, "image_id": i + 1, "category_id": label,
                         "bbox": [box[0], box[1], w, h], "area": w * h, "iscrowd": 0})
            cats.add(label)
        for box, score, label in zip(_as_tensor(p["boxes"], torch.float64).reshape(-1, 4).tolist(),
                                     _as_tensor(p["scores"], torch.float64).reshape(-1).tolist(),
                                     _as_tensor(p["labels"], torch.long).reshape(-1).tolist()):
            w, h = box[2] - box[0], box[3] - box[1]
            dets.append({"image_id": i + 1, "category_id": label, "bbox": [box[0], box[1], w, h], "score": score,
                         "area": w * h})
            cats.add(label)
    gt = COCO()
    gt.dataset = {"images": images, "annotations": anns, "categories": [{"id": c} for c in sorted(cats)]}
    gt.createIndex()
    return gt, dets


def _cocoeval(preds: Sequence[dict], targets: Sequence[dict]) -> dict[str, float]:
    from pycocotools.cocoeval import COCOeval

    with contextlib.redirect_stdout(io.StringIO()):  # pycocotools prints its progress
        gt, dets = _coco(preds, targets)
        if not gt.dataset["annotations"]:
            return {"map": -1.0, "map_50": -1.0, "map_75": -1.0}  # COCO's value when nothing is to be found
        if not dets:
            return {"map": 0.0, "map_50": 0.0, "map_75": 0.0}
        ev = COCOeval(gt, gt.loadRes(dets), "bbox")
        ev.evaluate()
        ev.accumulate()
        ev.summarize()
    return {"map": float(ev.stats[0]), "map_50": float(ev.stats[1]), "map_75": float(ev.stats[2])}


def _torchmetrics_map(preds: Sequence[dict], targets: Sequence[dict]) -> dict[str, float] | None:
    """torchmetrics' MeanAveragePrecision on pycocotools, or None where torchvision (which it needs) is missing."""
    from torchmetrics.utilities.imports import _TORCHVISION_AVAILABLE

    if not _TORCHVISION_AVAILABLE:
        return None
    from torchmetrics.detection.mean_ap import MeanAveragePrecision

    metric = MeanAveragePrecision(box_format="xyxy", iou_type="bbox", backend="pycocotools")
    metric.update([{"boxes": _as_tensor(p["boxes"], torch.float32).reshape(-1, 4),
                    "scores": _as_tensor(p["scores"], torch.float32).reshape(-1),
                    "labels": _as_tensor(p["labels"], torch.long).reshape(-1)} for p in preds],
                  [{"boxes": _as_tensor(t["boxes"], torch.float32).reshape(-1, 4),
                    "labels": _as_tensor(t["labels"], torch.long).reshape(-1)} for t in targets])
    with contextlib.redirect_stdout(io.StringIO()):
        out = metric.compute()
    return {k: float(out[k]) for k in ("map", "map_50", "map_75")}


def mean_average_precision(preds: Sequence[dict], targets: Sequence[dict], backend: str = "auto") -> dict[str, float]:
    """COCO box mAP: ``{"map": mAP@0.5:0.95, "map_50": mAP@0.5, "map_75": mAP@0.75}`` (-1 without any ground truth).

    ``preds[i]``: ``boxes`` (k, 4) pixel x0, y0, x1, y1, ``scores`` (k,), ``labels`` (k,) class ids;
    ``targets[i]``: ``boxes`` (m, 4), ``labels`` (m,); one entry per image. Up to 100 detections per image
    count (COCO's maxDets). ``backend``: "auto" (torchmetrics when it can run, else pycocotools),
    "torchmetrics" or "pycocotools".
    """
    _check_detections(preds, targets)
    if backend not in ("auto", "torchmetrics", "pycocotools"):
        raise ValueError(f"backend={backend!r}; choose 'auto', 'torchmetrics' or 'pycocotools'")
    if backend != "pycocotools":
        out = _torchmetrics_map(preds, targets)
        if out is not None:
            return out
        if backend == "torchmetrics":
            raise ValueError("backend='torchmetrics' needs torchvision (pip install torchvision); or use 'auto'")
    return _cocoeval(preds, targets)


def confusion_matrix(pred: torch.Tensor, target: torch.Tensor, num_classes: int,
                     ignore_index: int | None = IGNORE) -> torch.Tensor:
    """(num_classes, num_classes) pixel counts, row = target class, column = predicted class; pixels whose
    target is ``ignore_index`` are left out. ``pred`` and ``target``: class ids of one shape (e.g. (B, H, W))."""
    pred, target = torch.as_tensor(pred).detach().cpu().long(), torch.as_tensor(target).detach().cpu().long()
    if pred.shape != target.shape:
        raise ValueError(f"pred {tuple(pred.shape)} and target {tuple(target.shape)} differ; give class ids of one "
                         "shape (take argmax over the class dimension of logits first)")
    keep = target != ignore_index if ignore_index is not None else torch.ones_like(target, dtype=torch.bool)
    pred, target = pred[keep], target[keep]
    for name, x in (("pred", pred), ("target", target)):
        if x.numel() and (int(x.min()) < 0 or int(x.max()) >= num_classes):
            raise ValueError(f"{name} holds class id {int(x.min()) if int(x.min()) < 0 else int(x.max())}; "
                             f"ids must be in [0, {num_classes}) (num_classes={num_classes})")
    return torch.bincount(target * num_classes + pred, minlength=num_classes**2).reshape(num_classes, num_classes)


def class_iou(pred: torch.Tensor, target: torch.Tensor, num_classes: int,
              ignore_index: int | None = IGNORE) -> torch.Tensor:
    """IoU of each class, (num_classes,) float64; NaN for a class in neither the prediction nor the target."""
    return confusion_iou(confusion_matrix(pred, target, num_classes, ignore_index))


def confusion_iou(cm: torch.Tensor) -> torch.Tensor:
    """Each class's IoU from a `confusion_matrix` (summed over batches, say); NaN for a class never seen."""
    cm = cm.double()
    inter = cm.diagonal()
    union = cm.sum(0) + cm.sum(1) - inter
    return torch.where(union > 0, inter / union.clamp(min=1), torch.full_like(union, float("nan")))


def mean_of_present(iou: torch.Tensor) -> float:
    """The mean of the classes' IoUs that are not NaN (the classes present in prediction or target)."""
    present = ~iou.isnan()
    return float(iou[present].mean()) if bool(present.any()) else float("nan")


def mean_iou(pred: torch.Tensor, target: torch.Tensor, num_classes: int, ignore_index: int | None = IGNORE) -> float:
    """Mean IoU over the classes present (in the prediction or the target), background included."""
    return mean_of_present(class_iou(pred, target, num_classes, ignore_index))


def _references(predictions: Sequence[str], references: Sequence) -> list[list[str]]:
    if isinstance(predictions, str) or isinstance(references, str):
        raise TypeError("predictions and references must be lists of strings, one per example")
    if len(predictions) != len(references):
        raise ValueError(f"{len(predictions)} predictions but {len(references)} references; give one entry each")
    return [[r] if isinstance(r, str) else list(r) for r in references]


def bleu4(predictions: Sequence[str], references: Sequence) -> float:
    """Corpus BLEU-4 (torchmetrics ``BLEUScore``, whitespace tokens, no smoothing) in [0, 1].
    ``references[i]``: a string or a list of strings (several references for one prediction)."""
    from torchmetrics.text import BLEUScore

    refs = _references(predictions, references)
    return float(BLEUScore(n_gram=4)(list(predictions), refs))


def _normal(s: str) -> str:
    return " ".join(s.split())


def exact_match(predictions: Sequence[str], references: Sequence) -> float:
    """The fraction of predictions equal to one of their references, after collapsing whitespace."""
    refs = _references(predictions, references)
    if not refs:
        return float("nan")
    hits = sum(_normal(p) in {_normal(r) for r in rs} for p, rs in zip(predictions, refs))
    return hits / len(refs)
