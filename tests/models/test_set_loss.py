"""The DETR set loss: the matching is the cheapest one-to-one assignment (checked against every
permutation), GIoU and the loss terms equal transformers' implementation."""

import itertools

import pytest
import torch

pytest.importorskip("scipy", reason="the set loss needs scipy: pip install scipy")

from qkv.models.set_loss import (  # noqa: E402
    SetLossConfig,
    box_corners,
    generalized_box_iou,
    hungarian_match,
    set_loss,
)


def _case(g: torch.Generator, B: int, Q: int, K: int, counts):
    logits = torch.randn(B, Q, K + 1, generator=g) * 2
    boxes = torch.cat([torch.rand(B, Q, 2, generator=g) * 0.6 + 0.2, torch.rand(B, Q, 2, generator=g) * 0.4 + 0.02], -1)
    labels = [{"class_labels": torch.randint(0, K, (n,), generator=g),
               "boxes": torch.cat([torch.rand(n, 2, generator=g) * 0.6 + 0.2,
                                   torch.rand(n, 2, generator=g) * 0.4 + 0.02], -1)} for n in counts]
    return logits, boxes, labels


def _cost(logits, boxes, t, c: SetLossConfig):
    """The matching cost (Q, N) of one image, computed directly."""
    prob = logits.softmax(-1)[:, t["class_labels"]]
    l1 = (boxes[:, None] - t["boxes"][None]).abs().sum(-1)
    giou = generalized_box_iou(box_corners(boxes), box_corners(t["boxes"]))
    return c.bbox_cost * l1 - c.class_cost * prob - c.giou_cost * giou


@pytest.mark.parametrize("seed", range(12))
def test_matching_is_the_cheapest_assignment(seed):
    g = torch.Generator().manual_seed(seed)
    Q = int(torch.randint(1, 6, (1,), generator=g))
    counts = [int(n) for n in torch.randint(0, 6, (2,), generator=g)]  # more objects than predictions too
    c = SetLossConfig(class_cost=float(torch.rand(1, generator=g)) * 3, bbox_cost=float(torch.rand(1, generator=g)) * 6,
                      giou_cost=float(torch.rand(1, generator=g)) * 3)
    logits, boxes, labels = _case(g, 2, Q, 3, counts)
    match = hungarian_match(logits, boxes, labels, c.class_cost, c.bbox_cost, c.giou_cost)
    for b, (t, (rows, cols)) in enumerate(zip(labels, match)):
        n = len(t["boxes"])
        assert len(rows) == len(cols) == min(Q, n)
        assert len(set(rows.tolist())) == len(rows) and len(set(cols.tolist())) == len(cols)
        cost = _cost(logits[b], boxes[b], t, c).double()
        got = float(cost[rows, cols].sum())
        if Q >= n:  # each object gets a distinct prediction
            best = min(sum(float(cost[p[j], j]) for j in range(n)) for p in itertools.permutations(range(Q), n))
        else:  # each prediction gets a distinct object
            best = min(sum(float(cost[i, p[i]]) for i in range(Q)) for p in itertools.permutations(range(n), Q))
        assert got == pytest.approx(best, abs=1e-5)


def test_giou_known_values_and_transformers():
    a = torch.tensor([[0.0, 0.0, 2.0, 2.0]])
    assert float(generalized_box_iou(a, a)) == pytest.approx(1.0)
    assert float(generalized_box_iou(a, torch.tensor([[1.0, 0.0, 3.0, 2.0]]))) == pytest.approx(1 / 3)
    assert float(generalized_box_iou(a, torch.tensor([[3.0, 0.0, 5.0, 2.0]]))) == pytest.approx(-1 / 5)
    lfd = pytest.importorskip("transformers.loss.loss_for_object_detection")
    g = torch.Generator().manual_seed(0)
    x = box_corners(torch.cat([torch.rand(7, 2, generator=g), torch.rand(7, 2, generator=g) * 0.5], -1))
    y = box_corners(torch.cat([torch.rand(5, 2, generator=g), torch.rand(5, 2, generator=g) * 0.5], -1))
    torch.testing.assert_close(generalized_box_iou(x, y), lfd.generalized_box_iou(x, y))
    torch.testing.assert_close(generalized_box_iou(x[:5], y, pairwise=False), lfd.generalized_box_iou(x[:5], y).diag())


@pytest.mark.parametrize("counts", [[2, 0, 3], [0, 0, 0], [1, 4, 4]], ids=["mixed", "empty", "full"])
def test_loss_equals_transformers_image_loss(counts):
    lfd = pytest.importorskip("transformers.loss.loss_for_object_detection")
    g = torch.Generator().manual_seed(sum(counts))
    logits, boxes, labels = _case(g, 3, 4, 5, counts)
    aux = [(torch.randn_like(logits), boxes.flip(1)) for _ in range(2)]
    c = SetLossConfig(eos_coefficient=0.3, giou_loss_coefficient=1.5)
    total, parts = set_loss(logits, boxes, labels, c, aux)
    matcher = lfd.HungarianMatcher(class_cost=c.class_cost, bbox_cost=c.bbox_cost, giou_cost=c.giou_cost)
    criterion = lfd.ImageLoss(matcher, num_classes=5, eos_coef=c.eos_coefficient,
                              losses=["labels", "boxes", "cardinality"])
    outputs = {"logits": logits, "pred_boxes": boxes,
               "auxiliary_outputs": [{"logits": a, "pred_boxes": b} for a, b in aux]}
    ref = criterion(outputs, labels)
    assert set(parts) == set(ref)
    for k, v in ref.items():
        torch.testing.assert_close(parts[k], v, rtol=0, atol=1e-5)
    weights = {"loss_ce": 1.0, "loss_bbox": c.bbox_loss_coefficient, "loss_giou": c.giou_loss_coefficient}
    want = sum(w * ref[k + s] for k, w in weights.items() for s in ("", "_0", "_1"))
    torch.testing.assert_close(total, want, rtol=0, atol=1e-5)


def test_loss_has_gradients_and_bad_labels_are_named():
    g = torch.Generator().manual_seed(0)
    logits, boxes, labels = _case(g, 2, 3, 2, [1, 2])
    logits.requires_grad_(True)
    boxes.requires_grad_(True)
    total, _ = set_loss(logits, boxes, labels)
    total.backward()
    assert logits.grad.abs().sum() > 0 and boxes.grad.abs().sum() > 0
    with pytest.raises(ValueError, match="labels has 1 entries"):
        set_loss(logits, boxes, labels[:1])
    with pytest.raises(TypeError, match="labels must be a list"):
        set_loss(logits, boxes, labels[0])
    with pytest.raises(ValueError, match=r"labels\[0\]"):
        set_loss(logits, boxes, [{"boxes": labels[0]["boxes"]}, labels[1]])
    with pytest.raises(ValueError, match=r"labels\[1\]\['class_labels'\]"):
        set_loss(logits, boxes, [labels[0], {**labels[1], "class_labels": torch.tensor([0, 2])}])
    with pytest.raises(ValueError, match=r"labels\[0\]: class_labels"):
        set_loss(logits, boxes, [{**labels[0], "boxes": torch.rand(2, 4)}, labels[1]])
    with pytest.raises(ValueError, match="pred_boxes"):
        set_loss(logits, boxes[..., :3], labels)
