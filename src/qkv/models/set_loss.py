"""The DETR set loss (Carion et al., arXiv:2005.12872): predictions matched one-to-one to the objects of
each image (Hungarian matching), then class cross-entropy with a down-weighted "no object" class, L1 and
generalised-IoU box losses on the matched pairs. Used by `ObjectDetector` (YOLOS, arXiv:2106.00666).

Boxes are normalised ``(cx, cy, w, h)`` in [0, 1], as the models predict them and as Hugging Face's
detection labels give them: ``labels`` is one dict per image with ``class_labels`` (N,) ints and
``boxes`` (N, 4).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F


@dataclass
class SetLossConfig:
    """The matching costs and loss weights (DETR's defaults, which YOLOS keeps). `set_loss` reads these
    attribute names from any config that has them (`YolosConfig` does)."""

    class_cost: float = 1.0  # matching: weight of -p(target class)
    bbox_cost: float = 5.0  # matching: weight of the L1 distance of the boxes
    giou_cost: float = 2.0  # matching: weight of -GIoU
    bbox_loss_coefficient: float = 5.0  # loss: weight of the L1 box loss
    giou_loss_coefficient: float = 2.0  # loss: weight of the GIoU loss
    eos_coefficient: float = 0.1  # loss: cross-entropy weight of the "no object" class (the others weigh 1)


def box_corners(boxes: torch.Tensor) -> torch.Tensor:
    """(..., 4) ``(cx, cy, w, h)`` -> ``(x0, y0, x1, y1)``."""
    cx, cy, w, h = boxes.unbind(-1)
    return torch.stack([cx - 0.5 * w, cy - 0.5 * h, cx + 0.5 * w, cy + 0.5 * h], dim=-1)


def _area(b: torch.Tensor) -> torch.Tensor:
    return (b[..., 2] - b[..., 0]) * (b[..., 3] - b[..., 1])


def generalized_box_iou(a: torch.Tensor, b: torch.Tensor, pairwise: bool = True) -> torch.Tensor:
    """GIoU (Rezatofighi et al., arXiv:1902.09630) of corner boxes: a (N, 4), b (M, 4) -> (N, M);
    ``pairwise=False``: a and b (N, 4) matched row by row -> (N,). IoU minus the share of the enclosing
    box that neither covers; in [-1, 1]."""
    if pairwise:
        a, b = a[:, None], b[None]
    lo, hi = torch.max(a[..., :2], b[..., :2]), torch.min(a[..., 2:], b[..., 2:])
    inter = (hi - lo).clamp(min=0).prod(-1)
    union = _area(a) + _area(b) - inter
    lo, hi = torch.min(a[..., :2], b[..., :2]), torch.max(a[..., 2:], b[..., 2:])
    hull = (hi - lo).clamp(min=0).prod(-1)
    return inter / union - (hull - union) / hull


def check_labels(labels, batch: int, n_classes: int) -> list[dict[str, torch.Tensor]]:
    """``labels`` as a list of ``{"class_labels": (N,) long, "boxes": (N, 4) float}``, one per image;
    ValueError / TypeError name what is wrong."""
    if not isinstance(labels, Sequence) or isinstance(labels, (str, bytes)):
        raise TypeError(f"labels must be a list of dicts (one per image), got {type(labels).__name__}")
    if len(labels) != batch:
        raise ValueError(f"labels has {len(labels)} entries for a batch of {batch} images; give one dict per image")
    out = []
    for i, t in enumerate(labels):
        if not isinstance(t, Mapping) or "class_labels" not in t or "boxes" not in t:
            raise ValueError(f"labels[{i}] must be a dict with 'class_labels' (N,) and 'boxes' (N, 4) "
                             "(normalised cx, cy, w, h)")
        cls, boxes = torch.as_tensor(t["class_labels"]), torch.as_tensor(t["boxes"])
        if cls.dim() != 1 or boxes.shape != (len(cls), 4):
            raise ValueError(f"labels[{i}]: class_labels {tuple(cls.shape)} and boxes {tuple(boxes.shape)} must be "
                             "(N,) and (N, 4) for the same N")
        if cls.is_floating_point() or (len(cls) and not (0 <= int(cls.min()) and int(cls.max()) < n_classes)):
            raise ValueError(f"labels[{i}]['class_labels'] must be integer class ids in [0, {n_classes}), got "
                             f"{cls.tolist()}")
        if len(boxes) and bool((boxes[:, 2:] < 0).any()):
            raise ValueError(f"labels[{i}]['boxes'] must be (cx, cy, w, h) with w, h >= 0, got {boxes.tolist()}")
        out.append({"class_labels": cls.long(), "boxes": boxes.float()})
    return out


@torch.no_grad()
def hungarian_match(logits: torch.Tensor, pred_boxes: torch.Tensor, labels: list[dict], class_cost: float = 1.0,
                    bbox_cost: float = 5.0, giou_cost: float = 2.0) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """The assignment of predictions to objects of least total cost, per image (scipy's
    ``linear_sum_assignment``). logits (B, Q, K + 1), pred_boxes (B, Q, 4) cxcywh. Cost of prediction q for
    object j: ``bbox_cost * |box_q - box_j|_1 - class_cost * p_q(class_j) - giou_cost * GIoU(q, j)``.
    Returns per image (prediction indices, object indices), each of length min(Q, N), predictions sorted."""
    from scipy.optimize import linear_sum_assignment

    B, Q = logits.shape[:2]
    prob = logits.flatten(0, 1).float().softmax(-1)  # (B * Q, K + 1)
    boxes = pred_boxes.flatten(0, 1).float()  # (B * Q, 4)
    ids = torch.cat([t["class_labels"] for t in labels]).to(logits.device)
    tgt = torch.cat([t["boxes"] for t in labels]).to(boxes)
    cost = (bbox_cost * torch.cdist(boxes, tgt, p=1) - class_cost * prob[:, ids]
            - giou_cost * generalized_box_iou(box_corners(boxes), box_corners(tgt)))
    big = torch.finfo(cost.dtype).max  # a degenerate box (NaN, inf) is matched last, never crashes training
    cost = torch.nan_to_num(cost, nan=big, posinf=big, neginf=big).view(B, Q, -1).cpu()
    sizes = [len(t["boxes"]) for t in labels]
    out = []
    for i, c in enumerate(cost.split(sizes, -1)):
        rows, cols = linear_sum_assignment(c[i].numpy())
        out.append((torch.as_tensor(rows, dtype=torch.long), torch.as_tensor(cols, dtype=torch.long)))
    return out


def _terms(logits, pred_boxes, labels, match, n_boxes: float, eos: float) -> dict[str, torch.Tensor]:
    """loss_ce, loss_bbox, loss_giou and cardinality_error of one set of predictions under ``match``."""
    K = logits.shape[-1] - 1  # the last class is "no object"
    batch = torch.cat([torch.full_like(p, i) for i, (p, _) in enumerate(match)]).to(logits.device)
    query = torch.cat([p for p, _ in match]).to(logits.device)
    target = torch.full(logits.shape[:2], K, dtype=torch.long, device=logits.device)  # (B, Q)
    target[batch, query] = torch.cat([t["class_labels"][j] for t, (_, j) in zip(labels, match)]).to(logits.device)
    weight = torch.ones(K + 1, dtype=logits.dtype, device=logits.device)
    weight[-1] = eos
    ce = F.cross_entropy(logits.transpose(1, 2), target, weight)  # weighted mean over (B, Q)
    src = pred_boxes[batch, query]  # (matched, 4)
    tgt = torch.cat([t["boxes"][j] for t, (_, j) in zip(labels, match)]).to(src)
    l1 = F.l1_loss(src, tgt, reduction="sum") / n_boxes
    giou = (1 - generalized_box_iou(box_corners(src), box_corners(tgt), pairwise=False)).sum() / n_boxes
    with torch.no_grad():  # logged only: |predicted objects - true objects|, mean over images
        found = (logits.argmax(-1) != K).sum(1).float()
        card = F.l1_loss(found, torch.tensor([float(len(t["boxes"])) for t in labels], device=logits.device))
    return {"loss_ce": ce, "loss_bbox": l1, "loss_giou": giou, "cardinality_error": card}


def patch_targets(labels: list[dict], grid: tuple[int, int], no_object: int) -> torch.Tensor:
    """The class each patch of a ``grid`` (rows, cols) should name, per image: that of the smallest box
    (normalised cxcywh) holding the patch's centre, ``no_object`` where none does. -> (B, rows * cols) long."""
    rows, cols = grid
    cy = (torch.arange(rows, dtype=torch.float32) + 0.5) / rows
    cx = (torch.arange(cols, dtype=torch.float32) + 0.5) / cols
    cy, cx = (t.flatten() for t in torch.meshgrid(cy, cx, indexing="ij"))  # (P,) each
    out = []
    for t in labels:
        x0, y0, x1, y1 = box_corners(t["boxes"].float().cpu()).unbind(-1)  # (N,) each
        inside = ((cx >= x0[:, None]) & (cx < x1[:, None]) & (cy >= y0[:, None]) & (cy < y1[:, None]))  # (N, P)
        area = ((x1 - x0) * (y1 - y0))[:, None].expand_as(inside).masked_fill(~inside, float("inf"))
        ids = torch.cat([t["class_labels"].cpu(), torch.tensor([no_object])])
        best = torch.where(inside.any(0), area.argmin(0) if len(area) else 0, len(ids) - 1)
        out.append(ids[best])
    return torch.stack(out)


def set_loss(logits: torch.Tensor, pred_boxes: torch.Tensor, labels, config=None,
             auxiliary: Sequence[tuple[torch.Tensor, torch.Tensor]] = ()) -> tuple[torch.Tensor, dict]:
    """The DETR set loss: (total, parts). logits (B, Q, K + 1), pred_boxes (B, Q, 4) normalised cxcywh;
    ``labels`` one dict per image (see the module docstring); ``config`` any object with the
    `SetLossConfig` fields (default: DETR's values); ``auxiliary``: (logits, boxes) of intermediate layers,
    each matched and weighted like the final one, their parts suffixed ``_0``, ``_1``, ...

    total = sum over outputs of loss_ce + bbox_loss_coefficient * loss_bbox + giou_loss_coefficient *
    loss_giou; box losses are divided by the number of objects in the batch (at least 1)."""
    c = SetLossConfig() if config is None else config
    if logits.dim() != 3 or pred_boxes.shape != (*logits.shape[:2], 4):
        raise ValueError(f"logits {tuple(logits.shape)} and pred_boxes {tuple(pred_boxes.shape)} must be (B, Q, K + 1) "
                         "and (B, Q, 4)")
    labels = check_labels(labels, logits.shape[0], logits.shape[-1] - 1)
    n_boxes = max(float(sum(len(t["boxes"]) for t in labels)), 1.0)
    weights = {"loss_ce": 1.0, "loss_bbox": c.bbox_loss_coefficient, "loss_giou": c.giou_loss_coefficient}
    parts: dict[str, torch.Tensor] = {}
    total = logits.new_zeros(())
    for i, (lg, bx) in enumerate([(logits, pred_boxes), *auxiliary]):
        match = hungarian_match(lg, bx, labels, c.class_cost, c.bbox_cost, c.giou_cost)
        terms = _terms(lg, bx, labels, match, n_boxes, c.eos_coefficient)
        total = total + sum(weights[k] * terms[k] for k in weights)
        suffix = "" if i == 0 else f"_{i - 1}"
        parts.update({k + suffix: v for k, v in terms.items()})
    return total, parts
