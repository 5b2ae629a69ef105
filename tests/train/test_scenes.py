"""qkv.data.scenes: generated scenes are deterministic, their splits disjoint, their targets consistent."""

import hashlib
import re

import numpy as np
import pytest
import torch

from qkv.data import IGNORE, DataError, load_data
from qkv.data.scenes import CAPTION_WORDS, CLASSES, COLOURS, MIN_VISIBLE, caption, digit_indices, scenes
from qkv.train import load_config

PHRASE = rf"a ({'|'.join(COLOURS)}) ({'|'.join(CLASSES[1:])})"
GRAMMAR = re.compile(rf"^{PHRASE}(?: (?:left of|above|below) {PHRASE})*$")


def _same(a: dict, b: dict) -> bool:
    return (np.array_equal(a["images"], b["images"]) and np.array_equal(a["masks"], b["masks"])
            and a["captions"] == b["captions"]
            and all(np.array_equal(x, y) for x, y in zip(a["boxes"], b["boxes"], strict=True)))


def test_deterministic_by_seed():
    a, b = scenes(12, "train", seed=3, size=48, max_objects=4), scenes(12, "train", seed=3, size=48, max_objects=4)
    assert _same(a, b)
    assert not _same(a, scenes(12, "train", seed=4, size=48, max_objects=4))
    head = scenes(5, "train", seed=3, size=48, max_objects=4)  # scene i does not depend on how many are drawn
    assert np.array_equal(head["images"], a["images"][:5]) and head["captions"] == a["captions"][:5]


def test_splits_are_disjoint():
    digests, digits = {}, {}
    for split in ("train", "val", "test"):
        d = scenes(150, split, seed=0, size=32, max_objects=2)
        digests[split] = {hashlib.sha1(im.tobytes()).hexdigest() for im in d["images"]}
        assert len(digests[split]) == 150  # no scene repeats inside a split either
        digits[split] = {o["digit_index"] for objs in d["objects"] for o in objs if o["digit_index"] >= 0}
        assert digits[split] <= set(digit_indices(split).tolist())
    for a, b in (("train", "val"), ("train", "test"), ("val", "test")):
        assert not digests[a] & digests[b]
        assert not digits[a] & digits[b]
        assert not set(digit_indices(a).tolist()) & set(digit_indices(b).tolist())
    assert sum(len(digit_indices(s)) for s in ("train", "val", "test")) == 1797


def test_targets_describe_the_visible_pixels():
    d = scenes(60, "val", seed=1, size=64, max_objects=5)
    assert d["images"].dtype == np.uint8 and d["images"].shape == (60, 64, 64, 3)
    assert d["masks"].shape == d["instances"].shape == (60, 64, 64)
    assert int(d["masks"].max()) < len(CLASSES)
    overlapped = 0
    for i in range(60):
        inst, mask, objs = d["instances"][i], d["masks"][i], d["objects"][i]
        assert 1 <= len(objs) <= 5 and len(d["boxes"][i]) == len(d["labels"][i]) == len(objs)
        assert np.array_equal(mask == 0, inst == 0)  # background exactly where no object shows
        assert int(inst.max()) == len(objs)
        for k, (box, label, o) in enumerate(zip(d["boxes"][i], d["labels"][i], objs, strict=True)):
            vis = inst == k + 1
            ys, xs = np.nonzero(vis)
            assert box.tolist() == [xs.min(), ys.min(), xs.max() + 1, ys.max() + 1]
            assert set(np.unique(mask[vis]).tolist()) == {int(label)} and label == o["class"]
            assert o["visible"] == vis.sum() >= MIN_VISIBLE * o["area"]
            overlapped += o["visible"] < o["area"]
    assert overlapped > 0  # occlusion happens, and the targets follow it


def test_captions_follow_the_grammar():
    d = scenes(80, "train", seed=2, size=64, max_objects=4)
    for cap, objs in zip(d["captions"], d["objects"], strict=True):
        assert GRAMMAR.match(cap), cap
        assert set(cap.split()) <= set(CAPTION_WORDS)
        phrases = re.findall(PHRASE, cap)
        assert sorted(phrases) == sorted((o["colour"], o["name"]) for o in objs)
        relations = re.findall(r"left of|above|below", cap)
        centres = sorted(((o["box"][0] + o["box"][2]) / 2, (o["box"][1] + o["box"][3]) / 2) for o in objs)
        for rel, (ax, ay), (bx, by) in zip(relations, centres[:-1], centres[1:], strict=True):
            assert bx >= ax
            if rel == "left of":
                assert bx - ax >= abs(by - ay)
            else:
                assert bx - ax < abs(by - ay) and (by > ay) == (rel == "above")


def test_caption_by_hand():
    blue3 = {"name": "3", "colour": "blue", "box": (30, 0, 40, 10)}
    red_circle = {"name": "circle", "colour": "red", "box": (0, 2, 10, 12)}
    white_square = {"name": "square", "colour": "white", "box": (32, 40, 42, 50)}
    assert caption([blue3, red_circle]) == "a red circle left of a blue 3"
    assert caption([white_square, blue3]) == "a blue 3 above a white square"
    assert caption([blue3, {**white_square, "box": (31, -40, 41, -30)}]) == "a blue 3 below a white square"
    assert caption([red_circle]) == "a red circle"


def test_options():
    d = scenes(20, "test", seed=0, size=40, max_objects=2, min_objects=2, digits=False)
    assert all(len(b) == 2 for b in d["boxes"])
    assert all(c >= 11 for labels in d["labels"] for c in labels)  # shapes only
    d = scenes(20, "test", seed=0, size=40, shapes=False)
    assert all(1 <= c <= 10 for labels in d["labels"] for c in labels)
    assert scenes(0, "train")["images"].shape == (0, 64, 64, 3)
    for kwargs, words in (({"split": "validation"}, "split"), ({"max_objects": 0}, "max_objects"),
                          ({"digits": False, "shapes": False}, "no objects")):
        with pytest.raises(DataError, match=words):
            scenes(1, **{"split": "train", **kwargs})


def test_data_for_each_task():
    sets = ["data.dataset=scenes", "data.options.n_train=24", "data.options.n_val=8", "data.options.n_test=8",
            "data.options.size=32", "data.options.max_objects=3"]
    d = load_data(load_config(None, ["task=lm", *sets]).data, "detect")
    tr = d.splits["train"]
    assert tr["pixel_values"].shape == (24, 3, 32, 32) and float(tr["pixel_values"].abs().max()) <= 1.0
    assert tr["boxes"].shape == (24, 3, 4) and tr["labels"].shape == (24, 3)
    raw = scenes(24, "train", 0, size=32, max_objects=3)
    for i in range(24):
        k = len(raw["labels"][i])
        assert tr["labels"][i, :k].tolist() == raw["labels"][i].tolist() and (tr["labels"][i, k:] == IGNORE).all()
        assert torch.equal(tr["boxes"][i, :k], torch.from_numpy(raw["boxes"][i]))
    assert d.info["num_labels"] == 14 and d.labels == CLASSES and d.size("val") == d.size("test") == 8
    seg = load_data(load_config(None, ["task=lm", *sets]).data, "segment").splits["val"]["labels"]
    assert torch.equal(seg, torch.from_numpy(scenes(8, "val", 0, size=32, max_objects=3)["masks"]).long())
    cap = load_data(load_config(None, ["task=lm", *sets]).data, "caption")
    lab = cap.splits["test"]["labels"]
    assert lab.shape[1] == cap.splits["train"]["labels"].shape[1]
    first = lab[0][lab[0] != IGNORE].tolist()
    assert first[-1] == cap.tokenizer.eos_id
    assert cap.tokenizer.decode(first[:-1]) == scenes(1, "test", 0, size=32, max_objects=3)["captions"][0]
    with pytest.raises(DataError, match="serves the tasks"):
        load_data(load_config(None, ["task=lm", *sets]).data, "image")
