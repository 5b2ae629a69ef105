"""Refused settings and stopped runs: every numeric field is type- and range-checked when a config is
loaded, and a run whose loss or gradient turns NaN stops before the bad step, keeping its last checkpoint."""

import dataclasses
import os
import subprocess
import sys
from typing import get_type_hints

import pytest
import torch
from safetensors.torch import load_file

from qkv.train import (ConfigError, DataConfig, OptimConfig, TrainConfig, TrainingDiverged, latest_checkpoint,
                       load_config)
from train_helpers import TINY, run, story_text

BASE = ["task=lm", "data.dataset=shakespeare"]


def refused(*overrides) -> str:
    with pytest.raises(ConfigError) as e:
        load_config(None, [*BASE, *overrides])
    return str(e.value)


@pytest.mark.parametrize("override, words", [
    ("train.lr=inf", ["train.lr", "inf", "finite"]),
    ("train.lr=nan", ["train.lr", "nan"]),
    ("train.lr=1e30", ["train.lr", "1e+30", "(0, 10]"]),
    ("train.lr=0", ["train.lr", "(0, 10]"]),
    ("train.weight_decay=nan", ["train.weight_decay", "nan"]),
    ("train.weight_decay=-0.1", ["train.weight_decay", "-0.1", ">= 0"]),
    ("train.weight_decay=2000", ["train.weight_decay", "lr * train.weight_decay < 1"]),
    ("train.min_lr=nan", ["train.min_lr", "nan"]),
    ("train.min_lr=0.01", ["train.min_lr", "0.01", "train.lr=0.001"]),
    ("train.min_lr=-1e-5", ["train.min_lr", "[0, train.lr"]),
    ("train.grad_clip=nan", ["train.grad_clip", "nan"]),
    ("train.grad_clip=-1", ["train.grad_clip", "-1", "0 turns clipping off"]),
    ("train.grad_clip=inf", ["train.grad_clip", "inf"]),
    ("train.warmup=2000", ["train.warmup", "2000", "train.steps=1000"]),
    ("train.betas=[0.9, 1.0]", ["train.betas", "[0, 1)"]),
    ("train.betas=[0.9, nan]", ["train.betas", "nan"]),
    ("train.label_smoothing=1.0", ["train.label_smoothing", "[0, 1)"]),
    ("train.steps=1.5", ["train.steps", "integer", "1.5"]),
    ("train.steps=1e3", ["train.steps", "integer", "1000.0"]),
    ("train.batch_size=true", ["train.batch_size", "integer", "True"]),
    ("train.bf16=1", ["train.bf16", "true or false"]),
    ("train.eval_batches=-1", ["train.eval_batches", ">= 0"]),
    ("data.block_size=0", ["data.block_size", "[1, "]),
    ("data.max_length=1", ["data.max_length", "[2, "]),
    ("data.vocab_size=2", ["data.vocab_size", "[8, "]),
    ("data.val_fraction=1.0", ["data.val_fraction", "[0, 1)"]),
    ("data.tokenizer=3", ["data.tokenizer", "string"]),
    ("data.dataset=imagenet", ["data.dataset", "imagenet", "built-in"]),
    ("seed=-1", ["seed", "-1"]),
    ("seed=0.5", ["seed", "integer"]),
    ("out=", ["out", "folder"]),
    ("model.dropout=nan", ["model.dropout", "nan"]),
    ("model.dropout=1.0", ["model.dropout", "[0, 1)"]),
    ("model.attn_dropout=-0.1", ["model.attn_dropout", "[0, 1)"]),
    ("model.dim=64.5", ["model.dim", "64.5"]),
    ("model.n_layers=\"two\"", ["model.n_layers", "two"]),
])
def test_bad_values_are_refused_naming_the_field(override, words):
    message = refused(override)
    for w in words:
        assert w in message, (w, message)


def test_fractions_must_leave_training_rows():
    with pytest.raises(ConfigError, match=r"data\.test_fraction"):
        load_config(None, ["task=image", "data.dataset=digits", "data.val_fraction=0.5", "data.test_fraction=0.5"])
    load_config(None, ["task=lm", "data.dataset=shakespeare", "data.val_fraction=0.5", "data.test_fraction=0.5"])


def _numeric_fields():
    """(toml name, hint) of every int / float field of the data and train tables and the top level."""
    out = []
    for prefix, cls in (("", TrainConfig), ("data.", DataConfig), ("train.", OptimConfig)):
        hints = get_type_hints(cls)
        for f in dataclasses.fields(cls):
            hint = hints[f.name]
            kind = {int: "int", float: "float", float | None: "float", int | None: "int"}.get(hint)
            if kind:
                out.append((prefix + f.name, kind))
    return out


FIELDS = _numeric_fields()
BAD = {"float": ["nan", "inf", "-inf", "-1", '"fast"', "true", "[1]"],
       "int": ["nan", "inf", "-1", "1.5", '"ten"', "true", "[1]"]}


def test_the_sweep_covers_every_numeric_field():
    names = {n for n, _ in FIELDS}
    assert {"seed", "data.vocab_size", "data.block_size", "data.max_length", "data.val_fraction",
            "data.test_fraction", "train.lr", "train.min_lr", "train.warmup", "train.weight_decay",
            "train.grad_clip", "train.steps", "train.batch_size", "train.accumulate", "train.eval_every",
            "train.eval_batches", "train.save_every", "train.log_every", "train.early_stop",
            "train.label_smoothing"} <= names


@pytest.mark.parametrize("name, kind", FIELDS)
def test_sweep_nan_inf_negative_wrong_type(name, kind):
    for bad in BAD[kind]:
        message = refused(f"{name}={bad}")
        assert message.startswith(f"{name}:"), (bad, message)


@pytest.mark.parametrize("name, kind", FIELDS)
def test_sweep_from_toml_files(tmp_path, name, kind):
    table, _, key = name.rpartition(".")
    p = tmp_path / "run.toml"
    p.write_text(f'task = "lm"\n{key} = nan\n[data]\ndataset = "shakespeare"\n' if not table else
                 f'task = "lm"\n[{table}]\n{key} = nan\n' + ('[data]\ndataset = "shakespeare"\n' if table != "data"
                                                            else 'dataset = "shakespeare"\n'))
    with pytest.raises(ConfigError, match=rf"^{name}: .*nan"):
        load_config(p)


def test_python_configs_are_checked_too():
    cfg = TrainConfig(data=DataConfig(dataset="shakespeare"), train=OptimConfig(lr=float("nan")))
    with pytest.raises(ConfigError, match=r"train\.lr.*nan"):
        cfg.validate()
    with pytest.raises(ConfigError, match=r"train\.steps"):
        TrainConfig(data=DataConfig(dataset="shakespeare"), train=OptimConfig(steps=10.0)).validate()


def test_limits_themselves_are_accepted():
    cfg = load_config(None, [*BASE, "train.lr=10", "train.weight_decay=0.05", "train.grad_clip=0",
                             "train.min_lr=10", "train.warmup=1000", "train.eval_batches=0", "data.val_fraction=0"])
    assert cfg.train.lr == 10.0 and cfg.train.grad_clip == 0.0 and cfg.train.warmup_steps == 1000
    cfg = load_config(None, [*BASE, "train.min_lr=0", "train.steps=10"])  # warmup left out: min(100, steps)
    assert cfg.train.warmup is None and cfg.train.warmup_steps == 10


@pytest.mark.parametrize("make, words", [
    (lambda d: d, ["is a folder", "TOML file"]),
    (lambda d: d / "missing.toml", ["missing.toml", "does not exist"]),
    (lambda d: _write(d / "bad.toml", b'task = "lm"\n[data\n'), ["bad.toml", "not valid TOML"]),
    (lambda d: _write(d / "latin.toml", 'task = "lm" # caf\xe9\n'.encode("latin-1")), ["latin.toml", "UTF-8"]),
])
def test_unreadable_config_files_are_named(tmp_path, capsys, make, words):
    from qkv.cli import main

    path = make(tmp_path)
    with pytest.raises(ConfigError) as e:
        load_config(path)
    for w in words:
        assert w in str(e.value)
    assert main(["train", str(path), "--quiet"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("qkv train: ") and err.count("\n") == 1 and "Traceback" not in err


def _write(path, data: bytes):
    path.write_bytes(data)
    return path


# --- a run that diverges ------------------------------------------------------------------------------

class _NanGrad(torch.autograd.Function):
    """The identity forward, NaN gradients backward: a finite loss whose gradient is not."""

    @staticmethod
    def forward(ctx, x):
        return x.clone()

    @staticmethod
    def backward(ctx, grad):
        return grad * float("nan")


def _poison(monkeypatch, at: int, how: str = "loss"):
    """From training step ``at`` on, the training loss (or only its gradient) is NaN."""
    import qkv.train.loop as loop

    real, calls = loop.loss_and_stats, {"n": 0}

    def poisoned(task, model, batch, *args, **kwargs):
        loss, stats = real(task, model, batch, *args, **kwargs)
        calls["n"] += 1
        if calls["n"] >= at:
            loss = loss * float("nan") if how == "loss" else _NanGrad.apply(loss)
        return loss, stats

    monkeypatch.setattr(loop, "loss_and_stats", poisoned)


def _lm_sets(tmp_path):
    path = tmp_path / "stories.txt"
    path.write_text(story_text())
    return ["task=lm", f"data.path={path}", "data.block_size=16", "train.steps=20", "train.batch_size=4",
            "train.save_every=5", "model.dropout=0.0"]


@pytest.mark.parametrize("how, clip", [("loss", "1.0"), ("grad", "0"), ("grad", "1.0")])
def test_a_nan_stops_the_run_and_keeps_the_last_good_checkpoint(tmp_path, monkeypatch, how, clip):
    from qkv.data import load_data
    from qkv.train import build_model
    from qkv.train.checkpoint import load_checkpoint
    from qkv.train.loop import _optimizer

    _poison(monkeypatch, at=8, how=how)
    with pytest.raises(TrainingDiverged) as e:
        run(tmp_path, *_lm_sets(tmp_path), f"train.grad_clip={clip}")
    err = e.value
    assert isinstance(err, RuntimeError) and err.step == 8
    message = str(err)
    assert "step 8" in message and "train.lr" in message and "step_00000005" in message
    assert ("loss is nan" in message) == (how == "loss") and "gradient norm nan" in message
    out = tmp_path / "run"
    good = latest_checkpoint(out)
    assert good == err.checkpoint and good.name == "step_00000005"
    assert sorted(p.name for p in (out / "checkpoints").iterdir() if p.is_dir()) == ["step_00000005"]
    weights = load_file(str(good / "model.safetensors"))
    assert all(bool(torch.isfinite(w).all()) for w in weights.values())
    cfg = load_config(None, [f"out={out}", *TINY, *_lm_sets(tmp_path)])
    model = build_model(cfg, load_data(cfg.data, cfg.task))
    meta, _ = load_checkpoint(good, model, _optimizer(model, cfg))  # loadable into a fresh model and optimizer
    assert meta["step"] == 5
    assert all(bool(torch.isfinite(p).all()) for p in model.parameters())


def test_cli_exits_non_zero_on_divergence(tmp_path, monkeypatch, capsys):
    from qkv.cli import main

    _poison(monkeypatch, at=3)
    args = ["train", "--quiet", "--set", f"out={tmp_path / 'run'}"]
    for s in [*TINY, *_lm_sets(tmp_path)]:
        args += ["--set", s]
    assert main(args) == 2
    err = capsys.readouterr().err
    assert err.startswith("qkv train: training diverged at step 3") and err.count("\n") == 1
    assert "no checkpoint was written before it" in err  # the first save would have been at step 5
    assert latest_checkpoint(tmp_path / "run") is None


DRIVER = """
import os, sys
import qkv.train.loop as loop
from qkv.cli import main

real, calls = loop.loss_and_stats, {"n": 0}

def poisoned(task, model, batch, *args, **kwargs):
    loss, stats = real(task, model, batch, *args, **kwargs)
    calls["n"] += 1
    if os.environ["RANK"] == "1" and calls["n"] >= 4:  # only the second process sees a NaN
        loss = loss * float("nan")
    return loss, stats

loop.loss_and_stats = poisoned
code = main(sys.argv[1:])
print(f"rank {os.environ['RANK']} exit {code}", file=sys.stderr, flush=True)
sys.exit(code)
"""


def test_torchrun_processes_agree_to_stop(tmp_path):
    driver = tmp_path / "driver.py"
    driver.write_text(DRIVER)
    sets = [*TINY, *_lm_sets(tmp_path), "train.save_every=3", f"out={tmp_path / 'run'}"]
    args = [a for s in sets for a in ("--set", s)]
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "OMP_NUM_THREADS": "1"}
    proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
                           str(driver), "train", "--quiet", *args], env=env, capture_output=True, text=True,
                          timeout=240)
    assert proc.returncode != 0
    # the first process's own loss was finite; it stopped at step 4 with the second (torchrun may end the
    # second before it prints)
    assert "rank 0 exit 2" in proc.stderr, proc.stderr[-3000:]
    lines = [x for x in proc.stderr.splitlines() if x.startswith("qkv train: training diverged at step 4")]
    assert lines and all("on at least one of the 2 processes" in x for x in lines)
    assert latest_checkpoint(tmp_path / "run").name == "step_00000003"
    assert not (tmp_path / "run" / "checkpoints" / "step_00000004").exists()
    weights = load_file(str(latest_checkpoint(tmp_path / "run") / "model.safetensors"))
    assert all(bool(torch.isfinite(w).all()) for w in weights.values())


def test_weights_that_turn_nan_are_never_checkpointed(tmp_path, monkeypatch):
    """Behind the loss and gradient check: an optimizer step that leaves a NaN weight (finite loss and
    gradients so far) stops the run at the next save instead of writing it."""
    import qkv.train.loop as loop

    make, steps = loop._optimizer, {"n": 0}

    def optimizer(model, cfg):
        opt = make(model, cfg)
        real = opt.step

        def step(*a, **k):
            out = real(*a, **k)
            steps["n"] += 1
            if steps["n"] == 10:  # the step right before a checkpoint
                with torch.no_grad():
                    next(model.parameters()).view(-1)[0] = float("nan")
            return out

        opt.step = step
        return opt

    monkeypatch.setattr(loop, "_optimizer", optimizer)
    with pytest.raises(TrainingDiverged, match="by step 10: some weights are NaN"):
        run(tmp_path, *_lm_sets(tmp_path))
    assert latest_checkpoint(tmp_path / "run").name == "step_00000005"
