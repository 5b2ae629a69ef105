"""`qkv train` tasks detect, segment and caption: tiny runs that learn, the metrics against their
definitions, the data's boxes into the set loss's form, users' files through load_data, bad settings refused."""

import importlib.util
from pathlib import Path

import pytest
import torch

import qkv

from qkv.data import IGNORE, load_data
from qkv.models.set_loss import box_corners
from qkv.train import ConfigError, fit, load_config
from qkv.train.tasks import build_model, evaluate, loss_and_stats
from qkv.train.vision_metrics import mean_average_precision
from qkv.train.vision_tasks import balance_weights, detection_targets

# one shape on a 32 x 32 canvas: what a tiny model learns in seconds
SHAPES = ["data.dataset=scenes", "data.options.size=32", "data.options.digits=false", "data.options.max_objects=1",
          "data.options.n_val=64", "data.options.n_test=64", "train.warmup=10", "train.eval_every=1000",
          "train.save_every=1000", "train.log_every=1000"]
TINY = {
    "detect": ["model.dim=64", "model.n_layers=2", "model.n_heads=2", "model.ffn_dim=128", "model.patch_size=8",
               "model.num_detection_tokens=4"],
    "segment": ["model.dims=[16, 32]", "model.depths=[1, 1]", "model.n_heads=[1, 2]", "model.patch_sizes=[3, 3]",
                "model.strides=[2, 2]", "model.sr_ratios=[2, 1]", "model.mlp_ratios=[2, 2]", "model.decoder_dim=32"],
    "caption": ["data.tokenizer=wordpiece", "data.vocab_size=100", "model.encoder={patch_size=8, dim=64, n_layers=2, "
                "n_heads=2, ffn_dim=128}", "model.decoder={dim=64, n_layers=1, n_heads=2, ffn_dim=128}"],
}


def _cfg(tmp_path, task, *overrides):
    return load_config(None, [f"task={task}", f"out={tmp_path / 'run'}", *SHAPES, *TINY[task], *overrides])


def _fit(tmp_path, task, *overrides):
    cfg = _cfg(tmp_path, task, *overrides)
    return fit(cfg, progress=False), cfg


def test_segmentation_learns(tmp_path):
    result, _ = _fit(tmp_path, "segment", "data.options.n_train=512", "train.steps=120", "train.batch_size=16",
                     "train.lr=3e-3", "train.class_balance=0.5")
    assert result.test["mean_iou"] > 0.5, result.test  # 4 classes present: chance is about 0.25
    assert result.test["pixel_accuracy"] > 0.9, result.test


def test_captioning_learns_exact_captions(tmp_path):
    result, _ = _fit(tmp_path, "caption", "data.options.n_train=1024", "train.steps=200", "train.batch_size=32",
                     "train.lr=3e-3")
    # "a <colour> <shape>": 8 colours x 3 shapes, chance exact match 1/24
    assert result.test["exact_match"] > 0.5, result.test
    assert result.test["bleu4"] == 0.0  # three-word captions hold no 4-gram: BLEU-4 is 0 by definition


def test_greedy_exact_match_is_teacher_forced_exact_match(tmp_path):
    """Greedy decoding reproduces a caption exactly when every teacher-forced arg-max is its token: the
    scorer's exact match (generated) equals the share of captions whose teacher-forced tokens are all right."""
    cfg = _cfg(tmp_path, "caption", "data.options.n_train=256", "train.steps=60", "train.batch_size=32",
               "train.lr=3e-3")
    result = fit(cfg, progress=False)
    model = qkv.load(result.out).eval()
    data = load_data(cfg.data, "caption", cfg.seed)
    right = total = 0
    with torch.no_grad():
        for batch in data.batches("test", 32, 0):
            _, stats = loss_and_stats("caption", model, batch)
            right, total = right + stats["correct"], total + stats["count"]
    assert 0 < right < total  # a half-trained model: some right, some wrong
    assert evaluate("caption", model, data, "test", 32, 0)["exact_match"] == pytest.approx(right / total)


def test_detection_score_is_coco_map_of_every_token(tmp_path):
    cfg = _cfg(tmp_path, "detect", "data.options.n_train=64")
    data = load_data(cfg.data, "detect", cfg.seed)
    torch.manual_seed(0)
    model = build_model(cfg, data).eval()
    batch = next(iter(data.batches("test", 64, 0)))
    with torch.no_grad():
        out = model(batch["pixel_values"])
    probs = out.logits.softmax(-1)[..., :-1]
    preds, targets = [], []
    for i in range(len(probs)):
        s, k = probs[i].max(-1)
        preds.append({"boxes": box_corners(out.pred_boxes[i]) * 32, "scores": s, "labels": k})
        keep = batch["labels"][i] != IGNORE
        targets.append({"boxes": batch["boxes"][i][keep], "labels": batch["labels"][i][keep]})
    want = mean_average_precision(preds, targets, backend="pycocotools")
    got = evaluate("detect", model, data, "test", 64, 0)
    assert got["map50"] == pytest.approx(want["map_50"]) and got["map"] == pytest.approx(want["map"])


def test_detection_targets_are_normalised_centre_boxes():
    batch = {"pixel_values": torch.zeros(2, 3, 20, 40),
             "boxes": torch.tensor([[[4.0, 2.0, 12.0, 10.0], [0, 0, 0, 0]], [[0.0, 0.0, 40.0, 20.0], [10, 5, 30, 15]]]),
             "labels": torch.tensor([[3, IGNORE], [1, 2]])}
    t = detection_targets(batch)
    assert [x["class_labels"].tolist() for x in t] == [[3], [1, 2]]
    torch.testing.assert_close(t[0]["boxes"], torch.tensor([[0.2, 0.3, 0.2, 0.4]]))
    for x, b, keep in zip(t, batch["boxes"], batch["labels"] != IGNORE):  # box_corners undoes it
        torch.testing.assert_close(box_corners(x["boxes"]) * torch.tensor([40.0, 20, 40, 20]), b[keep])


def test_balance_weights():
    labels = torch.tensor([[0] * 90 + [1] * 9 + [2] * 1 + [IGNORE] * 10])
    w = balance_weights(labels, 4, 0.5)
    assert w.mean() == pytest.approx(1.0)
    assert float(w[1] / w[0]) == pytest.approx((90 / 9) ** 0.5) and float(w[2] / w[1]) == pytest.approx(3.0)
    assert float(w[3]) == pytest.approx(float(w[2]))  # absent: as the rarest present
    assert balance_weights(labels, 4, 0.0) is None
    one = balance_weights(labels, 4, 1.0)  # every class's pixels add up to the same weight
    assert float(one[0] * 90) == pytest.approx(float(one[1] * 9)) == pytest.approx(float(one[2] * 1))


def test_class_balance_is_for_segmentation_only(tmp_path):
    with pytest.raises(ConfigError, match="train.class_balance.*segment only"):
        load_config(None, ["task=detect", "data.dataset=scenes", "train.class_balance=0.5"])
    with pytest.raises(ConfigError, match="train.class_balance"):
        load_config(None, ["task=segment", "data.dataset=scenes", "train.class_balance=2"])


def test_users_files_train_through_load_data(tmp_path):
    here = Path(__file__).with_name("test_vision_files.py")
    spec = importlib.util.spec_from_file_location("vision_files_tests", here)
    files = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(files)
    files._write_coco(tmp_path / "det", n=8)
    cfg = load_config(None, ["task=detect", f"out={tmp_path / 'run'}", f"data.path={tmp_path / 'det/ann.json'}",
                             "data.val_fraction=0.25", "data.test_fraction=0.25", "data.options.image_size=32",
                             *TINY["detect"], "train.steps=2", "train.batch_size=2", "train.warmup=1"])
    result = fit(cfg, progress=False)
    assert result.step == 2 and 0 <= result.test["map50"] <= 1
    with pytest.raises(Exception, match="data.options.colour"):
        fit(load_config(None, [f"out={tmp_path / 'r2'}", "task=segment", f"data.path={tmp_path / 'det'}",
                               "data.options.colour=1"]), progress=False)


def test_segmentation_counts_pixels_for_the_metric_and_images_for_the_rate(tmp_path):
    cfg = _cfg(tmp_path, "segment", "data.options.n_train=8")
    data = load_data(cfg.data, "segment", cfg.seed)
    batch = next(iter(data.batches("train", 4, 0)))
    _, stats = loss_and_stats("segment", build_model(cfg, data), batch)
    assert stats["examples"] == 4 and stats["count"] == int((batch["labels"] != IGNORE).sum()) > 4
