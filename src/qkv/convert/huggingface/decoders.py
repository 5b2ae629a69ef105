"""Hugging Face decoder-only checkpoints beyond Llama: Qwen 2 / 3, Mistral, Gemma 2 / 3 (text), Phi-3.

Each is a setting of `CausalLMConfig`; the config builders read ``config.json`` through the family's
table (`_tables`) and refuse by name what qkv does not compute (longrope, chunked attention layers,
bidirectional Gemma, ...). RoPE parameters are read as transformers reads them (`rope`).
"""

from __future__ import annotations

import math
from collections.abc import Mapping

import torch

from ...models import CausalLMConfig
from .._keymap import KeyMap, find_prefix
from . import _tables
from ._common import GATED, _activation, _first, build
from ._fields import Fields, read_fields
from ._layers import attention, linear

_ATTN = ("q_proj", "k_proj", "v_proj", "o_proj")
_KINDS = {"full_attention": "full", "sliding_attention": "sliding"}
_ROPE_COMMON = {"rope_type", "type", "rope_theta", "partial_rotary_factor"}
_ROPE_KEYS = {"default": _ROPE_COMMON, "linear": _ROPE_COMMON | {"factor"},
              "llama3": _ROPE_COMMON | {"factor", "low_freq_factor", "high_freq_factor",
                                        "original_max_position_embeddings"}}
NAMES = dict(dim="hidden_size", n_layers="num_hidden_layers", n_heads="num_attention_heads",
             n_kv_heads="num_key_value_heads", ffn_dim="intermediate_size", max_positions="max_position_embeddings",
             norm_eps="rms_norm_eps", sliding_window="sliding_window", rotary_dim="partial_rotary_factor")


def _number(f: Fields, which: str, rope: Mapping, key: str, default=None, positive: bool = True) -> float:
    value = rope.get(key, default)
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) \
            or (positive and not value > 0):
        raise f.refuse(which, f"its {key}={value!r} must be a number > 0")
    return value


def rope(f: Fields, which: str, params: Mapping | None, theta_default: float, scaled: bool = True) -> dict:
    """CausalLMConfig fields for one RoPE parameter dict (``params``, read from field ``which``): its base,
    and with ``scaled`` its "linear" / "llama3" scaling; other rope types (dynamic, yarn, longrope...) and
    unknown keys are refused by name. ``partial_rotary_factor`` is the caller's."""
    params = params or {}
    kind = params.get("rope_type", params.get("type", "default")) or "default"
    allowed = _ROPE_KEYS.get(kind) if scaled else _ROPE_KEYS["default"] if kind == "default" else None
    if allowed is None:
        raise f.refuse(which, f"qkv implements rope_type 'default', 'linear' and 'llama3'"
                              f"{'' if scaled else ' (local layers: default only)'}, not {kind!r}; use transformers")
    extra = sorted(set(params) - allowed)
    if extra:
        raise f.refuse(which, f"qkv does not implement its {extra} for rope_type {kind!r}; use transformers")
    out = {"rope_theta": float(_number(f, which, params, "rope_theta", theta_default))}
    if kind == "linear":
        out.update(rope_scaling="linear", rope_factor=float(_number(f, which, params, "factor")))
    elif kind == "llama3":
        original = params.get("original_max_position_embeddings", f["max_position_embeddings"])
        if isinstance(original, bool) or not isinstance(original, int) or original < 1:
            raise f.refuse(which, f"its original_max_position_embeddings={original!r} must be an integer >= 1")
        out.update(rope_scaling="llama3", rope_factor=float(_number(f, which, params, "factor")),
                   rope_low_freq_factor=float(_number(f, which, params, "low_freq_factor")),
                   rope_high_freq_factor=float(_number(f, which, params, "high_freq_factor")),
                   rope_original_max_positions=original)
        if not out["rope_high_freq_factor"] > out["rope_low_freq_factor"]:
            raise f.refuse(which, "its high_freq_factor must be greater than low_freq_factor")
    return out


def rope_fields(f: Fields) -> tuple[dict, float]:
    """(CausalLMConfig rope fields, partial_rotary_factor) of a single-rope family: as transformers,
    rope_scaling wins over rope_parameters, and a top-level rope_theta fills in a missing one."""
    which = "rope_scaling" if f["rope_scaling"] else "rope_parameters"
    params = f[which] or {}
    factor = params.get("partial_rotary_factor", 1.0)
    if isinstance(factor, bool) or not isinstance(factor, (int, float)) or not 0 < factor <= 1:
        raise f.refuse(which, f"its partial_rotary_factor={factor!r} must be in (0, 1]")
    return rope(f, which, params, f["rope_theta"]), factor


def layer_kinds(f: Fields, types: list[str] | None, window: int | None, n: int) -> tuple[list[str] | None, int | None]:
    """(qkv layer_types or None when every layer is full, the window) from transformers' layer_types."""
    if types is None:
        return None, None
    if len(types) != n or set(types) - set(_KINDS):
        raise f.refuse("layer_types", f"qkv needs one of {sorted(_KINDS)} for each of the {n} layers")
    kinds = [_KINDS[t] for t in types]
    if "sliding" not in kinds:
        return None, None
    if window is None:
        raise f.refuse("layer_types", "it names sliding_attention layers but sliding_window is null; set the window")
    return kinds, window


def _read(cfg: Mapping, kind: str, source: str) -> Fields:
    return read_fields(cfg, _tables.TABLES[kind], _tables.FAMILY_NAMES[kind], source)


def _common(f: Fields, head_dim: int | None = None, activation: str | None = None) -> dict:
    dim, heads = f["hidden_size"], f["num_attention_heads"]
    pad = f["pad_token_id"]
    return dict(
        vocab_size=f["vocab_size"], dim=dim, n_layers=f["num_hidden_layers"], n_heads=heads,
        n_kv_heads=_first(f["num_key_value_heads"], heads), head_dim=_first(head_dim, f["head_dim"], dim // heads),
        ffn_dim=f["intermediate_size"], max_positions=f["max_position_embeddings"], positions="rotary",
        norm="rms", norm_eps=f["rms_norm_eps"], activation=GATED[_activation(activation or f["hidden_act"])],
        bias=False, mlp_bias=False, tie_embeddings=f["tie_word_embeddings"], bos_token_id=f["bos_token_id"],
        eos_token_id=f["eos_token_id"], pad_token_id=None if pad == -1 else pad,
    )


def _single_rope(f: Fields) -> dict:
    fields, factor = rope_fields(f)
    if factor != 1.0:
        raise f.refuse("rope_parameters", f"partial_rotary_factor={factor} is not read by this family's default "
                                          "rotary embedding in transformers, which rotates whole heads; remove it")
    return fields


def qwen_config(cfg: Mapping, source: str = "config.json", kind: str = "qwen2") -> CausalLMConfig:
    """Qwen2 / Qwen2.5 (q, k, v biases) and Qwen3 (q/k RMSNorm per head, attention_bias)."""
    f = _read(cfg, kind, source)
    n = f["num_hidden_layers"]
    window = f["sliding_window"] if f["use_sliding_window"] else None
    types = f["layer_types"]
    if types is None:
        types = ["sliding_attention" if window is not None and i >= f["max_window_layers"] else "full_attention"
                 for i in range(n)]
    kinds, window = layer_kinds(f, types, window, n)
    extra = (dict(qkv_bias=True, bias=False) if kind == "qwen2"
             else dict(bias=f["attention_bias"], qk_norm="rms"))
    return build(CausalLMConfig, f, NAMES, **{**_common(f), **_single_rope(f), **extra, "layer_types": kinds,
                                              "sliding_window": window})


def mistral_config(cfg: Mapping, source: str = "config.json") -> CausalLMConfig:
    """Mistral: Llama with a sliding window over every layer (``sliding_window`` null: full attention)."""
    f = _read(cfg, "mistral", source)
    window = f["sliding_window"]
    n = f["num_hidden_layers"]
    return build(CausalLMConfig, f, NAMES, **_common(f), **_single_rope(f),
                 layer_types=None if window is None else ["sliding"] * n, sliding_window=window)


def phi3_config(cfg: Mapping, source: str = "config.json") -> CausalLMConfig:
    """Phi-3: fused qkv and gate_up projections, partial rotary, sliding window over every layer."""
    f = _read(cfg, "phi3", source)
    which = "rope_scaling" if f["rope_scaling"] else "rope_parameters"
    params = dict(f[which] or {})
    params.setdefault("partial_rotary_factor", f["partial_rotary_factor"])
    if params.get("rope_type", params.get("type")) in ("su", "yarn", "longrope"):
        raise f.refuse(which, "qkv does not implement Phi-3's longrope (short_factor / long_factor); use "
                              "transformers, or a 4k-context Phi-3")
    fields = rope(f, which, params, f["rope_theta"])
    factor = params["partial_rotary_factor"]
    common = _common(f)
    rotary = int(common["head_dim"] * factor)
    if not 0 < factor <= 1 or rotary % 2:
        raise f.refuse("partial_rotary_factor", f"it gives {rotary} rotated features per head; qkv needs an even "
                                                "number >= 2")
    window, n = f["sliding_window"], f["num_hidden_layers"]
    return build(CausalLMConfig, f, NAMES, **common, **fields, rotary_dim=rotary,
                 layer_types=None if window is None else ["sliding"] * n, sliding_window=window)


def gemma_config(cfg: Mapping, source: str = "config.json", kind: str = "gemma2") -> CausalLMConfig:
    """Gemma 2 and Gemma 3 (text): (1 + w) RMSNorms, sandwich norms, sqrt(dim) embedding scale,
    query_pre_attn_scalar, softcaps, alternating local (sliding) and global layers; Gemma 3 adds q/k
    norms and a rotary base of its own for the local layers."""
    f = _read(cfg, kind, source)
    n, dim = f["num_hidden_layers"], f["hidden_size"]
    types = f["layer_types"]
    if types is None:
        every = 2 if kind == "gemma2" else f["sliding_window_pattern"]
        types = ["sliding_attention" if (i + 1) % every else "full_attention" for i in range(n)]
    kinds, window = layer_kinds(f, types, f["sliding_window"], n)
    extra = {}
    if kind == "gemma2":
        extra.update(_single_rope(f))
    else:
        extra.update(_gemma3_rope(f))
        extra["qk_norm"] = "rms"
    return build(CausalLMConfig, f, NAMES, **{
        **_common(f, activation=f["hidden_activation"]), **extra, "bias": f["attention_bias"],
        "layer_types": kinds, "sliding_window": window, "attn_scale": f["query_pre_attn_scalar"] ** -0.5,
        "attn_softcap": f["attn_logit_softcapping"] if kind == "gemma2" else None, "final_softcap": f["final_logit_softcapping"],
        "embed_scale": dim ** 0.5, "norm_offset": 1.0, "post_norms": True})


def _gemma3_rope(f: Fields) -> dict:
    """Gemma 3's rope: rope_parameters {"full_attention": {...}, "sliding_attention": {...}} (transformers
    >= 5), or the older rope_theta / rope_local_base_freq / rope_scaling (which scales the global layers)."""
    params = f["rope_parameters"]
    if params and ("full_attention" in params or "sliding_attention" in params):
        extra = sorted(set(params) - {"full_attention", "sliding_attention"})
        if extra or f["rope_scaling"]:
            raise f.refuse("rope_parameters", f"qkv reads its full_attention and sliding_attention entries only, "
                                              f"not {extra or 'rope_scaling beside them'}")
        full, local = params.get("full_attention") or {}, params.get("sliding_attention") or {}
    elif params:  # transformers would ignore a flat dict here and fall back to rope_theta: refuse the doubt
        raise f.refuse("rope_parameters", "Gemma 3 reads {\"full_attention\": {...}, \"sliding_attention\": {...}}; "
                                          "give the rope parameters per layer type")
    else:
        full, local = dict(f["rope_scaling"] or {}), {}
    out = rope(f, "rope_parameters", full, f["rope_theta"])
    out["rope_local_theta"] = rope(f, "rope_parameters", local, f["rope_local_base_freq"], scaled=False)["rope_theta"]
    if full.get("partial_rotary_factor", 1.0) != 1.0 or local.get("partial_rotary_factor", 1.0) != 1.0:
        raise f.refuse("rope_parameters", "Gemma 3's rotary embedding rotates whole heads; remove "
                                              "partial_rotary_factor")
    return out


def decoder(sd: Mapping[str, torch.Tensor], config: CausalLMConfig, *, fused: bool = False) -> dict[str, torch.Tensor]:
    """Llama, Qwen 2 / 3, Mistral, Gemma 2 / 3, Phi-3 (``*ForCausalLM`` or the bare model) -> CausalLM
    (q, k, v and gate, up fused). ``fused``: Phi-3's qkv_proj and gate_up_proj, already in qkv's layout
    (q, k, v rows; gate then up). Biases as the config says: q, k, v (``qkv_bias``), o (``bias``) and the
    feed-forward's (``mlp_bias``, Llama's)."""
    km = KeyMap(sd, find_prefix(sd, "embed_tokens.weight", ("", "model.")))
    km.ignore(r".*rotary_emb\..*inv_freq")
    km.copy("tokens.weight", "embed_tokens.weight")
    qkv_bias = config.bias if config.qkv_bias is None else config.qkv_bias
    mlp_bias = config.bias if config.mlp_bias is None else config.mlp_bias
    for i in range(config.n_layers):
        lk = km.within(f"layers.{i}.", f"stack.layers.{i}.")
        if fused:
            linear(lk, "attn.qkv", "self_attn.qkv_proj", bias=False)
            linear(lk, "attn.o", "self_attn.o_proj", bias=False)
            linear(lk, "ffn.up", "mlp.gate_up_proj", bias=False)
        else:
            attention(lk, "attn.", "self_attn.", _ATTN, bias=qkv_bias, out_bias=config.bias)
            for w in ("weight", "bias") if mlp_bias else ("weight",):
                lk.cat(f"ffn.up.{w}", [f"mlp.gate_proj.{w}", f"mlp.up_proj.{w}"])
        linear(lk, "ffn.down", "mlp.down_proj", bias=mlp_bias)
        if config.qk_norm:
            linear(lk, "attn.q_norm", "self_attn.q_norm", bias=False)
            linear(lk, "attn.k_norm", "self_attn.k_norm", bias=False)
        linear(lk, "attn_norm", "input_layernorm", bias=False)
        if config.post_norms:  # Gemma: post_attention_layernorm is the norm *after* attention
            linear(lk, "post_attn_norm", "post_attention_layernorm", bias=False)
            linear(lk, "ffn_norm", "pre_feedforward_layernorm", bias=False)
            linear(lk, "post_ffn_norm", "post_feedforward_layernorm", bias=False)
        else:
            linear(lk, "ffn_norm", "post_attention_layernorm", bias=False)
    linear(km, "stack.norm", "norm", bias=False)
    km.scope("").head("lm_head.weight", "lm_head.weight", tied_to="tokens.weight", tied=config.tie_embeddings)
    return km.result()


def phi3(sd: Mapping[str, torch.Tensor], config: CausalLMConfig) -> dict[str, torch.Tensor]:
    return decoder(sd, config, fused=True)
