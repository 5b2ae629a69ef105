"""The model configs validate every field before any tensor exists: types, ranges, divisibility, and a
memory budget estimated from the config alone."""

import math
import typing
from dataclasses import fields

import pytest

from qkv.models import (
    CausalLM,
    CausalLMConfig,
    Seq2Seq,
    Seq2SeqConfig,
    SpeechRecognizer,
    TextEncoder,
    TextEncoderConfig,
    VisionTransformer,
    ViTConfig,
    WhisperConfig,
)

TINY = {
    CausalLMConfig: (CausalLM, dict(vocab_size=40, dim=16, n_layers=2, n_heads=4, n_kv_heads=2, ffn_dim=24,
                                    max_positions=32)),
    TextEncoderConfig: (TextEncoder, dict(vocab_size=40, dim=16, n_layers=2, n_heads=4, ffn_dim=24, max_positions=32,
                                          max_length=32, head="sequence_classification", num_labels=3)),
    Seq2SeqConfig: (Seq2Seq, dict(vocab_size=40, dim=16, n_layers=2, n_decoder_layers=3, n_heads=4, head_dim=4,
                                  ffn_dim=24, tie_embeddings=False)),
    ViTConfig: (VisionTransformer, dict(image_size=16, patch_size=4, dim=16, n_layers=2, n_heads=4, ffn_dim=24,
                                        num_labels=5)),
    WhisperConfig: (SpeechRecognizer, dict(vocab_size=40, dim=16, n_layers=2, n_decoder_layers=2, n_heads=4,
                                           ffn_dim=24, n_mels=8, audio_positions=10, max_positions=16)),
}
CLASSES = list(TINY)


def _typed(cls, kind):
    hints = typing.get_type_hints(cls)
    return [f.name for f in fields(cls) if kind in typing.get_args(hints[f.name]) or hints[f.name] is kind]


def _cases(kind):
    return [(cls, name) for cls in CLASSES for name in _typed(cls, kind)]


@pytest.mark.parametrize("cls,name", _cases(int), ids=lambda x: getattr(x, "__name__", x))
@pytest.mark.parametrize("bad", ["2", 2.5, True], ids=repr)
def test_integer_fields_refuse_other_types(cls, name, bad):
    with pytest.raises(TypeError, match=rf"{cls.__name__}: {name}={bad!r} must be"):
        cls(**{**TINY[cls][1], name: bad})


@pytest.mark.parametrize("cls,name", _cases(float), ids=lambda x: getattr(x, "__name__", x))
@pytest.mark.parametrize("bad", [math.nan, math.inf, "0.1"], ids=repr)
def test_float_fields_refuse_nan_inf_and_strings(cls, name, bad):
    with pytest.raises(TypeError, match=rf"{name}="):
        cls(**{**TINY[cls][1], name: bad})


@pytest.mark.parametrize("cls,name", _cases(bool), ids=lambda x: getattr(x, "__name__", x))
def test_bool_fields_refuse_numbers(cls, name):
    with pytest.raises(TypeError, match=rf"{name}=1 must be"):
        cls(**{**TINY[cls][1], name: 1})


SIZES = [(cls, name) for cls in CLASSES for name in ("dim", "n_layers", "n_heads", "ffn_dim")]


@pytest.mark.parametrize("cls,name", SIZES, ids=lambda x: getattr(x, "__name__", x))
@pytest.mark.parametrize("bad", [0, -3, 2**40], ids=repr)
def test_sizes_are_range_checked(cls, name, bad):
    with pytest.raises(ValueError, match=rf"{name}={bad}"):
        cls(**{**TINY[cls][1], name: bad})


@pytest.mark.parametrize("cls", CLASSES, ids=lambda c: c.__name__)
def test_dropout_and_eps_ranges(cls):
    base = TINY[cls][1]
    with pytest.raises(ValueError, match="dropout=1.5 must be in"):
        cls(**{**base, "dropout": 1.5})
    with pytest.raises(ValueError, match="norm_eps=-1e-05 must be a number > 0"):
        cls(**{**base, "norm_eps": -1e-5})


def test_divisibility_and_token_ids():
    with pytest.raises(ValueError, match="dim=30 is not divisible by n_heads=4"):
        TextEncoderConfig(dim=30, n_heads=4)
    with pytest.raises(ValueError, match="n_heads=4 is not divisible by n_kv_heads=3"):
        CausalLMConfig(dim=16, n_heads=4, n_kv_heads=3)
    CausalLMConfig(dim=30, n_heads=4, head_dim=8)  # head_dim given: no divisibility needed
    with pytest.raises(ValueError, match="eos_token_id=\\[2, -1\\]"):
        CausalLMConfig(eos_token_id=[2, -1])
    with pytest.raises(ValueError, match="pad_token_id=50 must be a token id below vocab_size=40"):
        TextEncoderConfig(vocab_size=40, pad_token_id=50)
    with pytest.raises(TypeError, match="suppress_tokens=\\['a'\\]"):
        WhisperConfig(suppress_tokens=["a"])
    with pytest.raises(ValueError, match="image_std"):
        ViTConfig(image_std=[0.5, 0.0, 0.5])


@pytest.mark.parametrize("cls", CLASSES, ids=lambda c: c.__name__)
def test_parameter_estimate_is_close_to_the_model(cls):
    model_cls, kwargs = TINY[cls]
    config = cls(**kwargs)
    actual = model_cls(config).num_parameters()
    assert abs(config.parameter_estimate() - actual) <= 0.1 * actual, (config.parameter_estimate(), actual)


@pytest.mark.parametrize("cls", CLASSES, ids=lambda c: c.__name__)
def test_budget_refuses_before_allocating(cls, monkeypatch):
    config = cls(**TINY[cls][1])
    monkeypatch.setenv("QKV_MAX_MODEL_BYTES", str(config.parameter_estimate() * 4 - 1))
    with pytest.raises(ValueError, match=r"dim=16.* parameters, .* in float32, more than the .* budget "
                                         r"\(QKV_MAX_MODEL_BYTES\)"):
        cls(**TINY[cls][1])
    monkeypatch.setenv("QKV_MAX_MODEL_BYTES", str(config.parameter_estimate() * 4))
    cls(**TINY[cls][1])


def test_default_budget_is_the_machine_memory(monkeypatch):
    monkeypatch.delenv("QKV_MAX_MODEL_BYTES", raising=False)
    with pytest.raises(ValueError, match="this machine's memory"):
        CausalLMConfig(vocab_size=10**6, dim=2**16, n_heads=2**8)


def test_mlp_bias_is_separate_from_the_attention_bias():
    model = CausalLM(CausalLMConfig(**{**TINY[CausalLMConfig][1], "bias": False, "mlp_bias": True}))
    layer = model.stack.layers[0]
    assert layer.attn.qkv.bias is None and layer.attn.o.bias is None
    assert layer.ffn.up.bias is not None and layer.ffn.down.bias is not None
    default = CausalLM(CausalLMConfig(**TINY[CausalLMConfig][1]))  # mlp_bias=None follows bias
    assert default.stack.layers[0].ffn.up.bias is not None
