"""Configs: TOML into dataclasses, overrides, and errors that name the field."""

import pytest

from qkv.train import ConfigError, load_config


def write(tmp_path, text):
    p = tmp_path / "run.toml"
    p.write_text(text)
    return p


def test_toml_and_overrides(tmp_path):
    p = write(tmp_path, 'task = "image"\n[data]\ndataset = "digits"\n[train]\nsteps = 10\nlr = 1\nbetas = [0.8, 0.9]\n')
    cfg = load_config(p, ["train.lr=3e-4", "model.dim=64", "data.options.image_size=16", "out=some/where"])
    assert cfg.task == "image" and cfg.train.steps == 10
    assert cfg.train.lr == pytest.approx(3e-4) and isinstance(cfg.train.lr, float)
    assert cfg.train.betas == (0.8, 0.9)
    assert cfg.model == {"dim": 64} and cfg.data.options == {"image_size": 16}
    assert cfg.out == "some/where"  # a bare string override


@pytest.mark.parametrize("text, overrides, names", [
    ('task = "lm"\n[data]\ndataset = "shakespeare"\n[train]\nstep = 10\n', [], ["train.step", "train.steps"]),
    ('task = "lm"\n[data]\ndataset = "shakespeare"\n[train]\nsteps = "ten"\n', [], ["train.steps", "int", "ten"]),
    ('task = "lm"\n[data]\ndataset = "shakespeare"\n', ["train.lr=-1"], ["train.lr", "-1"]),
    ('task = "lm"\n[data]\ndataset = "shakespeare"\n', ["train.batch_size=0"], ["train.batch_size", ">= 1"]),
    ('task = "lm"\n[data]\ndataset = "shakespeare"\n[train]\nbetas = [0.9]\n', [], ["train.betas", "2 numbers"]),
    ('task = "translate"\n[data]\ndataset = "shakespeare"\n', [], ["task", "translate", "lm"]),
    ('task = "lm"\n', [], ["data.dataset", "data.path"]),
    ('task = "lm"\n[data]\ndataset = "shakespeare"\ntokenizer = "sentencepiece"\n', [], ["data.tokenizer"]),
    ('task = "lm"\ndata = 3\n', [], ["data", "table"]),
    ('task = "lm"\n[data]\ndataset = "shakespeare"\n', ["train.lr"], ["--set", "key=value"]),
    ('task = "lm"\n[data\n', [], ["run.toml", "TOML"]),
])
def test_bad_configs_name_the_field(tmp_path, text, overrides, names):
    with pytest.raises(ConfigError) as e:
        load_config(write(tmp_path, text), overrides)
    for n in names:
        assert n in str(e.value)


def test_missing_file(tmp_path):
    with pytest.raises(ConfigError, match="nope.toml"):
        load_config(tmp_path / "nope.toml")


def test_unknown_model_field_is_named(tmp_path):
    from qkv.data import load_data
    from qkv.train import build_model

    cfg = load_config(None, ["task=image", "data.dataset=digits", "model.widht=64"])
    with pytest.raises(ConfigError, match=r"model\.widht"):
        build_model(cfg, load_data(cfg.data, cfg.task))


def test_cli_reports_config_errors(tmp_path, capsys):
    from qkv.cli import main

    code = main(["train", str(write(tmp_path, 'task = "lm"\n[data]\ndataset = "shakespeare"\n[train]\nlr = "x"\n'))])
    assert code == 2
    assert "train.lr" in capsys.readouterr().err


def test_shipped_configs_parse():
    from pathlib import Path

    from qkv.train.tasks import DEFAULTS

    configs = sorted((Path(__file__).parents[2] / "configs").glob("*.toml"))
    assert len(configs) >= 6
    for p in configs:
        cfg = load_config(p)
        assert cfg.task in DEFAULTS, p


def test_unknown_dataset_option_is_named():
    from qkv.data import DataError, load_data

    cfg = load_config(None, ["task=listops", "data.dataset=listops", "data.options.length=5"])
    with pytest.raises(DataError, match=r"data\.options\.length.*min_len"):
        load_data(cfg.data, cfg.task)
