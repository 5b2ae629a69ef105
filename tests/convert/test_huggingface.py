"""Converters are strict: unknown, missing and mis-shaped keys are named; only safetensors are read."""

import json

import pytest
import torch
from hf_models import pair

import qkv
from qkv.convert import ConversionError, KeyMap, check_complete, huggingface
from qkv.pretrained import REGISTRY, Offline, read_safetensors


def _gpt2_state():
    hf, model = pair("gpt2")
    return hf, model, {k: v.clone() for k, v in hf.state_dict().items()}


def test_unused_checkpoint_key_is_named():
    hf, model, sd = _gpt2_state()
    sd["transformer.h.0.attn.extra_adapter.weight"] = torch.zeros(3)
    with pytest.raises(ConversionError, match="extra_adapter"):
        huggingface.gpt2(sd, model.config)


def test_missing_checkpoint_key_is_named():
    hf, model, sd = _gpt2_state()
    del sd["transformer.h.1.mlp.c_fc.weight"]
    with pytest.raises(ConversionError, match=r"h\.1\.mlp\.c_fc\.weight"):
        huggingface.gpt2(sd, model.config)


def test_shape_mismatch_is_named():
    _, model = pair("gpt2")
    converted = dict(model.state_dict())
    converted["stack.norm.weight"] = torch.zeros(7)
    with pytest.raises(ConversionError, match=r"stack\.norm\.weight: checkpoint \(7,\)"):
        check_complete(model.state_dict(), converted)


def test_keymap_accounting():
    km = KeyMap({"a": torch.ones(2), "b": torch.ones(2), "buf": torch.ones(1)})
    km.copy("x", "a")
    km.ignore("buf")
    with pytest.raises(ConversionError, match=r"\['b'\]"):
        km.result()
    with pytest.raises(ConversionError, match="close"):
        km.get("aa")


def test_unsupported_model_type(tmp_path):
    with pytest.raises(ConversionError, match="model_type 'mamba'"):
        huggingface.config_from_hf({"model_type": "mamba"})


def test_pickle_weights_are_refused(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "gpt2"}))
    (tmp_path / "pytorch_model.bin").write_bytes(b"not read")
    with pytest.raises(FileNotFoundError, match="unpickling"):
        read_safetensors(tmp_path)
    with pytest.raises(FileNotFoundError, match="unpickling"):
        qkv.load(tmp_path)


def test_missing_offline_package_says_how_to_install(monkeypatch):
    monkeypatch.setitem(REGISTRY, "ghost-model", Offline("qkv_no_such_package", "m", "ghost-pkg", "test"))
    with pytest.raises(FileNotFoundError, match="pip install --no-deps ghost-pkg"):
        qkv.load("ghost-model")
    with pytest.raises(FileNotFoundError, match="registered"):
        qkv.load("/no/such/folder")


def test_sharded_checkpoints_load(tmp_path):
    hf, model = pair("gpt2")
    hf.save_pretrained(tmp_path, max_shard_size="50KB")
    assert (tmp_path / "model.safetensors.index.json").exists()
    again = qkv.load(tmp_path)
    ids = torch.randint(3, 120, (1, 6))
    with torch.no_grad():
        torch.testing.assert_close(again(ids).logits, model(ids).logits)
