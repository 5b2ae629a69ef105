"""The loop's pieces: schedule, accumulation equivalence, early stopping, seeded repeatability, fresh samples."""

import math

import pytest
import torch
from safetensors.torch import load_file

from qkv.train import load_config, lr_at
from train_helpers import run, story_text


def test_warmup_then_cosine():
    cfg = load_config(None, ["task=image", "data.dataset=digits", "train.steps=100", "train.warmup=10",
                             "train.lr=1.0", "train.min_lr=0.1"])
    lrs = [lr_at(s, cfg) for s in range(100)]
    assert lrs[0] == pytest.approx(0.1) and lrs[9] == pytest.approx(1.0)
    assert all(a <= b for a, b in zip(lrs[:10], lrs[1:10]))
    assert all(a >= b for a, b in zip(lrs[10:], lrs[11:]))
    assert lrs[-1] == pytest.approx(0.1, abs=1e-3)
    assert lr_at(55, cfg) == pytest.approx(0.1 + 0.45 * (1 + math.cos(math.pi * 45 / 90)))


def _lm(tmp_path, name, *sets):
    path = tmp_path / "stories.txt"
    path.write_text(story_text())
    result, _ = run(tmp_path / name, "task=lm", f"data.path={path}", "data.block_size=16", "train.steps=8",
                    "model.dropout=0.0", *sets)
    return load_file(str(result.out / "model.safetensors"))


def test_accumulation_equals_the_whole_batch(tmp_path):
    whole = _lm(tmp_path, "whole", "train.batch_size=8")
    parts = _lm(tmp_path, "parts", "train.batch_size=4", "train.accumulate=2")
    assert max(float((whole[k] - parts[k]).abs().max()) for k in whole) < 1e-5


def test_same_seed_same_weights_other_seed_other_weights(tmp_path):
    a = _lm(tmp_path, "a", "train.batch_size=4", "seed=3")
    b = _lm(tmp_path, "b", "train.batch_size=4", "seed=3")
    c = _lm(tmp_path, "c", "train.batch_size=4", "seed=4")
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert not all(torch.equal(a[k], c[k]) for k in a)


def test_early_stopping(tmp_path, monkeypatch):
    import qkv.train.loop as loop

    monkeypatch.setattr(loop, "evaluate", lambda *a, **k: {"loss": 1.0, "accuracy": 0.5})  # never improves
    result, _ = run(tmp_path, "task=image", "data.dataset=digits", "model.patch_size=[4, 4]", "train.steps=100",
                    "train.eval_every=5", "train.early_stop=2")
    assert result.stopped_early and result.step == 15  # best at 5, no better at 10 and 15
    assert (result.out / "checkpoints" / "latest").read_text().strip() == "step_00000015"


def test_mqar_trains_on_fresh_sequences():
    from qkv.data import load_data

    cfg = load_config(None, ["task=mqar", "data.dataset=mqar", "data.options.n=100", "data.options.seq_len=32",
                             "data.options.pairs=4", "data.options.vocab_size=64"])
    data = load_data(cfg.data, cfg.task)
    g1, g2 = torch.Generator().manual_seed(0), torch.Generator().manual_seed(0)
    a, b, c = data.sample("train", 8, g1), data.sample("train", 8, g2), data.sample("train", 8, g1)
    assert torch.equal(a["input_ids"], b["input_ids"])  # repeatable
    assert not torch.equal(a["input_ids"], c["input_ids"])  # but new every batch
    assert a["input_ids"].shape == (8, 32)
    held_out = {tuple(r.tolist()) for s in ("val", "test") for r in data.splits[s]["input_ids"]}
    assert not held_out & {tuple(r.tolist()) for r in a["input_ids"]}
