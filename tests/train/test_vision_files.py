"""qkv.data.vision_files: COCO detection JSON, image + mask folders and caption JSONL round trip; bad files are
refused naming the file and the entry or line."""

import json

import numpy as np
import pytest
from PIL import Image

from qkv.data import IGNORE, DataError
from qkv.data.scenes import scenes
from qkv.data.vision_files import caption_jsonl, coco_detection, files_data, mask_folder
from qkv.train import load_config

CATEGORY_IDS = [7] + list(range(20, 32))  # COCO ids need not be contiguous: class k is CATEGORY_IDS[k - 1]


def _write_coco(root, n=4, size=32):
    d = scenes(n, "train", seed=5, size=size, max_objects=3)
    (root / "img").mkdir(parents=True)
    images, anns = [], []
    for i in range(n):
        Image.fromarray(d["images"][i]).save(root / "img" / f"{i}.png")
        images.append({"id": 100 + i, "file_name": f"img/{i}.png", "width": size, "height": size})
        for (x0, y0, x1, y1), c in zip(d["boxes"][i].tolist(), d["labels"][i].tolist(), strict=True):
            anns.append({"id": len(anns) + 1, "image_id": 100 + i, "category_id": CATEGORY_IDS[c - 1],
                         "bbox": [x0, y0, x1 - x0, y1 - y0], "iscrowd": 0})
    cats = [{"id": c, "name": d["classes"][k + 1]} for k, c in enumerate(CATEGORY_IDS)]
    doc = {"images": images, "annotations": anns, "categories": cats}
    (root / "ann.json").write_text(json.dumps(doc, indent=1))
    return d, doc


def _write_masks(root, n=4, size=32):
    d = scenes(n, "val", seed=6, size=size, max_objects=3)
    (root / "images").mkdir(parents=True)
    (root / "masks").mkdir()
    for i in range(n):
        Image.fromarray(d["images"][i]).save(root / "images" / f"s{i}.png")
        Image.fromarray(d["masks"][i], mode="L").save(root / "masks" / f"s{i}.png")
    (root / "classes.txt").write_text("\n".join(d["classes"]) + "\n")
    return d


def _write_captions(root, n=4, size=32):
    d = scenes(n, "test", seed=7, size=size, max_objects=3)
    (root / "pics").mkdir(parents=True)
    lines = []
    for i in range(n):
        Image.fromarray(d["images"][i]).save(root / "pics" / f"{i}.png")
        lines.append(json.dumps({"image": f"pics/{i}.png", "caption": d["captions"][i]}))
    (root / "caps.jsonl").write_text("\n".join(lines) + "\n")
    return d


def test_coco_round_trip(tmp_path):
    d, _ = _write_coco(tmp_path)
    got = coco_detection(tmp_path / "ann.json", image_size=None)
    assert np.array_equal(got["images"], d["images"])
    assert got["classes"] == d["classes"] and got["category_ids"] == CATEGORY_IDS
    for a, b in zip(got["boxes"], d["boxes"], strict=True):
        assert np.array_equal(a, b)
    for a, b in zip(got["labels"], d["labels"], strict=True):
        assert np.array_equal(a, b)
    assert got["masks"] is None and got["captions"] is None
    half = coco_detection(tmp_path / "ann.json", image_size=16)  # resized: boxes scale with the image
    assert half["images"].shape == (4, 16, 16, 3)
    for a, b in zip(half["boxes"], d["boxes"], strict=True):
        assert np.allclose(a, b / 2)


def test_masks_round_trip(tmp_path):
    d = _write_masks(tmp_path)
    got = mask_folder(tmp_path, image_size=None)
    assert np.array_equal(got["images"], d["images"]) and np.array_equal(got["masks"], d["masks"])
    assert got["classes"] == d["classes"] and got["boxes"] is None
    small = mask_folder(tmp_path, image_size=16)
    assert np.array_equal(small["masks"], d["masks"][:, 1::2, 1::2])  # nearest: the pixel under each centre
    (tmp_path / "classes.txt").unlink()
    assert mask_folder(tmp_path, None)["classes"][0] == "background"


def test_captions_round_trip(tmp_path):
    d = _write_captions(tmp_path)
    got = caption_jsonl(tmp_path / "caps.jsonl", image_size=None)
    assert np.array_equal(got["images"], d["images"]) and got["captions"] == d["captions"]


def test_files_data_for_each_task(tmp_path):
    _write_coco(tmp_path / "det")
    _write_masks(tmp_path / "seg")
    _write_captions(tmp_path / "cap")
    for task, path in (("detect", "det/ann.json"), ("segment", "seg"), ("caption", "cap/caps.jsonl")):
        cfg = load_config(None, ["task=lm", f"data.path={tmp_path / path}", "data.val_fraction=0.25",
                                 "data.test_fraction=0.25"]).data
        data = files_data(cfg, task, image_size=32)
        assert [data.size(s) for s in ("train", "val", "test")] == [2, 1, 1]
        widths = {data.splits[s]["labels"].shape[1:] for s in data.splits}
        assert len(widths) == 1  # every split one width
        assert data.splits["train"]["pixel_values"].shape[1:] == (3, 32, 32)
        if task == "detect":
            assert (data.splits["train"]["labels"] != IGNORE).any()


def _set(where, key, value):
    def mutate(doc, root):
        part, i = where
        doc[part][i][key] = value
    return mutate


COCO_BAD = [
    (_set(("images", 1), "file_name", "img/missing.png"), ["ann.json", "images[1]", "not found"]),
    (_set(("images", 0), "file_name", "../outside.png"), ["ann.json", "images[0]", "leaves the data folder"]),
    (_set(("images", 0), "file_name", "/etc/hostname"), ["ann.json", "images[0]", "leaves the data folder"]),
    (_set(("images", 2), "id", 100), ["ann.json", "images[2]", "repeats id 100"]),
    (_set(("annotations", 2), "bbox", [1, 2, -3, 4]), ["ann.json", "annotations[2] (id 3)", "width or height"]),
    (_set(("annotations", 0), "bbox", [1, 2, 3]), ["ann.json", "annotations[0]", "4 finite numbers"]),
    (_set(("annotations", 1), "bbox", [20, 20, 40, 5]), ["ann.json", "annotations[1]", "outside the 32x32"]),
    (_set(("annotations", 1), "category_id", 99), ["ann.json", "annotations[1]", "category_id 99"]),
    (_set(("annotations", 3), "image_id", 5), ["ann.json", "annotations[3]", "image_id 5"]),
]


@pytest.mark.parametrize("mutate, words", COCO_BAD)
def test_bad_coco_is_refused(tmp_path, mutate, words):
    _, doc = _write_coco(tmp_path)
    mutate(doc, tmp_path)
    (tmp_path / "ann.json").write_text(json.dumps(doc, indent=1))
    with pytest.raises(DataError) as e:
        coco_detection(tmp_path / "ann.json")
    for w in words:
        assert w in str(e.value)


@pytest.mark.parametrize("text, words", [
    ('{"images": [\n  {"id": 1, "file_name": "img/0.png"},\n  oops\n]}', ["ann.json:3", "not valid JSON"]),
    ('{"images": [], "annotations": [], "categories": []}', ["ann.json", "'images' is empty"]),
    ('{"images": [{"id": 1}], "annotations": [], "categories": []}', ["ann.json", "images[0]", "'file_name'"]),
    ('[1, 2]', ["ann.json", "JSON object"]),
])
def test_malformed_coco_is_refused(tmp_path, text, words):
    (tmp_path / "ann.json").write_text(text)
    with pytest.raises(DataError) as e:
        coco_detection(tmp_path / "ann.json")
    for w in words:
        assert w in str(e.value)


def _mask_size(root):
    Image.new("L", (31, 32)).save(root / "masks" / "s1.png")


def _no_mask(root):
    (root / "masks" / "s2.png").unlink()


def _rgb_mask(root):
    Image.new("RGB", (32, 32)).save(root / "masks" / "s0.png")


def _unknown_class(root):
    Image.new("L", (32, 32), 14).save(root / "masks" / "s3.png")


def _orphan_mask(root):
    Image.new("L", (32, 32)).save(root / "masks" / "extra.png")


def _broken_image(root):
    (root / "images" / "s1.png").write_bytes(b"not a png")


@pytest.mark.parametrize("mutate, words", [
    (_mask_size, ["s1.png", "31x32", "32x32"]),
    (_no_mask, ["s2.png", "no mask"]),
    (_rgb_mask, ["s0.png", "mode RGB"]),
    (_unknown_class, ["s3.png", "class id 14", "14 classes"]),
    (_orphan_mask, ["extra.png", "no image"]),
    (_broken_image, ["s1.png", "not a readable image"]),
])
def test_bad_masks_are_refused(tmp_path, mutate, words):
    _write_masks(tmp_path)
    mutate(tmp_path)
    with pytest.raises(DataError) as e:
        mask_folder(tmp_path)
    for w in words:
        assert w in str(e.value)


@pytest.mark.parametrize("line_no, line, words", [
    (3, '{"image": "pics/2.png", "caption": "a red 3"', ["caps.jsonl:3", "not valid JSON"]),
    (2, '{"image": "pics/nothere.png", "caption": "a red 3"}', ["caps.jsonl:2", "not found"]),
    (1, '{"image": "../../x.png", "caption": "a red 3"}', ["caps.jsonl:1", "leaves the data folder"]),
    (4, '{"image": "pics/1.png"}', ["caps.jsonl:4", "'caption'"]),
    (2, '{"image": "pics/1.png", "caption": "  "}', ["caps.jsonl:2", "non-empty string"]),
    (3, '["pics/1.png", "a red 3"]', ["caps.jsonl:3", "expected an object"]),
    (1, '{"image": 3, "caption": "a red 3"}', ["caps.jsonl:1", "non-empty string"]),
])
def test_bad_captions_are_refused(tmp_path, line_no, line, words):
    _write_captions(tmp_path)
    lines = (tmp_path / "caps.jsonl").read_text().splitlines()
    lines[line_no - 1] = line
    (tmp_path / "caps.jsonl").write_text("\n".join(lines) + "\n")
    with pytest.raises(DataError) as e:
        caption_jsonl(tmp_path / "caps.jsonl")
    for w in words:
        assert w in str(e.value)


def test_image_sizes_must_agree_without_resizing(tmp_path):
    _write_captions(tmp_path)
    Image.new("RGB", (20, 32)).save(tmp_path / "pics" / "2.png")
    with pytest.raises(DataError, match="2.png.*image_size"):
        caption_jsonl(tmp_path / "caps.jsonl", image_size=None)
    assert caption_jsonl(tmp_path / "caps.jsonl", image_size=24)["images"].shape == (4, 24, 24, 3)
