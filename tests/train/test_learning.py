"""Every task learns: tiny end-to-end runs whose loss falls well below its start and whose
metric ends far above chance. Each trains from scratch on CPU in seconds."""

import importlib.util
import math

import pytest

from train_helpers import run, sentiment_rows, story_text, tone_folder


def test_causal_lm_on_a_text_file(tmp_path):
    path = tmp_path / "stories.txt"
    path.write_text(story_text())
    result, _ = run(tmp_path, "task=lm", f"data.path={path}", "data.block_size=32", "train.steps=150",
                    "train.batch_size=16", "train.lr=3e-3")
    vocab = len(set(path.read_text())) + 6
    assert result.metrics["loss"] < 0.5 * math.log(vocab), result.metrics
    assert result.metrics["perplexity"] == pytest.approx(math.exp(result.metrics["loss"]), rel=1e-5)


def test_bpe_language_model(tmp_path):
    path = tmp_path / "stories.txt"
    path.write_text(story_text())
    result, cfg = run(tmp_path, "task=lm", f"data.path={path}", "data.tokenizer=bpe", "data.vocab_size=300",
                      "data.block_size=16", "train.steps=150", "train.batch_size=16", "train.lr=3e-3")
    assert result.metrics["loss"] < 0.5 * math.log(300), result.metrics


def test_text_classification_from_csv(tmp_path):
    path = tmp_path / "reviews.csv"
    path.write_text("text,label\n" + "".join(f"{t},{l}\n" for t, l in sentiment_rows()))
    result, _ = run(tmp_path, "task=classify", f"data.path={path}", "data.vocab_size=200", "data.max_length=16",
                    "train.steps=120", "train.batch_size=16", "train.lr=3e-3", "model.dropout=0.0")
    assert result.test["accuracy"] >= 0.9, result.test


def test_seq2seq_reversal(tmp_path):
    result, _ = run(tmp_path, "task=seq2seq", "data.dataset=reverse", "data.options.n=2000",
                    "data.options.max_len=5", "data.max_length=12", "train.steps=500", "train.batch_size=32",
                    "train.lr=1e-3", "model.dim=64", "model.ffn_dim=128")
    assert result.metrics["loss"] < 0.2 * math.log(33), result.metrics
    assert result.test["exact_match"] > 0.8, result.test


def test_image_classification_digits(tmp_path):
    result, _ = run(tmp_path, "task=image", "data.dataset=digits", "model.patch_size=[4, 4]", "train.steps=150",
                    "train.batch_size=32", "train.lr=3e-3", "model.dim=48")
    assert result.test["accuracy"] > 0.7, result.test


def test_image_folder(tmp_path):
    from PIL import Image, ImageDraw

    for label, shape in (("circle", "ellipse"), ("square", "rectangle")):
        (tmp_path / "img" / label).mkdir(parents=True)
        for i in range(20):
            im = Image.new("RGB", (24, 24), (0, 0, 0))
            o = i % 6
            getattr(ImageDraw.Draw(im), shape)([3 + o, 3 + o // 2, 14 + o, 14 + o // 2], fill=(255, 255, 255))
            im.save(tmp_path / "img" / label / f"{i}.png")
    result, _ = run(tmp_path, "task=image", f"data.path={tmp_path / 'img'}", "data.options.image_size=16",
                    "model.patch_size=[4, 4]", "train.steps=120", "train.batch_size=16", "train.lr=3e-3",
                    "data.val_fraction=0.2", "data.test_fraction=0.2")
    assert result.metrics["accuracy"] > 0.8, result.metrics


def test_audio_folder(tmp_path):
    tone_folder(tmp_path / "tones")
    result, _ = run(tmp_path, "task=audio", f"data.path={tmp_path / 'tones'}", "data.options.seconds=0.5",
                    "data.options.n_mels=16", "model.patch_size=[4, 10]", "train.steps=200", "train.batch_size=16",
                    "train.lr=3e-3", "data.val_fraction=0.25", "data.test_fraction=0.25")
    assert result.test["accuracy"] >= 0.9, result.test


@pytest.mark.skipif(importlib.util.find_spec("mnist1d") is None, reason="pip install --no-deps mnist1d")
def test_signal_mnist1d(tmp_path):
    result, _ = run(tmp_path, "task=signal", "data.dataset=mnist1d", "model.stem=conv", "model.patch_size=[2]",
                    "model.positions=rotary", "model.pool=mean", "train.steps=150", "train.batch_size=32",
                    "train.lr=3e-3", "model.dim=48")
    assert result.test["accuracy"] > 0.35, result.test  # chance: 0.1


def test_listops(tmp_path):
    result, _ = run(tmp_path, "task=listops", "data.dataset=listops", "data.options.n=1500",
                    "data.options.min_len=8", "data.options.max_len=24", "data.options.max_depth=2",
                    "train.steps=600", "train.batch_size=32", "train.lr=1e-3", "model.dim=64", "model.dropout=0.0")
    # chance is 10%; the most frequent value is 16% of these expressions
    assert result.test["accuracy"] > 0.3, result.test


def test_mqar(tmp_path):
    result, _ = run(tmp_path, "task=mqar", "data.dataset=mqar", "data.options.n=3000", "data.options.seq_len=24",
                    "data.options.pairs=4", "data.options.vocab_size=32", "data.block_size=24", "train.steps=300",
                    "train.batch_size=32", "train.lr=3e-3", "model.dim=64", "model.n_layers=2")
    assert result.metrics["accuracy"] > 0.3, result.metrics  # chance 1/16


def test_bf16_autocast_learns(tmp_path):
    path = tmp_path / "stories.txt"
    path.write_text(story_text())
    result, _ = run(tmp_path, "task=lm", f"data.path={path}", "data.block_size=32", "train.steps=150",
                    "train.batch_size=16", "train.lr=3e-3", "train.bf16=true")
    assert result.metrics["loss"] < 0.5 * math.log(len(set(path.read_text())) + 6), result.metrics
