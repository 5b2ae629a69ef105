"""Bad model folders and configs get a message naming the field, never a traceback, a hang or a huge
allocation: through `qkv.load` (a ValueError / TypeError) and through `qkv info` (exit 2, one line)."""

import dataclasses
import json
import math
import resource
import shutil
import time
import tracemalloc

import pytest
import torch
from hf_models import save_family

import qkv
from qkv.cli import main
from qkv.convert.huggingface._fields import REQUIRED, Read
from qkv.convert.huggingface._tables import TABLES
from qkv.models import CausalLM, CausalLMConfig

FAMILIES = sorted(TABLES)


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    """One tiny saved transformers model per family."""
    root = tmp_path_factory.mktemp("families")
    for family in FAMILIES:
        save_family(root / family, family)
    return root


def _variant(saved, tmp_path, family, change) -> str:
    """A copy of the family's folder whose config.json is ``change(config dict)`` (written as JSON)."""
    folder = tmp_path / family
    shutil.copytree(saved / family, folder)
    cfg = json.loads((folder / "config.json").read_text())
    (folder / "config.json").write_text(json.dumps(change(cfg)))
    return str(folder)


def _refused(folder: str, *names: str, capsys=None) -> str:
    """qkv.load(folder) raises a ValueError/TypeError naming ``names``; `qkv info` exits 2 with one line."""
    with pytest.raises((ValueError, TypeError)) as e:
        qkv.load(folder)
    message = str(e.value)
    for n in names:
        assert n in message, f"{n!r} not in: {message}"
    if capsys is not None:
        capsys.readouterr()
        assert main(["info", folder]) == 2
        err = capsys.readouterr().err
        assert "Traceback" not in err and err.count("\n") == 1, err
        for n in names:
            assert n in err
    return message


def _set(**fields):
    return lambda cfg: {**cfg, **fields}


def _drop(name):
    return lambda cfg: {k: v for k, v in cfg.items() if k != name}


REQUIRED_FIELDS = [(fam, name) for fam in FAMILIES for name, rule in TABLES[fam].items()
                   if isinstance(rule, Read) and rule.default is REQUIRED]


@pytest.mark.parametrize("family,name", REQUIRED_FIELDS)
def test_missing_field_names_the_field_and_the_file(saved, tmp_path, family, name, capsys):
    folder = _variant(saved, tmp_path, family, _drop(name))
    _refused(folder, name, "config.json", capsys=capsys)


def test_attacks_from_the_issue(saved, tmp_path, capsys):
    """The cases as found: GPT-2 without n_embd / n_head / vocab_size (was a bare KeyError)."""
    for name in ("n_embd", "n_head", "vocab_size"):
        folder = _variant(saved, tmp_path / name, "gpt2", _drop(name))
        _refused(folder, name, capsys=capsys)


NESTED = [
    ("llama", "rope_scaling", [{"rope_type": "linear"}]),
    ("llama", "rope_parameters", ["default", 10000.0]),
    ("llama", "rope_parameters", {"rope_type": "default", "rope_theta": "big"}),
    ("bert", "id2label", ["negative", "positive"]),
    ("bert", "id2label", {"zero": "negative"}),
    ("vit", "id2label", {"0": ["cat"]}),
    ("gpt2", "architectures", {"0": "GPT2LMHeadModel"}),
    ("whisper", "suppress_tokens", {"a": 1}),
    ("whisper", "begin_suppress_tokens", [220, "eos"]),
    ("t5", "eos_token_id", [1, [2]]),
    ("vit", "image_size", [16, 16, 16]),
]


@pytest.mark.parametrize("family,name,value", NESTED)
def test_list_where_an_object_belongs_and_back(saved, tmp_path, family, name, value, capsys):
    _refused(_variant(saved, tmp_path, family, _set(**{name: value})), name, capsys=capsys)


BAD_COUNTS = [2.5, "2", -1, 0, True, None, 10**30, [2], {"n": 2}]


@pytest.mark.parametrize("value", BAD_COUNTS, ids=repr)
@pytest.mark.parametrize("family,name", [("bert", "num_hidden_layers"), ("gpt2", "vocab_size"),
                                         ("llama", "num_attention_heads"), ("t5", "d_kv"),
                                         ("bart", "encoder_layers"), ("vit", "patch_size"),
                                         ("whisper", "num_mel_bins")])
def test_float_string_negative_counts(saved, tmp_path, family, name, value, capsys):
    _refused(_variant(saved, tmp_path, family, _set(**{name: value})), name, capsys=capsys)


@pytest.mark.parametrize("value", [math.nan, math.inf, -1e-5, 0.0, "1e-5"], ids=repr)
@pytest.mark.parametrize("family,name", [("bert", "layer_norm_eps"), ("llama", "rms_norm_eps"),
                                         ("llama", "rope_theta"), ("t5", "layer_norm_epsilon")])
def test_nan_inf_and_negative_floats(saved, tmp_path, family, name, value):
    _refused(_variant(saved, tmp_path, family, _set(**{name: value})), name)


@pytest.mark.parametrize("family,change,names", [
    ("bert", _set(hidden_size=10**9), ["hidden_size", "budget"]),
    ("gpt2", _set(n_embd=2**20), ["n_embd", "budget"]),
    ("llama", _set(intermediate_size=10**9), ["intermediate_size", "budget"]),
    ("whisper", _set(max_source_positions=2**31 - 1), ["max_source_positions", "budget"]),
    ("vit", _set(image_size=2**20), ["image_size", "budget"]),
    ("t5", _set(num_layers=10**6), ["num_layers"]),
    ("bart", _set(vocab_size=10**12), ["vocab_size"]),
])
def test_absurd_sizes_are_refused_fast_without_allocating(saved, tmp_path, family, change, names):
    folder = _variant(saved, tmp_path, family, change)
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # KiB, the peak so far
    tracemalloc.start()
    start = time.perf_counter()
    try:
        message = _refused(folder, *names)
    finally:
        _, peak = tracemalloc.get_traced_memory()
        tracemalloc.stop()
    assert time.perf_counter() - start < 1.0
    assert peak < 50 * 2**20, f"traced {peak / 2**20:.0f} MiB"
    assert resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - rss < 200 * 1024
    assert "\n" not in message


def test_budget_is_overridable(saved, tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("QKV_MAX_MODEL_BYTES", "1000")
    message = _refused(str(saved / "gpt2"), "vocab_size=100", "n_embd", "QKV_MAX_MODEL_BYTES", capsys=capsys)
    assert "budget" in message
    with pytest.raises(ValueError, match="vocab_size=100, dim=32"):
        CausalLMConfig(vocab_size=100, dim=32, n_layers=2, n_heads=4, ffn_dim=64)
    monkeypatch.setenv("QKV_MAX_MODEL_BYTES", "lots")
    with pytest.raises(ValueError, match="QKV_MAX_MODEL_BYTES='lots'"):
        CausalLMConfig()
    monkeypatch.setenv("QKV_MAX_MODEL_BYTES", "1e9")
    assert qkv.load(saved / "gpt2").config.dim == 32


@pytest.mark.parametrize("content", ["[1, 2]", '"gpt2"', "{}", '{"model_type": ["gpt2"]}', "{"])
def test_config_that_is_not_an_object(saved, tmp_path, content, capsys):
    folder = tmp_path / "m"
    shutil.copytree(saved / "gpt2", folder)
    (folder / "config.json").write_text(content)
    _refused(str(folder), "config.json", capsys=capsys)


def test_config_that_is_a_folder(saved, tmp_path, capsys):
    folder = tmp_path / "m"
    shutil.copytree(saved / "gpt2", folder)
    (folder / "config.json").unlink()
    (folder / "config.json").mkdir()
    _refused(str(folder), "config.json", "folder", capsys=capsys)


def test_side_files_are_checked(saved, tmp_path, capsys):
    folder = tmp_path / "vit"
    shutil.copytree(saved / "vit", folder)
    (folder / "preprocessor_config.json").write_text(json.dumps({"image_mean": "0.5", "resample": 2}))
    _refused(str(folder), "preprocessor_config.json", "image_mean", capsys=capsys)
    (folder / "preprocessor_config.json").write_text(json.dumps({"resample": 9}))
    _refused(str(folder), "resample", capsys=capsys)
    folder = tmp_path / "whisper"
    shutil.copytree(saved / "whisper", folder)
    (folder / "generation_config.json").write_text(json.dumps({"suppress_tokens": "none"}))
    _refused(str(folder), "generation_config.json", "suppress_tokens", capsys=capsys)


# qkv's own folders (qkv_family / qkv_config, as qkv.train saves them)

def _native(tmp_path, config: CausalLMConfig | None = None, edit=lambda cfg: cfg) -> str:
    from safetensors.torch import save_model

    config = config or CausalLMConfig(vocab_size=50, dim=16, n_layers=1, n_heads=2, ffn_dim=32, max_positions=16)
    save_model(CausalLM(config), str(tmp_path / "model.safetensors"))
    cfg = {"qkv_family": "causal_lm", "qkv_config": dataclasses.asdict(config)}
    (tmp_path / "config.json").write_text(json.dumps(edit(cfg)))
    return str(tmp_path)


def test_native_folder_loads(tmp_path):
    assert qkv.load(_native(tmp_path)).config.dim == 16


@pytest.mark.parametrize("edit,names", [
    (lambda c: {**c, "qkv_config": {**c["qkv_config"], "widht": 3}}, ["widht", "CausalLMConfig"]),
    (lambda c: {**c, "qkv_config": {**c["qkv_config"], "n_layers": "2"}}, ["n_layers"]),
    (lambda c: {**c, "qkv_config": {**c["qkv_config"], "dim": 10**9}}, ["dim", "budget"]),
    (lambda c: {**c, "qkv_config": [1, 2]}, ["qkv_config"]),
    (lambda c: {"qkv_family": "causal_lm"}, ["qkv_config"]),
    (lambda c: {**c, "qkv_family": "mamba"}, ["qkv_family", "mamba"]),
    (lambda c: {**c, "qkv_family": ["causal_lm"]}, ["qkv_family"]),
])
def test_native_folder_refusals(tmp_path, edit, names, capsys):
    _refused(_native(tmp_path, edit=edit), *names, capsys=capsys)


def test_native_folder_missing_fields_are_named_when_the_weights_do_not_fit(tmp_path):
    def drop_dim(cfg):
        del cfg["qkv_config"]["dim"]
        return cfg

    _refused(_native(tmp_path, edit=drop_dim), "dim", "model.safetensors")


def test_model_configs_validate_before_allocating():
    """The dataclasses themselves (what qkv train builds) refuse bad fields by name."""
    with pytest.raises(TypeError, match="n_layers=2.5"):
        CausalLMConfig(n_layers=2.5)
    with pytest.raises(ValueError, match="n_heads=12 is not divisible by n_kv_heads=5"):
        CausalLMConfig(n_kv_heads=5)
    assert CausalLM(CausalLMConfig(vocab_size=20, dim=8, n_layers=1, n_heads=2, ffn_dim=8)).num_parameters() > 0
    assert torch.is_tensor(next(CausalLM(CausalLMConfig(vocab_size=20, dim=8, n_layers=1, n_heads=2,
                                                        ffn_dim=8)).parameters()))
