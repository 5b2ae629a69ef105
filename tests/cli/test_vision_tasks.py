"""`qkv detect`, `qkv segment`, `qkv caption`: JSON that matches the models' own results, drawn PNGs, outputs
for several images, and bad input refused naming the argument (exit 2)."""

import json
import shutil
import tempfile
from pathlib import Path

import numpy as np
import pytest
import vision_task_helpers as H
from PIL import Image

import qkv
from qkv.cli import main


@pytest.fixture(scope="module")
def f():
    root = Path(tempfile.mkdtemp(prefix="qkv-vision-cli-"))
    try:
        yield H.build(root) | {"root": root}
    finally:
        shutil.rmtree(root, ignore_errors=True)


def run(capsys, *argv) -> tuple[int, dict | str]:
    code = main([str(a) for a in argv])
    out = capsys.readouterr()
    if "--json" in argv:
        return code, json.loads(out.out)
    return code, out.out + out.err


def _sane_png(path: Path, width: int | None = None) -> None:
    assert path.is_file() and path.stat().st_size > 1000
    with Image.open(path) as im:
        assert im.format == "PNG" and 200 <= im.width <= 4000 and 100 <= im.height <= 4000
        if width is not None:
            assert im.width == width


def test_detect_json_boxes_inside_the_image_and_equal_the_models(f, capsys):
    code, body = run(capsys, "detect", f["a"], f["b"], "--model", f["yolos"], "--threshold", "0", "--json")
    assert code == 0 and body["command"] == "detect" and body["threshold"] == 0.0
    model = qkv.load(f["yolos"])
    outside = 0
    for row, name in zip(body["images"], ("a", "b")):
        with Image.open(f[name]) as im:
            assert (row["path"], row["width"], row["height"]) == (str(f[name]), im.width, im.height)
            want = model.detect(im, threshold=0.0)
        assert len(row["detections"]) == len(want) == model.config.num_detection_tokens
        for got, ref in zip(row["detections"], want):
            assert (got["label"], got["label_id"]) == (ref["label"], ref["label_id"])
            assert got["score"] == pytest.approx(ref["score"], abs=1e-6)
            x0, y0, x1, y1 = got["box"]
            assert 0 <= x0 <= x1 <= row["width"] and 0 <= y0 <= y1 <= row["height"]
            outside += any(v < 0 for v in ref["box"]) or ref["box"][2] > row["width"] or ref["box"][3] > row["height"]
            clamped = [min(max(v, 0), s) for v, s in zip(ref["box"], [row["width"], row["height"]] * 2)]
            assert got["box"] == pytest.approx(clamped, abs=1e-4)
    assert outside, "no raw box left the image: the clamping went untested"


def test_detect_threshold_filters_and_text_output(f, capsys):
    code, body = run(capsys, "detect", f["a"], "--model", f["yolos"], "--threshold", "0.55", "--json")
    scores = [d["score"] for d in body["images"][0]["detections"]]
    assert code == 0 and all(s > 0.55 for s in scores)
    assert 0 < len(scores) < 5
    code, text = run(capsys, "detect", f["a"], "--model", f["yolos"], "--threshold", "0.55")
    assert code == 0 and text.startswith(str(f["a"]))


def _expand(mask: dict) -> np.ndarray:
    ids, lengths = zip(*mask["runs"]) if mask["runs"] else ((), ())
    return np.repeat(np.array(ids, dtype=np.int64), lengths).reshape(mask["shape"])


def test_segment_json_mask_has_the_image_size_and_equals_the_models(f, capsys):
    code, body = run(capsys, "segment", f["a"], f["b"], "--model", f["segformer"], "--json")
    assert code == 0
    model = qkv.load(f["segformer"])
    for row, name in zip(body["images"], ("a", "b")):
        with Image.open(f[name]) as im:
            size = (im.height, im.width)
            want = model.segment(im).numpy()
        mask = row["mask"]
        assert mask["encoding"] == "runs" and mask["order"] == "row-major" and tuple(mask["shape"]) == size
        assert sum(n for _, n in mask["runs"]) == size[0] * size[1]
        assert all(a[0] != b[0] for a, b in zip(mask["runs"], mask["runs"][1:]))  # runs are maximal
        np.testing.assert_array_equal(_expand(mask), want)
        assert row["labels"] == ["sky", H.CRAFTED, "road"]
        ids, counts = np.unique(want, return_counts=True)
        assert [(c["label_id"], c["pixels"]) for c in row["classes"]] == list(zip(ids.tolist(), counts.tolist()))
        assert [c["label"] for c in row["classes"]] == [row["labels"][k] for k in ids]


def test_caption_json_tokens_equal_generate(f, capsys):
    code, body = run(capsys, "caption", f["a"], f["b"], "--model", f["captioner"], "--max-tokens", "6",
                     "--num-beams", "2", "--json")
    assert code == 0 and body["max_new_tokens"] == 6 and body["num_beams"] == 2
    model = qkv.load(f["captioner"])
    for row, name in zip(body["images"], ("a", "b")):
        ids = model.generate(model.preprocess([str(f[name])]), max_new_tokens=6, num_beams=2)[0].tolist()
        assert ids[0] == model.config.start_token_id
        new = ids[1:]
        new = new[: new.index(2)] if 2 in new else new  # up to the first stop token (</s>)
        assert row["token_ids"] == new and len(new) > 0
        assert row["caption"] == model.caption(str(f[name]), max_new_tokens=6, num_beams=2)
        assert row["tokens"] == model.tokenizer.token_texts(new)


def test_caption_sampling_is_seeded(f, capsys):
    argv = ["caption", f["a"], "--model", f["captioner"], "--max-new-tokens", "8", "--temperature", "1.5", "--json"]
    first = run(capsys, *argv, "--seed", "3")[1]["images"][0]["token_ids"]
    assert run(capsys, *argv, "--seed", "3")[1]["images"][0]["token_ids"] == first
    greedy = run(capsys, "caption", f["a"], "--model", f["captioner"], "--max-new-tokens", "8", "--json")[1]
    assert any(run(capsys, *argv, "--seed", str(s))[1]["images"][0]["token_ids"] != greedy["images"][0]["token_ids"]
               for s in range(4))


@pytest.mark.parametrize("command,model", [("detect", "yolos"), ("segment", "segformer"), ("caption", "captioner")])
def test_png_outputs_one_image_pattern_and_folder(f, capsys, command, model):
    out = f["root"] / f"png-{command}"
    out.mkdir()
    command = [command, "--max-tokens", "5"] if command == "caption" else [command]
    code, body = run(capsys, *command, f["a"], "--model", f[model], "--png", out / "one.png", "--json")
    assert code == 0 and body["outputs"]["png"] == [str(out / "one.png")]
    _sane_png(out / "one.png", width=800)
    code, body = run(capsys, *command, f["a"], f["b"], "--model", f[model], "--png", out / "{index}-{stem}.png",
                     "--json")
    assert code == 0 and body["outputs"]["png"] == [str(out / "0-a.png"), str(out / "1-b.png")]
    for p in body["outputs"]["png"]:
        _sane_png(Path(p), width=800)
    code, text = run(capsys, *command, f["a"], f["b"], "--model", f[model], "--png", out)
    assert code == 0 and f"wrote png: {out / 'b.png'}" in text
    _sane_png(out / "a.png")


def test_explain_outputs_png_and_html(f, capsys):
    out = f["root"] / "explain-cli"
    out.mkdir()
    for command, model in (("detect", "yolos"), ("segment", "segformer"), ("caption", "captioner")):
        code, body = run(capsys, command, f["a"], f["b"], "--model", f[model], "--explain", out / f"{command}-{{stem}}"
                         ".html", "--json", *(["--max-tokens", "4"] if command == "caption" else []))
        assert code == 0 and len(body["outputs"]["explain"]) == 2
        page = Path(body["outputs"]["explain"][0]).read_text()
        assert page.startswith("<!DOCTYPE html>") and H.CRAFTED not in page and "https://" not in page
        code, _ = run(capsys, command, f["a"], "--model", f[model], "--explain", out / f"{command}.png")
        assert code == 0
        _sane_png(out / f"{command}.png")
    # the explanation's pass gives the same results as the plain command
    plain = run(capsys, "detect", f["a"], "--model", f["yolos"], "--threshold", "0.3", "--json")[1]
    both = run(capsys, "detect", f["a"], "--model", f["yolos"], "--threshold", "0.3", "--explain", out / "d.html",
               "--json")[1]
    for p, b in zip(plain["images"][0]["detections"], both["images"][0]["detections"]):
        assert (p["label"], p["label_id"]) == (b["label"], b["label_id"])
        assert p["score"] == pytest.approx(b["score"], abs=1e-5) and p["box"] == pytest.approx(b["box"], abs=1e-3)
    assert H.CRAFTED in {d["label"] for d in plain["images"][0]["detections"]}  # the page had it to escape


BAD = [
    (["detect", "{root}/missing.png", "--model", "{yolos}"], "IMAGE"),
    (["segment", "{root}", "--model", "{segformer}"], "IMAGE"),
    (["detect", "{a}", "--model", "{segformer}"], "--model"),
    (["segment", "{a}", "--model", "{captioner}"], "--model"),
    (["caption", "{a}", "--model", "{yolos}"], "--model"),
    (["detect", "{a}", "--model", "{root}/no-model"], "no-model"),
    (["detect", "{a}", "{b}", "--model", "{yolos}", "--png", "{root}/x.png"], "--png"),
    (["detect", "{a}", "--model", "{yolos}", "--png", "{root}/nowhere/x.png"], "--png"),
    (["detect", "{a}", "--model", "{yolos}", "--png", "{root}/x.jpg"], "--png"),
    (["segment", "{a}", "--model", "{segformer}", "--explain", "{root}/x.svg"], "--explain"),
    (["segment", "{a}", "--model", "{segformer}", "--explain", "{root}/{{name}}.png"], "--explain"),
    (["detect", "{a}", "--model", "{yolos}", "--png", "{root}/x.png", "--explain", "{root}/x.png"], "--explain"),
    (["segment", "{a}", "--model", "{segformer}", "--explain", "{root}/s.png", "--block", "99"], "block=99"),
    (["detect", "{a}", "--model", "{yolos}", "--threshold", "1.5"], "--threshold"),
    (["caption", "{a}", "--model", "{captioner}", "--num-beams", "2", "--sample"], "--num-beams"),
    (["caption", "{a}", "--model", "{captioner}", "--max-tokens", "0"], "--max-new-tokens"),
    (["detect", "--model", "{yolos}"], "IMAGE"),
]


@pytest.mark.parametrize("argv,named", BAD, ids=lambda a: " ".join(a) if isinstance(a, list) else a)
def test_bad_input_is_refused_naming_the_argument(f, capsys, argv, named):
    argv = [a.format(**{k: str(v) for k, v in f.items()}) for a in argv]
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert named in err and "Traceback" not in err, err
    assert main(argv + ["--json"]) == 2
    body = json.loads(capsys.readouterr().out)
    assert named in body["error"]["message"]
    assert not (f["root"] / "x.png").exists()  # refused before any work


def test_an_image_file_that_is_not_an_image_is_refused(f, capsys):
    bad = f["root"] / "not-an-image.png"
    bad.write_bytes(b"plain text")
    code, body = run(capsys, "detect", bad, "--model", f["yolos"], "--json")
    assert code == 2 and "not-an-image.png" in body["error"]["message"]


def test_results_do_not_depend_on_the_other_images(f, capsys):
    alone = run(capsys, "segment", f["b"], "--model", f["segformer"], "--json")[1]["images"][0]
    both = run(capsys, "segment", f["a"], f["b"], "--model", f["segformer"], "--json")[1]["images"][1]
    assert alone == both
    cap = ["caption", "--model", f["captioner"], "--max-tokens", "8", "--json"]
    assert run(capsys, *cap, f["b"])[1]["images"][0] == run(capsys, *cap, f["a"], f["b"])[1]["images"][1]
