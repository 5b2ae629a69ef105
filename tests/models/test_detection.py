"""YOLOS object detection: the same logits, boxes, attentions, losses and detections as transformers'
YolosForObjectDetection (and YolosImageProcessor) on the same weights."""

import json
import tempfile
from pathlib import Path

import numpy as np
import pytest
import torch

transformers = pytest.importorskip("transformers", reason="parity tests need transformers: pip install -e '.[test]'")
pytest.importorskip("scipy", reason="the set loss needs scipy: pip install scipy")

import qkv  # noqa: E402
from qkv.convert import ConversionError  # noqa: E402
from qkv.models import ObjectDetector, YolosConfig  # noqa: E402

T = transformers
TINY = dict(hidden_size=32, num_hidden_layers=3, num_attention_heads=4, intermediate_size=48, image_size=[32, 48],
            patch_size=8, num_detection_tokens=5, num_labels=4)


@pytest.fixture
def folder():
    with tempfile.TemporaryDirectory(prefix="qkv-yolos-") as d:
        yield Path(d)


def _pair(folder: Path, seed: int = 0, **overrides):
    """A random transformers YOLOS (weights spread wider than its init, so the heads' outputs vary),
    saved in ``folder``, and qkv's model loaded from it."""
    torch.manual_seed(seed)
    hf = T.YolosForObjectDetection(T.YolosConfig(**{**TINY, **overrides}, attn_implementation="eager")).eval()
    with torch.no_grad():
        for p in hf.parameters():
            p.add_(torch.randn_like(p) * 0.1)
    hf.save_pretrained(folder)
    return hf, qkv.load(folder)


CASES = {  # config overrides, input (batch, height, width)
    "mid": (dict(), (2, 32, 48)),
    "mid-interpolated": (dict(), (2, 40, 64)),
    "no-mid-interpolated": (dict(use_mid_position_embeddings=False), (3, 48, 40)),
    "one-layer-odd-size": (dict(num_hidden_layers=1, num_detection_tokens=2), (1, 37, 53)),
    "many-tokens-no-qkv-bias": (dict(num_detection_tokens=12, qkv_bias=False, num_labels=7), (2, 24, 24)),
    "square-config": (dict(image_size=[32, 32], hidden_act="gelu_new", layer_norm_eps=1e-6), (2, 40, 32)),
}


@pytest.mark.parametrize("name", sorted(CASES))
def test_logits_boxes_and_attentions_equal_transformers(folder, name):
    overrides, (B, H, W) = CASES[name]
    hf, model = _pair(folder, **overrides)
    assert isinstance(model, ObjectDetector)
    x = torch.randn(B, 3, H, W, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        ref = hf(pixel_values=x, output_attentions=True)
        out = model(x, return_weights=True)
    Q = hf.config.num_detection_tokens
    assert out.logits.shape == (B, Q, hf.config.num_labels + 1) and out.pred_boxes.shape == (B, Q, 4)
    torch.testing.assert_close(out.logits, ref.logits, rtol=0, atol=1e-4)
    torch.testing.assert_close(out.pred_boxes, ref.pred_boxes, rtol=0, atol=1e-4)
    torch.testing.assert_close(out.last_hidden_state, ref.last_hidden_state, rtol=0, atol=1e-4)
    assert len(out.attentions) == hf.config.num_hidden_layers
    for a, b in zip(out.attentions, ref.attentions):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-5)
    assert float(out.pred_boxes.std()) > 1e-3  # the boxes are not all one value


def _labels(B: int, n_classes: int, seed: int = 2, counts=None):
    g = torch.Generator().manual_seed(seed)
    counts = counts or [int(n) for n in torch.randint(0, 4, (B,), generator=g)]
    out = []
    for n in counts:
        centre = torch.rand(n, 2, generator=g) * 0.6 + 0.2
        size = torch.rand(n, 2, generator=g) * 0.3 + 0.05
        out.append({"class_labels": torch.randint(0, n_classes, (n,), generator=g),
                    "boxes": torch.cat([centre, size], 1)})
    return out


def test_loss_equals_transformers(folder):
    hf, model = _pair(folder)
    x = torch.randn(3, 3, 32, 48, generator=torch.Generator().manual_seed(1))
    labels = _labels(3, 4, counts=[2, 0, 3])
    ref = hf(pixel_values=x, labels=labels)
    out = model(x, labels=labels)
    torch.testing.assert_close(out.loss, ref.loss, rtol=0, atol=1e-4)
    assert set(out.loss_dict) == set(ref.loss_dict)
    for k, v in ref.loss_dict.items():
        torch.testing.assert_close(out.loss_dict[k], v, rtol=0, atol=1e-4)
    out.loss.backward()
    assert model.det.grad is not None and float(model.det.grad.abs().sum()) > 0


def test_auxiliary_loss_equals_transformers_loss_function(folder):
    """transformers' YOLOS cannot run auxiliary_loss=True (it feeds the tuple of hidden states to its heads
    and reads config.decoder_layers); its loss function on the intermediate layers' outputs is the oracle."""
    from transformers.loss.loss_for_object_detection import ForObjectDetectionLoss

    hf, model = _pair(folder, auxiliary_loss=True)
    assert model.config.auxiliary_loss
    x = torch.randn(2, 3, 32, 48, generator=torch.Generator().manual_seed(1))
    labels = _labels(2, 4, counts=[3, 1])
    with torch.no_grad():
        ref = hf(pixel_values=x, output_hidden_states=True)
        out = model(x, labels=labels)
    layers = ref.hidden_states[1:]  # each layer's output (the first entry is the embeddings)
    Q = hf.config.num_detection_tokens
    heads = torch.stack([h[:, -Q:] for h in layers[:-1]] + [ref.last_hidden_state[:, -Q:]])
    with torch.no_grad():
        classes, boxes = hf.class_labels_classifier(heads), hf.bbox_predictor(heads).sigmoid()
    hf.config.decoder_layers = hf.config.num_hidden_layers  # the name the loss function reads
    loss, parts, _ = ForObjectDetectionLoss(ref.logits, labels, "cpu", ref.pred_boxes, hf.config, classes, boxes)
    assert len(out.auxiliary_outputs) == hf.config.num_hidden_layers - 1
    assert set(out.loss_dict) == set(parts) and "loss_giou_1" in parts
    for k, v in parts.items():
        torch.testing.assert_close(out.loss_dict[k], v, rtol=0, atol=1e-4)
    torch.testing.assert_close(out.loss, loss, rtol=0, atol=1e-4)


def test_detect_equals_post_process_object_detection(folder):
    from transformers import YolosImageProcessorPil

    hf, model = _pair(folder, num_labels=3, id2label={0: "cat", 1: "dog", 2: "owl"})
    x = torch.randn(2, 3, 32, 48, generator=torch.Generator().manual_seed(1))
    sizes = [(480, 640), (123, 77)]
    with torch.no_grad():
        ref_out = hf(pixel_values=x)
    scores = ref_out.logits.softmax(-1)[..., :-1].max(-1).values
    threshold = float(scores.median())  # some detections kept, some dropped
    ref = YolosImageProcessorPil().post_process_object_detection(ref_out, threshold=threshold, target_sizes=sizes)
    got = model.detect(x, threshold=threshold, target_sizes=sizes)
    assert len(got) == 2 and sum(len(g) for g in got) > 0
    for r, g in zip(ref, got):
        assert [d["label_id"] for d in g] == r["labels"].tolist()
        assert [d["label"] for d in g] == [["cat", "dog", "owl"][i] for i in r["labels"].tolist()]
        np.testing.assert_allclose([d["score"] for d in g], r["scores"].numpy(), rtol=0, atol=1e-5)
        np.testing.assert_allclose(np.array([d["box"] for d in g]).reshape(-1, 4), r["boxes"].numpy(), rtol=0,
                                   atol=1e-3)
    ref_t = YolosImageProcessorPil().post_process_object_detection(ref_out, threshold=threshold,
                                                                  target_sizes=torch.tensor(sizes))
    assert [len(r["labels"]) for r in ref_t] == [len(g) for g in got]
    with pytest.raises(ValueError, match="target_sizes"):
        model.detect(x, target_sizes=sizes[:1])


def test_detect_images_preprocesses_as_yolos_image_processor(folder):
    from PIL import Image
    from transformers import YolosImageProcessorPil

    proc = YolosImageProcessorPil(size={"shortest_edge": 48, "longest_edge": 80})
    proc.save_pretrained(folder)
    hf, _ = _pair(folder)
    model = qkv.load(folder)
    assert (model.config.shortest_edge, model.config.longest_edge) == (48, 80)
    rng = np.random.default_rng(0)
    images = [Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8)) for h, w in ((50, 70), (90, 30),
                                                                                            (48, 64))]
    for im in images:
        want = proc(im, return_tensors="pt")["pixel_values"]
        got = model.preprocess(im)
        assert got.shape == want.shape
        torch.testing.assert_close(got, want, rtol=0, atol=1e-5)
    found = model.detect(images, threshold=0.0)
    assert len(found) == 3 and all(len(f) == hf.config.num_detection_tokens for f in found)
    with torch.no_grad():
        ref = hf(pixel_values=proc(images[1], return_tensors="pt")["pixel_values"])
    want = proc.post_process_object_detection(ref, threshold=0.0, target_sizes=[(90, 30)])[0]
    np.testing.assert_allclose([d["box"] for d in found[1]], want["boxes"].numpy(), rtol=0, atol=1e-3)
    assert model.detect(images[0], threshold=0.0) == found[0]  # one image gives one list


def test_unknown_and_unsupported_fields_are_refused_by_name(folder):
    _pair(folder)
    cfg = json.loads((folder / "config.json").read_text())
    for field, value, says in [("attention_sink_tokens", 4, "not implemented by qkv's YOLOS"),
                               ("patch_size", [8, 8], "patch_size"),
                               ("num_detection_tokens", 0, "num_detection_tokens"),
                               ("eos_coefficient", -1.0, "eos_coefficient"),
                               ("architectures", ["YolosModel"], "architectures")]:
        (folder / "config.json").write_text(json.dumps({**cfg, field: value}))
        with pytest.raises(ConversionError, match=says):
            qkv.load(folder)
    (folder / "config.json").write_text(json.dumps(cfg))
    (folder / "preprocessor_config.json").write_text(json.dumps({"size": {"height": 32, "width": 48}}))
    with pytest.raises(ConversionError, match="preprocessor_config.json field size"):
        qkv.load(folder)


def test_config_errors_name_the_argument():
    small = dict(dim=32, n_layers=2, n_heads=4, ffn_dim=48, image_size=[32, 48], patch_size=8)
    with pytest.raises(ValueError, match="n_heads=5"):
        YolosConfig(**{**small, "n_heads": 5})
    with pytest.raises(ValueError, match="YolosConfig: image_size"):
        YolosConfig(**{**small, "image_size": [4, 48]})
    with pytest.raises(TypeError, match="num_detection_tokens"):
        YolosConfig(**small, num_detection_tokens=2.5)
    model = ObjectDetector(YolosConfig(**small, num_detection_tokens=3, num_labels=2))
    with pytest.raises(ValueError, match="pixel_values"):
        model(torch.randn(1, 1, 32, 48))
    with pytest.raises(ValueError, match="labels"):
        model(torch.randn(2, 3, 32, 48), labels=[{"class_labels": torch.tensor([0]), "boxes": torch.rand(1, 4)}])
    with pytest.raises(ValueError, match="class_labels"):
        model(torch.randn(1, 3, 32, 48), labels=[{"class_labels": torch.tensor([2]), "boxes": torch.rand(1, 4)}])


def test_saved_by_qkv_loads_back_and_backends_agree(folder):
    from qkv.train.checkpoint import save_pretrained

    _, model = _pair(folder, num_detection_tokens=3)
    x = torch.randn(2, 3, 40, 48, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        want = model(x)
        save_pretrained(model, folder / "native")
        again = qkv.load(folder / "native")
        assert again.config == model.config
        torch.testing.assert_close(again(x).pred_boxes, want.pred_boxes, rtol=0, atol=0)
        for backend in ("eager", "chunked"):
            got = model.set_backend(backend)(x)
            torch.testing.assert_close(got.logits, want.logits, rtol=0, atol=1e-5)


def test_strided_stem_detects_at_any_size_and_survives_save_and_load(tmp_path):
    from qkv.train.checkpoint import save_pretrained

    cfg = YolosConfig(dim=32, n_layers=2, n_heads=4, ffn_dim=48, image_size=[32, 48], patch_size=8, stem="strided",
                      num_detection_tokens=3, num_labels=2)
    torch.manual_seed(0)
    model = ObjectDetector(cfg)
    assert sum(p.numel() for p in model.parameters()) == pytest.approx(cfg.parameter_estimate(), rel=0.01)
    assert any(isinstance(m, torch.nn.BatchNorm2d) for m in model.stem)
    model.train()
    for _ in range(2):  # move the BatchNorm statistics off their defaults, so the round trip must carry them
        model(torch.randn(4, 3, 32, 48))
    model.eval()
    for size in ((32, 48), (40, 64)):  # the stored grid, and one the positions are resized for
        out = model(torch.randn(2, 3, *size))
        assert out.logits.shape == (2, 3, 3) and out.pred_boxes.shape == (2, 3, 4)
        assert out.last_hidden_state.shape[1] == 1 + (size[0] // 8) * (size[1] // 8) + 3
    x = torch.randn(2, 3, 32, 48, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        want = model(x)
        save_pretrained(model, tmp_path / "native")
        again = qkv.load(tmp_path / "native")
        assert again.config == cfg
        torch.testing.assert_close(again(x).pred_boxes, want.pred_boxes, rtol=0, atol=0)
    with pytest.raises(ValueError, match=r"YolosConfig: stem='strided'.*patch_size=6"):
        YolosConfig(dim=32, n_layers=2, n_heads=4, ffn_dim=48, image_size=[36, 48], patch_size=6, stem="strided")
    with pytest.raises(ValueError, match="stem"):
        YolosConfig(dim=32, n_layers=2, n_heads=4, ffn_dim=48, image_size=[32, 48], patch_size=8, stem="pixels")


def test_patch_targets_name_the_smallest_box_holding_each_patch_centre():
    from qkv.models.set_loss import patch_targets

    labels = _labels(4, 5, seed=7, counts=[0, 1, 3, 4])
    rows, cols = 5, 7
    got = patch_targets(labels, (rows, cols), no_object=5)
    assert got.shape == (4, rows * cols)
    for t, row in zip(labels, got):  # brute force: every patch against every box
        for p in range(rows * cols):
            y, x = (p // cols + 0.5) / rows, (p % cols + 0.5) / cols
            best, area = 5, float("inf")
            for (cx, cy, w, h), k in zip(t["boxes"].tolist(), t["class_labels"].tolist()):
                if cx - w / 2 <= x < cx + w / 2 and cy - h / 2 <= y < cy + h / 2 and w * h < area:
                    best, area = k, w * h
            assert int(row[p]) == best


def test_patch_loss_adds_a_dense_term_only_when_asked():
    x = torch.randn(2, 3, 32, 48, generator=torch.Generator().manual_seed(3))
    labels = _labels(2, 3, counts=[2, 1])
    common = dict(dim=32, n_layers=2, n_heads=4, ffn_dim=48, image_size=[32, 48], patch_size=8,
                  num_detection_tokens=3, num_labels=3)
    torch.manual_seed(0)
    plain = ObjectDetector(YolosConfig(**common))
    torch.manual_seed(0)
    dense = ObjectDetector(YolosConfig(**common, patch_loss_coefficient=0.5))
    assert plain.patch_head is None and "loss_patch" not in plain(x, labels=labels).loss_dict
    dense.load_state_dict({**plain.state_dict(), **{f"patch_head.{k}": v for k, v in
                                                    dense.patch_head.state_dict().items()}})
    a, b = plain(x, labels=labels), dense(x, labels=labels)
    torch.testing.assert_close(a.logits, b.logits, rtol=0, atol=0)  # the head changes the loss, not predictions
    torch.testing.assert_close(b.loss, a.loss + 0.5 * b.loss_dict["loss_patch"], rtol=0, atol=1e-6)
    assert float(b.loss_dict["loss_patch"]) > 0
    b.loss.backward()
    assert float(dense.patch_head.weight.grad.abs().sum()) > 0
    cfg = YolosConfig(**common, patch_loss_coefficient=0.5)
    assert sum(p.numel() for p in dense.parameters()) == pytest.approx(cfg.parameter_estimate(), rel=0.01)
    with pytest.raises(ValueError, match="patch_loss_coefficient"):
        YolosConfig(**common, patch_loss_coefficient=-1.0)
