"""Explanations of detections, segment classes and caption tokens: the weights equal a computation by hand from
``forward(return_weights=True)``, rows sum as probabilities do, and the PNG and HTML views show them (the page
never runs a label as code)."""

import shutil
import tempfile
from pathlib import Path

import numpy as np
import pytest
import torch
import vision_task_helpers as H
from PIL import Image

import qkv
from qkv.explain import vision_tasks as V
from qkv.models.vision import _load_image


@pytest.fixture(scope="module")
def f():
    root = Path(tempfile.mkdtemp(prefix="qkv-vision-explain-"))
    try:
        paths = H.build(root)
        models = {k: qkv.load(paths[k]) for k in ("yolos", "segformer", "captioner")}
        yield paths | {"root": root, "models": models, "image": _load_image(paths["a"])}
    finally:
        shutil.rmtree(root, ignore_errors=True)


def test_detections_equal_the_last_layers_head_mean_by_hand(f):
    model, im = f["models"]["yolos"], f["image"]
    ex = V.explain_detections(model, im, threshold=0.0)
    assert len(ex.panels) == model.config.num_detection_tokens
    with torch.no_grad():
        x = model.preprocess(im)
        out = model(x, return_weights=True)
    rows, cols = x.shape[2] // 8, x.shape[3] // 8
    P = rows * cols
    last = out.attentions[-1][0].mean(0)  # (T, T)
    det = model.detect(im, threshold=0.0)
    for j, (p, d) in enumerate(zip(ex.panels, det)):
        row = last[1 + P + j]
        np.testing.assert_allclose(p.weights, row[1:1 + P].reshape(rows, cols).numpy(), rtol=1e-5, atol=1e-6)
        assert p.weights.sum() + p.extra["cls"] + p.extra["det_tokens"] == pytest.approx(1.0, abs=1e-5)
        assert (p.extra["label"], p.extra["token"]) == (d["label"], j)
        assert p.extra["score"] == pytest.approx(d["score"], abs=1e-5)
        x0, y0, x1, y1 = p.box
        assert 0 <= x0 <= x1 <= im.width and 0 <= y0 <= y1 <= im.height
    assert len(V.explain_detections(model, im, threshold=0.55).panels) == sum(d["score"] > 0.55 for d in det)


def test_detection_rollout_rows_are_distributions(f):
    model, im = f["models"]["yolos"], f["image"]
    ex = V.explain_detections(model, im, threshold=0.0, rollout=True)
    plain = V.explain_detections(model, im, threshold=0.0)
    assert ex.view.startswith("rollout")
    for p, q in zip(ex.panels, plain.panels):
        assert p.weights.sum() + p.extra["cls"] + p.extra["det_tokens"] == pytest.approx(1.0, abs=1e-5)
        assert not np.allclose(p.weights, q.weights)


def test_segment_classes_equal_the_mean_of_their_pixels_rows_by_hand(f):
    model, im = f["models"]["segformer"], f["image"]
    for block in (-1, 0):
        ex = V.explain_segments(model, im, block=block)
        with torch.no_grad():
            out = model(model.preprocess([im]), return_weights=True, return_hidden=True)
        classes = model.segment(im).numpy()
        np.testing.assert_array_equal(ex.mask, classes)
        stage = 3 if block == -1 else 0
        b = block % sum(model.config.depths)
        h, w = out.hidden_states[stage].shape[2:]
        A = out.attentions[b][0].mean(0).numpy()  # (h * w, keys)
        assert [p.extra["label_id"] for p in ex.panels] == sorted(np.unique(classes).tolist())
        p = max(ex.panels, key=lambda p: p.extra["pixels"])
        rows = [A[(y * h // im.height) * w + x * w // im.width]
                for y in range(im.height) for x in range(im.width) if classes[y, x] == p.extra["label_id"]]
        np.testing.assert_allclose(p.weights.flatten(), np.mean(rows, axis=0), rtol=1e-4, atol=1e-6)
        assert p.extra["pixels"] == len(rows)
        for p in ex.panels:
            assert p.weights.sum() == pytest.approx(1.0, abs=1e-5)  # every key is a patch
    assert ex.panels[0].weights.shape == (16 // 4, 16 // 4)  # stage 0: 16 x 16 queries, keys reduced by sr=4


def test_segment_block_out_of_range_is_refused(f):
    with pytest.raises(ValueError, match="block=4 is out of range"):
        V.explain_segments(f["models"]["segformer"], f["image"], block=4)
    with pytest.raises(ValueError, match="semantic segmenters"):
        V.explain_segments(f["models"]["yolos"], f["image"])


def test_caption_tokens_cross_attention_by_hand(f):
    model, im = f["models"]["captioner"], f["image"]
    ex = V.explain_caption(model, im, max_new_tokens=6)
    ids = [p.extra["token_id"] for p in ex.panels]
    assert ex.text == model.caption(im, max_new_tokens=6) and len(ids) == 6
    assert [p.title for p in ex.panels] == model.tokenizer.token_texts(ids)
    with torch.no_grad():
        pixels = model.preprocess([im])
        full = model.generate(pixels, max_new_tokens=6)  # (1, 1 + 6): the start token, then the caption
        assert full[0, 1:].tolist() == ids
        out = model(pixels, full[:, :-1], return_weights=True)
    cross = out.cross_attentions[-1][0].mean(0)  # (6, 1 + patches)
    rows, cols = model.config.encoder.grid_shape
    for t, p in enumerate(ex.panels):
        np.testing.assert_allclose(p.weights, cross[t, 1:].reshape(rows, cols).numpy(), rtol=1e-5, atol=1e-6)
        assert p.weights.sum() + p.extra["cls"] == pytest.approx(1.0, abs=1e-5)


def test_png_has_a_panel_per_item_and_a_sane_size(f):
    out = f["root"] / "png"
    out.mkdir()
    for name, fn, kw in (("yolos", V.explain_detections, {"threshold": 0.0}), ("segformer", V.explain_segments, {}),
                         ("captioner", V.explain_caption, {"max_new_tokens": 3})):
        ex = fn(f["models"][name], f["image"], name=name, **kw)
        path = V.png(ex, out / f"{name}.png")
        with Image.open(path) as im:
            assert im.format == "PNG" and 300 <= im.width <= 2000 and 200 <= im.height <= 4000
    empty = V.explain_detections(f["models"]["yolos"], f["image"], threshold=1.0)
    assert empty.panels == [] and empty.notes
    assert V.png(empty, out / "empty.png").stat().st_size > 1000


def test_html_escapes_every_label_and_needs_no_network(f):
    ex = V.explain_detections(f["models"]["yolos"], f["image"], threshold=0.0, name=H.CRAFTED)
    assert H.CRAFTED in {p.title for p in ex.panels}
    page = V.html(ex, f["root"] / "d.html")
    assert H.CRAFTED not in page and "alert(1)" in page  # there, as JSON with < and > escaped
    assert "http://" not in page and "https://" not in page and "cdn" not in page.lower()
    assert page.count("<script") == 2  # the data block and the page's own script, nothing else
    seg = V.html(V.explain_segments(f["models"]["segformer"], f["image"]))
    assert H.CRAFTED not in seg and "\\u003cscript\\u003e" in seg


def test_html_page_in_a_browser_shows_labels_as_text(f):
    from browser import page

    ex = V.explain_detections(f["models"]["yolos"], f["image"], threshold=0.0, name=H.CRAFTED)
    path = f["root"] / "browser.html"
    V.html(ex, path)
    with page() as pg:
        pg.goto(path.as_uri())
        pg.wait_for_selector(".card canvas")
        titles = pg.eval_on_selector_all(".card h2", "els => els.map(e => e.textContent)")
        assert len(titles) == len(ex.panels) and any(t.startswith(H.CRAFTED) for t in titles), pg.browser_version
        assert pg.dialogs == [] and pg.errors == [], (pg.errors, pg.browser_version)
        assert H.CRAFTED in pg.text_content("#title")


def test_explainers_refuse_other_families(f):
    for fn, other in ((V.explain_detections, "segformer"), (V.explain_caption, "yolos")):
        with pytest.raises(ValueError, match=type(f["models"][other]).__name__):
            fn(f["models"][other], f["image"])


def test_clamp_box():
    assert V.clamp_box([-3, 5, 70, 2], 50, 40) == [0.0, 2.0, 50.0, 5.0]
