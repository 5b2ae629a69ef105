"""Small runs of `qkv.train.fit` for the training tests."""

from __future__ import annotations

import math
import random

import numpy as np

from qkv.train import fit, load_config

TINY = ["model.dim=32", "model.n_layers=1", "model.n_heads=2", "model.ffn_dim=64", "train.warmup=10",
        "train.eval_every=1000", "train.save_every=1000", "train.log_every=1000"]


def run(tmp_path, *overrides, resume=False, max_steps=None):
    steps = [int(o.split("=", 1)[1]) for o in overrides if o.startswith("train.steps=")]
    tiny = [f"train.warmup={min(10, steps[-1])}" if o == "train.warmup=10" and steps else o for o in TINY]
    cfg = load_config(None, [f"out={tmp_path / 'run'}", *tiny, *overrides])
    return fit(cfg, resume=resume, progress=False, max_steps=max_steps), cfg


def story_text(n_lines: int = 400, seed: int = 0) -> str:
    """Text with structure a small model learns fast: templated sentences."""
    rng = random.Random(seed)
    who = ["the cat", "a dog", "the old man", "my sister", "the bird"]
    did = ["sat on", "looked at", "ran past", "jumped over", "sang to"]
    what = ["the mat.", "a tree.", "the river.", "the moon.", "a red house."]
    return "\n".join(f"{rng.choice(who)} {rng.choice(did)} {rng.choice(what)}" for _ in range(n_lines)) + "\n"


def sentiment_rows(n: int = 300, seed: int = 0) -> list[tuple[str, str]]:
    rng = random.Random(seed)
    filler = "we went to see it on a rainy day with friends and then had dinner after".split()
    rows = []
    for _ in range(n):
        label = rng.choice(["pos", "neg"])
        words = rng.sample(filler, 6) + [rng.choice(["great", "wonderful", "lovely"] if label == "pos"
                                                     else ["awful", "boring", "terrible"])]
        rng.shuffle(words)
        rows.append((" ".join(words), label))
    return rows


def tone_folder(root, per_class: int = 16, seconds: float = 0.5, seed: int = 0):
    """WAV clips of three pitch classes with noise and random phase, one folder per class."""
    import soundfile

    rng = np.random.default_rng(seed)
    t = np.arange(int(16000 * seconds)) / 16000
    for name, base in (("low", 300.0), ("mid", 1200.0), ("high", 4000.0)):
        (root / name).mkdir(parents=True)
        for i in range(per_class):
            f = base * rng.uniform(0.9, 1.1)
            wave = 0.3 * np.sin(2 * math.pi * f * t + rng.uniform(0, 6.3)) + 0.05 * rng.standard_normal(t.size)
            soundfile.write(root / name / f"{i}.wav", wave.astype(np.float32), 16000)
    return root
