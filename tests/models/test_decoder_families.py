"""The decoder families people run today (Llama 3, Qwen 2 / 3, Mistral, Gemma 2 / 3, Phi-3), loaded from
transformers' saved folders: logits equal on left-padded batches, greedy tokens equal with a KV cache
(sliding windows shorter than the inputs, so cached steps cross the window), and every setting qkv does
not compute refused by name."""

import json
import random

import pytest
import torch
from hf_models import FAMILIES, T, save_family

import qkv
from qkv.convert import ConversionError
from qkv.models import CausalLMConfig


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    """Tiny models: one thread is faster than several fighting over a shared machine's cores."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def _sizes(r: random.Random) -> dict:
    heads = r.choice([2, 4])
    return dict(hidden_size=r.choice([32, 48, 64]), num_hidden_layers=r.randint(2, 4), num_attention_heads=heads,
                num_key_value_heads=r.choice([k for k in (1, 2, 4) if heads % k == 0]),
                intermediate_size=r.choice([40, 64]), vocab_size=r.choice([100, 160, 250]),
                max_position_embeddings=128, bos_token_id=1, eos_token_id=2, pad_token_id=0,
                tie_word_embeddings=r.random() < 0.5)


def _types(r: random.Random, n: int) -> list[str]:
    return [r.choice(["sliding_attention", "full_attention"]) for _ in range(n)]


def _llama3(r, kw):
    kw.update(head_dim=r.choice([8, 16]), rope_parameters={
        "rope_type": "llama3", "factor": r.choice([2.0, 8.0]), "low_freq_factor": 1.0,
        "high_freq_factor": r.choice([2.0, 4.0]), "original_max_position_embeddings": r.choice([8, 16, 32]),
        "rope_theta": r.choice([10000.0, 500000.0])})
    return T.LlamaForCausalLM, T.LlamaConfig


def _qwen2(r, kw):
    kw.update(use_sliding_window=True, sliding_window=r.randint(2, 6),
              max_window_layers=r.randint(0, kw["num_hidden_layers"] - 1))
    return T.Qwen2ForCausalLM, T.Qwen2Config


def _qwen3(r, kw):
    kw.update(head_dim=r.choice([8, 16]), attention_bias=r.random() < 0.5)
    if r.random() < 0.5:  # explicit layer_types with a window
        kw.update(use_sliding_window=True, sliding_window=r.randint(2, 6),
                  layer_types=_types(r, kw["num_hidden_layers"]))
    return T.Qwen3ForCausalLM, T.Qwen3Config


def _mistral(r, kw):
    kw.update(head_dim=r.choice([8, 16]), sliding_window=r.choice([None, 2, 3, 5]))
    return T.MistralForCausalLM, T.MistralConfig


def _gemma(r, kw):
    kw.update(head_dim=r.choice([8, 16]), sliding_window=r.randint(2, 6), query_pre_attn_scalar=r.choice([8, 24]),
              final_logit_softcapping=r.choice([None, 0.5, 2.0]))
    if r.random() < 0.5:
        kw["layer_types"] = _types(r, kw["num_hidden_layers"])


def _gemma2(r, kw):
    _gemma(r, kw)
    kw["attn_logit_softcapping"] = r.choice([None, 0.3, 2.0])
    return T.Gemma2ForCausalLM, T.Gemma2Config


def _gemma3(r, kw):
    _gemma(r, kw)
    if "layer_types" not in kw:
        kw["sliding_window_pattern"] = r.choice([2, 3])
    full = r.choice([{"rope_type": "default"}, {"rope_type": "linear", "factor": r.choice([2.0, 8.0])}])
    kw["rope_parameters"] = {"full_attention": {**full, "rope_theta": r.choice([1e6, 5e4])},
                             "sliding_attention": {"rope_type": "default", "rope_theta": r.choice([1e4, 100.0])}}
    return T.Gemma3ForCausalLM, T.Gemma3TextConfig


def _phi3(r, kw):
    head = kw["hidden_size"] // kw["num_attention_heads"]
    kw.update(sliding_window=r.choice([None, 3, 5]),
              partial_rotary_factor=r.choice([p for p in (0.5, 0.75, 1.0) if int(head * p) % 2 == 0]))
    return T.Phi3ForCausalLM, T.Phi3Config


DRAW = {"llama3": _llama3, "qwen2": _qwen2, "qwen3": _qwen3, "mistral": _mistral, "gemma2": _gemma2,
        "gemma3_text": _gemma3, "phi3": _phi3}
CASES = [(family, seed) for family in DRAW for seed in range(4)]

_pairs = {}


def _pair(tmp_path_factory, family: str, seed: int):
    """(transformers model, qkv model, config kwargs) on one random configuration of ``family``. Norm
    weights and biases get noise (Gemma's (1 + w) norms start at w = 0, where offset bugs would hide)."""
    if (family, seed) not in _pairs:
        r = random.Random(f"{family}-{seed}")
        kw = _sizes(r)
        cls, cfg_cls = DRAW[family](r, kw)
        torch.manual_seed(seed)
        hf = cls(cfg_cls(**kw, attn_implementation="eager")).eval()
        with torch.no_grad():
            for p in hf.parameters():
                if p.dim() == 1:
                    p.add_(torch.randn_like(p) * 0.3)
        folder = tmp_path_factory.mktemp(f"{family}-{seed}")
        hf.save_pretrained(folder)
        _pairs[family, seed] = hf, qkv.load(folder), kw
    return _pairs[family, seed]


def _batch(vocab: int, B: int, T: int, pads: list[int], seed: int):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(3, vocab, (B, T), generator=g)
    mask = torch.ones(B, T, dtype=torch.long)
    for b, n in enumerate(pads):
        mask[b, :n] = 0
    return ids, mask


@pytest.mark.parametrize("family,seed", CASES)
def test_logits_equal_transformers_on_a_left_padded_batch(tmp_path_factory, family, seed):
    hf, model, kw = _pair(tmp_path_factory, family, seed)
    ids, mask = _batch(kw["vocab_size"], 3, 13, [0, 3, 6], seed)
    with torch.no_grad():
        want = hf(input_ids=ids, attention_mask=mask).logits
        got = model(ids, mask).logits
        alone = model(ids[:1]).logits  # no padding: the mask-free path
    valid = mask.bool()  # transformers' rows of padding tokens are garbage: compare real tokens
    torch.testing.assert_close(got[valid], want[valid], rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(alone, want[:1], rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("family,seed", CASES)
def test_greedy_tokens_equal_transformers_with_a_cache(tmp_path_factory, family, seed):
    hf, model, kw = _pair(tmp_path_factory, family, seed)
    ids, mask = _batch(kw["vocab_size"], 2, 9, [0, 4], seed + 7)
    with torch.no_grad():
        want = hf.generate(input_ids=ids, attention_mask=mask, max_new_tokens=12, do_sample=False, num_beams=1,
                           pad_token_id=0)
    got = model.generate(ids, mask, max_new_tokens=12, pad_token_id=0)
    assert torch.equal(got, want), f"\nqkv  {got.tolist()}\nhf   {want.tolist()}"


def test_configs_map_onto_the_features(tmp_path_factory):
    """The family settings land where they should (a wrong mapping could still agree on tiny inputs)."""
    _, gemma, kw = _pair(tmp_path_factory, "gemma2", 0)
    c = gemma.config
    assert c.norm_offset == 1.0 and c.post_norms and c.embed_scale == kw["hidden_size"] ** 0.5
    assert c.attn_scale == kw["query_pre_attn_scalar"] ** -0.5 and c.sliding_window == kw["sliding_window"]
    _, qwen, _ = _pair(tmp_path_factory, "qwen2", 0)
    layer = qwen.stack.layers[0].attn
    assert layer.qkv.bias is not None and layer.o.bias is None
    _, gemma3, _ = _pair(tmp_path_factory, "gemma3_text", 0)
    assert gemma3.local_rotary is not None and gemma3.config.qk_norm == "rms"


def _edited(tmp_path, family: str, edit: dict, drop=()) -> str:
    save_family(tmp_path, family)
    cfg = json.loads((tmp_path / "config.json").read_text())
    cfg = {k: v for k, v in {**cfg, **edit}.items() if k not in drop}
    (tmp_path / "config.json").write_text(json.dumps(cfg))
    return str(tmp_path)


_LONGROPE = {"rope_type": "longrope", "short_factor": [1.0] * 2, "long_factor": [2.0] * 2, "rope_theta": 1e4}
# (family, config.json changes, the field the refusal names)
REFUSED = [
    ("phi3", {"rope_parameters": _LONGROPE}, "rope_parameters"),
    ("phi3", {"rope_scaling": {**_LONGROPE, "type": "su"}}, "rope_scaling"),
    # head_dim 8 * 0.7: 5 rotated features, an odd count transformers pads to 6 with exponents over 5
    ("phi3", {"rope_parameters": {"rope_type": "default", "rope_theta": 1e4, "partial_rotary_factor": 0.7}},
     "partial_rotary_factor"),
    ("qwen3", {"rope_parameters": {"rope_type": "yarn", "factor": 4.0, "rope_theta": 1e4}}, "rope_parameters"),
    ("mistral", {"rope_parameters": {"rope_type": "dynamic", "factor": 2.0, "rope_theta": 1e4}}, "rope_parameters"),
    ("llama", {"rope_parameters": {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                                   "high_freq_factor": 4.0, "original_max_position_embeddings": 16,
                                   "rope_theta": 1e4, "partial_rotary_factor": 0.5}}, "rope_parameters"),
    ("llama", {"rope_parameters": {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 4.0,
                                   "high_freq_factor": 1.0, "rope_theta": 1e4}}, "rope_parameters"),
    ("llama", {"rope_parameters": {"rope_type": "linear", "rope_theta": 1e4}}, "rope_parameters"),
    ("qwen2", {"layer_types": ["full_attention", "chunked_attention"]}, "layer_types"),
    ("qwen2", {"layer_types": ["full_attention", "sliding_attention"], "use_sliding_window": False},
     "layer_types"),
    ("qwen2", {"layer_types": ["full_attention"]}, "layer_types"),
    ("gemma2", {"use_bidirectional_attention": True}, "use_bidirectional_attention"),
    ("gemma2", {"sliding_window": None}, "layer_types"),
    ("gemma3_text", {"use_bidirectional_attention": True}, "use_bidirectional_attention"),
    ("gemma3_text", {"rope_parameters": {"rope_type": "default", "rope_theta": 1e4}}, "rope_parameters"),
    ("gemma3_text", {"rope_parameters": {"full_attention": {"rope_type": "default", "rope_theta": 1e6},
                                         "sliding_attention": {"rope_type": "linear", "factor": 2.0,
                                                               "rope_theta": 1e4}}}, "rope_parameters"),
    ("gemma3_text", {"model_type": "gemma3"}, "gemma3"),
    ("gemma2", {"hidden_activation": "tanh"}, "hidden_activation"),
]


@pytest.mark.parametrize("family,edit,field", REFUSED, ids=[f"{c[0]}-{c[2]}-{i}" for i, c in enumerate(REFUSED)])
def test_settings_qkv_does_not_compute_are_refused_by_name(tmp_path, family, edit, field):
    folder = _edited(tmp_path, family, edit)
    with pytest.raises(ConversionError, match=rf"\b{field}\b"):
        qkv.load(folder)


def test_every_new_family_refuses_an_unknown_field(tmp_path):
    for family in DRAW:
        name = "llama" if family == "llama3" else family
        folder = _edited(tmp_path / name, name, {"attention_sink_tokens": 4})
        with pytest.raises(ConversionError, match=r"attention_sink_tokens"):
            qkv.load(folder)


def test_gemma3_legacy_rope_fields():
    """Older Gemma 3 configs: rope_theta (global), rope_local_base_freq (local), rope_scaling (global only)."""
    from qkv.convert import huggingface

    _, cfg_cls, kwargs = FAMILIES["gemma3_text"]
    cfg = cfg_cls(**kwargs).to_dict()
    cfg.pop("rope_parameters")
    cfg.update(rope_theta=5e5, rope_local_base_freq=123.0, rope_scaling={"rope_type": "linear", "factor": 8.0})
    _, c = huggingface.config_from_hf(cfg)
    assert (c.rope_theta, c.rope_local_theta, c.rope_scaling, c.rope_factor) == (5e5, 123.0, "linear", 8.0)


@pytest.mark.parametrize("bad,field", [
    (dict(layer_types=["full", "local"]), "layer_types"), (dict(layer_types=["sliding", "full"]), "sliding_window"),
    (dict(rope_scaling="yarn"), "rope_scaling"), (dict(attn_softcap=0.0), "attn_softcap"),
    (dict(sliding_window=0), "sliding_window"), (dict(rope_factor=-1.0), "rope_factor"),
    (dict(rope_scaling="llama3", rope_low_freq_factor=4.0, rope_high_freq_factor=4.0), "rope_high_freq_factor"),
])
def test_config_checks_the_new_fields(bad, field):
    with pytest.raises(ValueError, match=field):
        CausalLMConfig(vocab_size=50, dim=16, n_layers=2, n_heads=2, ffn_dim=32, positions="rotary", **bad)


@pytest.mark.parametrize("family,seed", [("mistral", 1), ("gemma2", 0), ("gemma3_text", 1), ("qwen2", 0)])
def test_cached_steps_equal_the_full_forward_across_the_window(tmp_path_factory, family, seed):
    """Prefill 6 tokens, then decode one at a time past the window (2-6 tokens) with step masks: each
    step's logits equal the full forward's, left padding included, on every backend that serves the call."""
    from qkv.models._base import positions_from_mask
    from qkv.nn import KVCache

    _, model, kw = _pair(tmp_path_factory, family, seed)
    ids, mask = _batch(kw["vocab_size"], 2, 16, [0, 5], seed + 11)
    pos = positions_from_mask(mask)
    backends = ["chunked", "auto"] + ([] if model.config.attn_softcap else ["sdpa"])
    with torch.no_grad():
        full = model.set_backend("eager")(ids, mask, pos).logits
        for backend in backends:
            model.set_backend(backend)
            torch.testing.assert_close(model(ids, mask, pos).logits[mask.bool()], full[mask.bool()],
                                       rtol=1e-4, atol=1e-5)
            cache = KVCache(model.config.n_layers, capacity=4)
            steps = [model(ids[:, :6], mask[:, :6], pos[:, :6], cache=cache).logits[:, -1]]
            for t in range(6, 16):
                steps.append(model(ids[:, t:t + 1], mask[:, :t + 1], pos[:, t:t + 1], cache=cache).logits[:, -1])
            torch.testing.assert_close(torch.stack(steps[:-1], 1)[:, :], full[:, 5:15], rtol=1e-4, atol=1e-5)
        model.set_backend("auto")


_META = {"architectures": ["X"], "torch_dtype": "bfloat16", "transformers_version": "4.44.0", "use_cache": True,
         "initializer_range": 0.02, "attention_dropout": 0.0}
_SIZES = {"vocab_size": 128, "hidden_size": 64, "intermediate_size": 96, "num_hidden_layers": 4,
          "num_attention_heads": 4, "num_key_value_heads": 2, "max_position_embeddings": 256, "rms_norm_eps": 1e-5}
# The field sets of released checkpoints' config.json (sizes shrunk): they load, with the settings that matter.
HUB = {
    "llama-3.1": ({"model_type": "llama", "hidden_act": "silu", "bos_token_id": 1, "eos_token_id": [2, 3],
                   "mlp_bias": False, "attention_bias": False, "pretraining_tp": 1, "rope_theta": 500000.0,
                   "rope_scaling": {"factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                                    "original_max_position_embeddings": 64, "rope_type": "llama3"},
                   "tie_word_embeddings": False, "head_dim": 16},
                  {"rope_scaling": "llama3", "rope_factor": 8.0, "rope_original_max_positions": 64}),
    "qwen2.5": ({"model_type": "qwen2", "hidden_act": "silu", "bos_token_id": 1, "eos_token_id": 2,
                 "max_window_layers": 2, "rope_theta": 1000000.0, "sliding_window": 32, "use_sliding_window": False,
                 "tie_word_embeddings": True, "rope_scaling": None},
                {"qkv_bias": True, "bias": False, "layer_types": None}),
    "qwen3": ({"model_type": "qwen3", "hidden_act": "silu", "bos_token_id": 1, "eos_token_id": 2, "head_dim": 32,
               "attention_bias": False, "max_window_layers": 4, "rope_theta": 1000000.0, "rope_scaling": None,
               "sliding_window": None, "use_sliding_window": False, "tie_word_embeddings": True},
              {"qk_norm": "rms", "head_dim": 32}),
    "mistral-v0.1": ({"model_type": "mistral", "hidden_act": "silu", "bos_token_id": 1, "eos_token_id": 2,
                      "rope_theta": 10000.0, "sliding_window": 16, "tie_word_embeddings": False},
                     {"layer_types": ["sliding"] * 4, "sliding_window": 16}),
    "gemma-2": ({"model_type": "gemma2", "attn_logit_softcapping": 50.0, "final_logit_softcapping": 30.0,
                 "cache_implementation": "hybrid", "head_dim": 16, "hidden_act": "gelu_pytorch_tanh",
                 "hidden_activation": "gelu_pytorch_tanh", "query_pre_attn_scalar": 16, "sliding_window": 16,
                 "sliding_window_size": 16, "rope_theta": 10000.0, "bos_token_id": 2, "eos_token_id": 1,
                 "pad_token_id": 0, "attention_bias": False},
                {"layer_types": ["sliding", "full"] * 2, "attn_softcap": 50.0, "final_softcap": 30.0,
                 "norm_offset": 1.0, "post_norms": True, "activation": "geglu_tanh"}),
    "gemma-3-1b": ({"model_type": "gemma3_text", "attn_logit_softcapping": None, "final_logit_softcapping": None,
                    "cache_implementation": "hybrid", "head_dim": 16, "hidden_activation": "gelu_pytorch_tanh",
                    "query_pre_attn_scalar": 16, "rope_local_base_freq": 10000, "rope_scaling": None,
                    "rope_theta": 1000000, "sliding_window": 8, "sliding_window_pattern": 2, "bos_token_id": 2,
                    "eos_token_id": [1, 106], "pad_token_id": 0, "attention_bias": False},
                   {"layer_types": ["sliding", "full"] * 2, "rope_theta": 1e6, "rope_local_theta": 1e4,
                    "qk_norm": "rms", "attn_scale": 0.25}),
    "phi-3-mini-4k": ({"model_type": "phi3", "auto_map": {"AutoConfig": "configuration_phi3.Phi3Config"},
                       "attention_bias": False, "bos_token_id": 1, "embd_pdrop": 0.0, "eos_token_id": 32000 % 128,
                       "hidden_act": "silu", "original_max_position_embeddings": 256, "pad_token_id": 3,
                       "resid_pdrop": 0.0, "rope_scaling": None, "rope_theta": 10000.0, "sliding_window": 15,
                       "tie_word_embeddings": False},
                      {"layer_types": ["sliding"] * 4, "sliding_window": 15, "rotary_dim": 16}),
}


@pytest.mark.parametrize("name", sorted(HUB))
def test_released_config_field_sets_load(name):
    from qkv.convert import huggingface

    fields, want = HUB[name]
    family, config = huggingface.config_from_hf({**_META, **_SIZES, **fields})
    assert family == "causal_lm"
    for key, value in want.items():
        assert getattr(config, key) == value, (key, getattr(config, key), value)
