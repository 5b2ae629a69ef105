"""qkv.train.vision_metrics against references: pycocotools' COCOeval, hand-computed values, torchmetrics."""

import contextlib
import io
import math

import pytest
import torch

from qkv.data.scenes import scenes
from qkv.train.vision_metrics import bleu4, class_iou, confusion_matrix, exact_match, mean_average_precision, mean_iou


def _cocoeval_reference(preds, targets):
    """COCOeval run by hand on COCO-format dicts (boxes as x, y, w, h): the reference mAP."""
    from pycocotools.coco import COCO
    from pycocotools.cocoeval import COCOeval

    anns, dets = [], []
    for i, (p, t) in enumerate(zip(preds, targets, strict=True)):
        for (x0, y0, x1, y1), c in zip(t["boxes"], t["labels"], strict=True):
            anns.append({"id": len(anns) + 1, "image_id": i, "category_id": c, "bbox": [x0, y0, x1 - x0, y1 - y0],
                         "area": (x1 - x0) * (y1 - y0), "iscrowd": 0})
        for (x0, y0, x1, y1), s, c in zip(p["boxes"], p["scores"], p["labels"], strict=True):
            dets.append({"image_id": i, "category_id": c, "bbox": [x0, y0, x1 - x0, y1 - y0], "score": s})
    with contextlib.redirect_stdout(io.StringIO()):
        gt = COCO()
        gt.dataset = {"images": [{"id": i} for i in range(len(targets))], "annotations": anns,
                      "categories": [{"id": c} for c in range(1, 14)]}
        gt.createIndex()
        ev = COCOeval(gt, gt.loadRes(dets), "bbox")
        ev.evaluate()
        ev.accumulate()
        ev.summarize()
    return ev.stats[0], ev.stats[1]


def test_map_by_hand():
    # one class, two images, one object each; detections by score: hit, miss (no overlap), hit.
    # precision / recall: (1, 1/2), (1/2, 1/2), (2/3, 1); COCO's 101 recall points: 51 at precision 1
    # (recall <= 0.50), 50 at 2/3; every hit has IoU 1, so every threshold agrees
    targets = [{"boxes": [[0, 0, 10, 10]], "labels": [1]}, {"boxes": [[20, 20, 30, 30]], "labels": [1]}]
    preds = [{"boxes": [[0, 0, 10, 10]], "scores": [0.9], "labels": [1]},
             {"boxes": [[0, 0, 5, 5], [20, 20, 30, 30]], "scores": [0.8, 0.7], "labels": [1, 1]}]
    out = mean_average_precision(preds, targets)
    expected = (51 + 50 * 2 / 3) / 101
    assert out["map"] == pytest.approx(expected) and out["map_50"] == pytest.approx(expected)


def test_map_thresholds_by_hand():
    # IoU 0.82 passes the thresholds 0.50 .. 0.80 (7 of 10): mAP@0.5:0.95 = 0.7, mAP@0.5 = 1
    out = mean_average_precision([{"boxes": [[0, 0, 10, 8.2]], "scores": [0.9], "labels": [3]}],
                                 [{"boxes": [[0, 0, 10, 10]], "labels": [3]}])
    assert out["map"] == pytest.approx(0.7) and out["map_50"] == pytest.approx(1.0)
    wrong = mean_average_precision([{"boxes": [[0, 0, 10, 10]], "scores": [0.9], "labels": [2]}],
                                   [{"boxes": [[0, 0, 10, 10]], "labels": [3]}])
    assert wrong["map"] == 0.0  # the right box with the wrong class finds nothing
    empty = mean_average_precision([{"boxes": [], "scores": [], "labels": []}],
                                   [{"boxes": [[0, 0, 1, 1]], "labels": [1]}])
    assert empty["map"] == 0.0


def test_map_matches_cocoeval_on_scenes():
    d = scenes(30, "test", seed=0, size=48, max_objects=4)
    g = torch.Generator().manual_seed(0)
    targets = [{"boxes": b.tolist(), "labels": c.tolist()} for b, c in zip(d["boxes"], d["labels"], strict=True)]
    perfect = [{**t, "scores": [1.0] * len(t["labels"])} for t in targets]
    out = mean_average_precision(perfect, targets)
    assert out["map"] == pytest.approx(1.0) and out["map_50"] == pytest.approx(1.0)
    noisy = []
    for t in targets:  # jittered boxes, random scores, some labels wrong, an extra false positive
        b = torch.tensor(t["boxes"]) + torch.randn(len(t["boxes"]), 4, generator=g) * 2.0
        c = torch.tensor(t["labels"])
        c = torch.where(torch.rand(len(c), generator=g) < 0.2, (c % 13) + 1, c)
        b = torch.cat([b, torch.tensor([[1.0, 1.0, 12.0, 12.0]])])
        c = torch.cat([c, torch.tensor([5])])
        noisy.append({"boxes": b.tolist(), "scores": torch.rand(len(c), generator=g).tolist(), "labels": c.tolist()})
    out = mean_average_precision(noisy, targets, backend="pycocotools")
    ref_map, ref_50 = _cocoeval_reference(noisy, targets)
    assert 0.05 < out["map"] < out["map_50"] < 1.0
    assert out["map"] == pytest.approx(ref_map, abs=1e-9) and out["map_50"] == pytest.approx(ref_50, abs=1e-9)


def test_map_matches_torchmetrics():
    from torchmetrics.utilities.imports import _TORCHVISION_AVAILABLE

    if not _TORCHVISION_AVAILABLE:
        pytest.skip("torchmetrics' MeanAveragePrecision needs torchvision: pip install torchvision")
    d = scenes(10, "val", seed=1, size=48, max_objects=3)
    targets = [{"boxes": b, "labels": c} for b, c in zip(d["boxes"], d["labels"], strict=True)]
    preds = [{"boxes": t["boxes"] + 1.5, "scores": [0.5] * len(t["labels"]), "labels": t["labels"]} for t in targets]
    a = mean_average_precision(preds, targets, backend="pycocotools")
    b = mean_average_precision(preds, targets, backend="torchmetrics")
    assert a == pytest.approx(b, abs=1e-6)


def test_map_refuses_mismatched_inputs():
    with pytest.raises(ValueError, match="one entry per image"):
        mean_average_precision([], [{"boxes": [], "labels": []}])
    with pytest.raises(ValueError, match=r"preds\[0\].*scores"):
        mean_average_precision([{"boxes": [[0, 0, 1, 1]], "labels": [1]}], [{"boxes": [], "labels": []}])
    with pytest.raises(ValueError, match="differ in length"):
        mean_average_precision([{"boxes": [[0, 0, 1, 1]], "scores": [1, 2], "labels": [1]}],
                               [{"boxes": [], "labels": []}])


def test_mean_iou_by_hand():
    target = torch.tensor([[0, 0, 1, 1, -100], [0, 0, 1, 1, -100]])
    pred = torch.tensor([[0, 1, 1, 1, 3], [0, 0, 1, 2, 0]])  # the ignored column predicts anything
    cm = confusion_matrix(pred, target, 4)
    assert cm.tolist() == [[3, 1, 0, 0], [0, 3, 1, 0], [0, 0, 0, 0], [0, 0, 0, 0]]
    iou = class_iou(pred, target, 4)
    assert iou[:3].tolist() == pytest.approx([3 / 4, 3 / 5, 0.0]) and math.isnan(iou[3])  # class 3: nowhere
    assert mean_iou(pred, target, 4) == pytest.approx((3 / 4 + 3 / 5 + 0) / 3)
    assert mean_iou(target.clamp(min=0), target.clamp(min=0), 4) == 1.0
    with pytest.raises(ValueError, match="class id 7"):
        mean_iou(torch.full((2, 5), 7), target, 4)
    with pytest.raises(ValueError, match="differ"):
        mean_iou(pred[:1], target, 4)


def test_mean_iou_matches_torchmetrics():
    from torchmetrics.classification import MulticlassJaccardIndex

    g = torch.Generator().manual_seed(0)
    target = torch.randint(0, 5, (4, 16, 16), generator=g)
    pred = torch.where(torch.rand(4, 16, 16, generator=g) < 0.7, target, torch.randint(0, 5, (4, 16, 16), generator=g))
    target[0, :4] = -100
    ref = MulticlassJaccardIndex(num_classes=5, average="macro", ignore_index=-100)(pred, target)
    assert mean_iou(pred, target, 5) == pytest.approx(float(ref), abs=1e-6)


def test_bleu4_known_values():
    # clipped n-gram precisions 5/6, 3/5, 2/4, 1/3; equal lengths, so no brevity penalty
    assert bleu4(["the cat sat on the mat"], ["the cat sat on a mat"]) == pytest.approx((1 / 12) ** 0.25, abs=1e-6)
    # every n-gram matches; 5 words against 6: brevity penalty exp(1 - 6/5)
    assert bleu4(["the cat sat on a"], [["the cat sat on a mat"]]) == pytest.approx(math.exp(-0.2), abs=1e-6)
    caps = scenes(5, "train", seed=0, max_objects=3, min_objects=3)["captions"]
    assert bleu4(caps, caps) == pytest.approx(1.0)
    assert bleu4(["a b c d"], [["x y z w", "a b c d"]]) == pytest.approx(1.0)  # the best reference counts
    with pytest.raises(TypeError, match="lists of strings"):
        bleu4("a b c d", ["a b c d"])


def test_exact_match():
    assert exact_match(["a red 3", "a blue  square ", "a green 1"], ["a red 3", "a blue square", "a green 7"]) == 2 / 3
    assert exact_match(["a red 3"], [["a red 4", "a red 3"]]) == 1.0
    with pytest.raises(ValueError, match="2 predictions but 1 references"):
        exact_match(["a", "b"], ["a"])
