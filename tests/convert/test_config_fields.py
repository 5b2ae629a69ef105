"""Loaders never give wrong numbers silently: each config.json variant either loads with transformers'
outputs or is refused by a ConversionError naming the field."""

import json

import pytest
import torch
from hf_models import FAMILIES, T, family_outputs, save_family

import qkv
from qkv.convert import ConversionError, huggingface
from qkv.convert.huggingface._fields import IGNORED, REQUIRED, Alias, Only, Read
from qkv.convert.huggingface._tables import TABLES

# (family, config overrides): transformers and qkv must agree (float32, atol 1e-4)
SAME = [
    ("bert", {}), ("bert", {"hidden_act": "gelu_new"}), ("bert", {"hidden_act": "relu"}),
    ("bert", {"layer_norm_eps": 1e-5, "type_vocab_size": 1}), ("bert", {"chunk_size_feed_forward": 3}),
    ("gpt2", {}), ("gpt2", {"activation_function": "relu"}), ("gpt2", {"n_inner": 40}),
    ("gpt2", {"tie_word_embeddings": False}), ("gpt2", {"reorder_and_upcast_attn": True}),
    ("gpt2", {"layer_norm_epsilon": 1e-3}),
    ("llama", {}), ("llama", {"attention_bias": True, "mlp_bias": False}),
    ("llama", {"attention_bias": False, "mlp_bias": True}), ("llama", {"attention_bias": True, "mlp_bias": True}),
    ("llama", {"head_dim": 16}), ("llama", {"num_key_value_heads": 1, "tie_word_embeddings": True}),
    ("llama", {"hidden_act": "gelu"}), ("llama", {"rope_parameters": {"rope_type": "default", "rope_theta": 500.0}}),
    ("llama", {"rms_norm_eps": 1e-3}),
    ("llama", {"rope_parameters": {"rope_type": "linear", "factor": 2.0, "rope_theta": 10000.0}}),
    ("llama", {"rope_parameters": {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                                   "high_freq_factor": 4.0, "original_max_position_embeddings": 16,
                                   "rope_theta": 500000.0}}),
    ("t5", {}), ("t5", {"feed_forward_proj": "gated-gelu"}), ("t5", {"feed_forward_proj": "gated-silu"}),
    ("t5", {"feed_forward_proj": "gelu"}), ("t5", {"num_decoder_layers": 3, "tie_word_embeddings": False}),
    ("t5", {"relative_attention_num_buckets": 8, "relative_attention_max_distance": 20}),
    ("bart", {}), ("bart", {"normalize_before": True}), ("bart", {"add_final_layer_norm": True}),
    ("bart", {"scale_embedding": True}), ("bart", {"activation_function": "relu"}),
    ("bart", {"decoder_layers": 3}),
    ("vit", {}), ("vit", {"qkv_bias": False}), ("vit", {"hidden_act": "gelu_new", "layer_norm_eps": 1e-6}),
    ("vit", {"image_size": [16, 8], "num_channels": 1}), ("vit", {"encoder_stride": 4}),
    ("whisper", {}), ("whisper", {"scale_embedding": True}), ("whisper", {"activation_function": "relu"}),
    ("whisper", {"decoder_layers": 3}), ("whisper", {"tie_word_embeddings": False}),
]

# (family, config overrides, the field the refusal must name)
REFUSED = [
    ("bert", {"is_decoder": True}, "is_decoder"),
    ("bert", {"is_decoder": True, "add_cross_attention": True}, "add_cross_attention|is_decoder"),
    ("bert", {"position_embedding_type": "relative_key"}, "position_embedding_type"),
    ("gpt2", {"scale_attn_weights": False}, "scale_attn_weights"),
    ("gpt2", {"scale_attn_by_inverse_layer_idx": True}, "scale_attn_by_inverse_layer_idx"),
    ("llama", {"rope_parameters": {"rope_type": "dynamic", "factor": 2.0, "rope_theta": 10000.0}}, "rope_parameters"),
    ("llama", {"hidden_act": "tanh"}, "hidden_act"),
    ("t5", {"feed_forward_proj": "gated-tanh"}, "feed_forward_proj"),
    ("bart", {"decoder_attention_heads": 2}, "decoder_attention_heads"),
    # transformers >= 5 then unties the encoder's, decoder's and head's embeddings: qkv has one
    ("bart", {"tie_word_embeddings": False}, "tie_word_embeddings"),
    ("bart", {"encoder_ffn_dim": 40}, "decoder_ffn_dim"),
    ("vit", {"pooler_act": "relu"}, "pooler_act"),
    ("vit", {"pooler_output_size": 16}, "pooler_output_size"),
    ("whisper", {"decoder_ffn_dim": 40}, "decoder_ffn_dim"),
]


def _name(case):
    return f"{case[0]}-" + "-".join(f"{k}={v}" for k, v in case[1].items())


@pytest.mark.parametrize("family,overrides", SAME, ids=map(_name, SAME))
def test_variant_equals_transformers(tmp_path, family, overrides):
    hf = save_family(tmp_path, family, **overrides)
    model = qkv.load(tmp_path)
    want, got = family_outputs(family, hf, model)
    torch.testing.assert_close(got, want, rtol=0, atol=1e-4)


@pytest.mark.parametrize("family,overrides,field", REFUSED, ids=map(_name, REFUSED))
def test_variant_is_refused_by_name(tmp_path, family, overrides, field):
    save_family(tmp_path, family, **overrides)
    with pytest.raises(ConversionError, match=rf"\b({field})\b"):
        qkv.load(tmp_path)


def test_bert_is_decoder_was_silently_bidirectional(tmp_path):
    """The case found by a new user: transformers makes BertModel causal; qkv refuses instead of
    giving different numbers, and says what to do."""
    save_family(tmp_path, "bert", is_decoder=True)
    with pytest.raises(ConversionError, match=r"is_decoder=True is not implemented by qkv's BERT loader.*bidirection"):
        qkv.load(tmp_path)


def test_bart_normalize_before_stays_post_norm(tmp_path):
    """transformers' BART ignores the fairseq normalize_before field: qkv must too (it used to switch to pre-norm)."""
    hf = save_family(tmp_path, "bart", normalize_before=True)
    assert json.loads((tmp_path / "config.json").read_text())["normalize_before"] is True
    model = qkv.load(tmp_path)
    assert model.config.prenorm is False
    want, got = family_outputs("bart", hf, model)
    torch.testing.assert_close(got, want, rtol=0, atol=1e-4)


def test_llama_attention_and_mlp_bias_are_independent(tmp_path):
    hf = save_family(tmp_path, "llama", attention_bias=True, mlp_bias=False)
    model = qkv.load(tmp_path)
    layer = model.stack.layers[0]
    assert layer.attn.qkv.bias is not None and layer.attn.o.bias is not None
    assert layer.ffn.up.bias is None and layer.ffn.down.bias is None
    want, got = family_outputs("llama", hf, model)
    torch.testing.assert_close(got, want, rtol=0, atol=1e-4)


def _config(family: str, **overrides) -> dict:
    _, cfg_cls, kwargs = FAMILIES[family]
    return {**cfg_cls(**{**kwargs, **overrides}).to_dict(), **overrides}


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_every_field_transformers_writes_is_in_the_table(family):
    """The tables are complete for the installed transformers: a default config loads field by field."""
    cfg = _config(family)
    unknown = sorted(k for k in cfg if k not in TABLES[family])
    assert not unknown, f"{family}: fields transformers writes but the table lacks: {unknown}"
    huggingface.config_from_hf(cfg)


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_unknown_field_is_refused_by_name(tmp_path, family):
    save_family(tmp_path, family)
    cfg = json.loads((tmp_path / "config.json").read_text())
    cfg["attention_sink_tokens"] = 4
    (tmp_path / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(ConversionError, match=r"field attention_sink_tokens=4 is not implemented by qkv's"):
        qkv.load(tmp_path)


def _fields(kinds):
    return [(fam, name, rule) for fam, table in sorted(TABLES.items()) for name, rule in table.items()
            if isinstance(rule, kinds)]


@pytest.mark.parametrize("family,name,rule", _fields(Only), ids=lambda x: x if isinstance(x, str) else "")
def test_fixed_fields_refuse_other_values(family, name, rule):
    other = {bool: lambda v: not v, str: lambda v: v + "_other", dict: lambda v: {"0": [1]},
             type(None): lambda v: 7}[type(rule.values[0])](rule.values[0])
    cfg = _config(family)
    cfg[name] = other
    with pytest.raises(ConversionError, match=rf"\b{name}=.*not implemented by qkv's"):
        huggingface.config_from_hf(cfg)
    cfg[name] = rule.values[0]
    huggingface.config_from_hf(cfg)  # the value qkv computes is fine


_WRONG = {"int": "3", "positive": "1e-5", "float": [0.1], "bool": "yes", "str": 3, "token": -5, "tokens": "eos",
          "ids": {"a": 1}, "size": 0, "strings": "BertModel", "labels": ["neg", "pos"], "dict": [1, 2],
          "floats": "0.5"}


@pytest.mark.parametrize("family,name,rule", _fields(Read), ids=lambda x: x if isinstance(x, str) else "")
def test_implemented_fields_are_type_checked(family, name, rule):
    cfg = _config(family)
    cfg[name] = _WRONG[rule.kind]
    with pytest.raises(ConversionError, match=rf"\b{name}\b"):
        huggingface.config_from_hf(cfg)


@pytest.mark.parametrize("family,name,rule", _fields(Read), ids=lambda x: x if isinstance(x, str) else "")
def test_required_fields_are_named_when_missing(family, name, rule):
    cfg = _config(family)
    cfg.pop(name, None)
    if rule.default is REQUIRED:
        with pytest.raises(ConversionError, match=rf"has no field '{name}'"):
            huggingface.config_from_hf(cfg)
    else:
        huggingface.config_from_hf(cfg)  # an optional field has a default


_ALIASES = [(fam, a, r.name) for fam, table in sorted(TABLES.items()) for a, r in table.items()
            if isinstance(r, Alias)]


@pytest.mark.parametrize("family,alias,name", _ALIASES)
def test_aliases_read_as_their_field_and_conflicts_are_refused(family, alias, name):
    """transformers' attribute_map names (GPT-2's hidden_size for n_embd, ...) read as the field itself."""
    cfg = _config(family)
    cfg[alias] = cfg.pop(name)
    assert huggingface.config_from_hf(cfg) == huggingface.config_from_hf(_config(family))
    cfg[name] = cfg[alias] + 1
    with pytest.raises(ConversionError, match=rf"{alias}=.*{name}=.*same setting"):
        huggingface.config_from_hf(cfg)


def test_metadata_is_ignored_and_heads_are_read():
    for table in TABLES.values():
        assert table["transformers_version"] is IGNORED and table["initializer_range"] is IGNORED
        assert isinstance(table["architectures"], Read) and isinstance(table["id2label"], Read)


def test_llama_legacy_rope_fields(tmp_path):
    """rope_scaling wins over rope_parameters, as in transformers; a top-level rope_theta fills in."""
    base = _config("llama")
    base.pop("rope_parameters")
    _, config = huggingface.config_from_hf({**base, "rope_theta": 1234.0})
    assert config.rope_theta == 1234.0
    _, config = huggingface.config_from_hf({**base, "rope_scaling": {"type": "default", "rope_theta": 99.0}})
    assert config.rope_theta == 99.0
    with pytest.raises(ConversionError, match="rope_scaling"):
        huggingface.config_from_hf({**base, "rope_scaling": {"rope_type": "yarn", "factor": 4.0}})
    _, config = huggingface.config_from_hf({**base, "pad_token_id": -1})  # early Llama configs: "no pad"
    assert config.pad_token_id is None


def test_t5_gated_relu_and_ids_from_the_config():
    _, config = huggingface.config_from_hf(_config("t5", feed_forward_proj="gated-relu"))
    assert config.activation == "reglu"
    _, config = huggingface.config_from_hf(_config("llama", eos_token_id=[2, 5]))
    assert config.eos_token_id == [2, 5]


def test_classifier_labels_are_read(tmp_path):
    _, cfg_cls, kwargs = FAMILIES["vit"]
    torch.manual_seed(0)
    hf = T.ViTForImageClassification(cfg_cls(**kwargs, id2label={0: "cat", 1: "dog", 2: "owl"})).eval()
    hf.save_pretrained(tmp_path)
    model = qkv.load(tmp_path)
    assert model.config.labels == ["cat", "dog", "owl"]
    x = torch.randn(1, 3, 16, 16)
    with torch.no_grad():
        torch.testing.assert_close(model(x).logits, hf(pixel_values=x).logits, rtol=0, atol=1e-4)
