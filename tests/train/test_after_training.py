"""A trained output folder works with qkv.load, `qkv evaluate`, `qkv generate` and `qkv classify`."""

import json

import pytest
import torch

import qkv
from qkv.cli import main
from train_helpers import run, story_text, tone_folder


def cli_json(capsys, *argv):
    capsys.readouterr()
    assert main(list(argv)) == 0
    return json.loads(capsys.readouterr().out)


def test_language_model_after_training(tmp_path, capsys):
    path = tmp_path / "stories.txt"
    path.write_text(story_text())
    result, _ = run(tmp_path, "task=lm", f"data.path={path}", "data.block_size=32", "train.steps=500",
                    "train.batch_size=16", "train.lr=3e-3", "model.dim=64")
    out = str(result.out)
    assert (result.out / "curves.png").stat().st_size > 1000
    ev = cli_json(capsys, "evaluate", out, "--split", "val", "--json")
    assert ev["val"]["loss"] == pytest.approx(result.metrics["loss"], rel=1e-5)
    model = qkv.load(out)
    assert type(model).__name__ == "CausalLM" and model.tokenizer is not None
    text = model.generate("the cat sat on", max_new_tokens=12)
    gen = cli_json(capsys, "generate", "--model", out, "--max-new-tokens", "12", "--json", "the cat sat on")
    assert gen[0]["completion"] == text
    assert any(w in text for w in ("the mat.", "a tree.", "the river.", "the moon.", "a red house.")), text


def test_classifiers_after_training(tmp_path, capsys):
    tone_folder(tmp_path / "tones")
    result, _ = run(tmp_path, "task=audio", f"data.path={tmp_path / 'tones'}", "data.options.seconds=0.5",
                    "data.options.n_mels=16", "model.patch_size=[4, 10]", "train.steps=200", "train.batch_size=16",
                    "train.lr=3e-3", "data.val_fraction=0.25", "data.test_fraction=0.25")
    ev = cli_json(capsys, "evaluate", str(result.out), "--json")
    assert ev["test"]["accuracy"] == pytest.approx(result.test["accuracy"])
    clips = [str(tmp_path / "tones" / name / "0.wav") for name in ("low", "mid", "high")]
    rows = cli_json(capsys, "classify", "--model", str(result.out), "--json", *clips)
    assert [r["label"] for r in rows] == ["low", "mid", "high"]
    # a checkpoint folder evaluates too (its weights, the run's config)
    ck = sorted((result.out / "checkpoints").glob("step_*"))[-1]
    ev2 = cli_json(capsys, "evaluate", str(ck), "--json")
    assert ev2["test"] == ev["test"]


def test_digits_classify_png(tmp_path, capsys):
    from PIL import Image
    from sklearn.datasets import load_digits

    result, _ = run(tmp_path, "task=image", "data.dataset=digits", "model.patch_size=[4, 4]", "train.steps=200",
                    "train.batch_size=32", "train.lr=3e-3", "model.dim=48")
    d = load_digits()
    paths = []
    for i in range(20):
        p = tmp_path / f"d{i}.png"
        Image.fromarray((d.images[-i - 1] * 255 / 16).astype("uint8"), mode="L").save(p)
        paths.append(str(p))
    model = qkv.load(result.out)
    got = [r["label"] for r in model.classify(paths)]
    right = sum(g == str(t) for g, t in zip(got, d.target[::-1][:20]))
    assert right >= 14, (got, d.target[::-1][:20])
    x = model.preprocess(paths[:1])
    assert x.shape == (1, 1, 8, 8) and torch.isfinite(x).all()


def test_explain_image_refuses_models_without_a_class_token(tmp_path):
    from qkv.explain import explain_image
    from qkv.models import ViTConfig, VisionTransformer

    model = VisionTransformer(ViTConfig(image_size=8, patch_size=2, channels=1, dim=16, n_layers=1, n_heads=2,
                                        ffn_dim=32, pool="mean", num_labels=2))
    with pytest.raises(ValueError, match="pool='mean'"):
        explain_image(model, tmp_path / "x.png")
