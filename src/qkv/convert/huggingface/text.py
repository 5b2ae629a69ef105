"""Hugging Face text checkpoints: BERT (and its task heads), GPT-2, Llama, T5, BART."""

from __future__ import annotations

import math
from collections.abc import Mapping

import torch

from ...models import CausalLMConfig, Seq2SeqConfig, TextEncoderConfig
from .._keymap import ConversionError, KeyMap
from ._common import TEXT_HEADS, _activation, _arch, _first, _labels, _no_leftovers, _prefix


def bert_config(cfg: Mapping, keys: set[str] = frozenset()) -> TextEncoderConfig:
    if cfg.get("position_embedding_type", "absolute") != "absolute":
        raise ConversionError(f"position_embedding_type={cfg['position_embedding_type']!r}: only 'absolute' is supported")
    arch = _arch(cfg)
    head = next((h for suffix, h in TEXT_HEADS.items() if arch.endswith(suffix)), None)
    n_labels, labels = _labels(cfg)
    pooler = head == "sequence_classification" or any(k.endswith("pooler.dense.weight") for k in keys)
    return TextEncoderConfig(
        vocab_size=cfg["vocab_size"], dim=cfg["hidden_size"], n_layers=cfg["num_hidden_layers"],
        n_heads=cfg["num_attention_heads"], ffn_dim=cfg["intermediate_size"],
        max_positions=cfg["max_position_embeddings"], type_vocab_size=cfg.get("type_vocab_size", 2),
        activation=_activation(cfg.get("hidden_act", "gelu")), norm_eps=cfg.get("layer_norm_eps", 1e-12),
        dropout=cfg.get("hidden_dropout_prob", 0.1), attn_dropout=cfg.get("attention_probs_dropout_prob", 0.1),
        pad_token_id=cfg.get("pad_token_id") or 0, pooler=pooler, head=head,
        num_labels=n_labels if head in ("sequence_classification", "token_classification") else 2,
        labels=labels if head in ("sequence_classification", "token_classification") else None,
        max_length=cfg["max_position_embeddings"],
    )


def gpt2_config(cfg: Mapping) -> CausalLMConfig:
    for flag in ("scale_attn_by_inverse_layer_idx", "reorder_and_upcast_attn"):
        if cfg.get(flag):
            raise ConversionError(f"GPT-2 option {flag}=True is not supported")
    if cfg.get("scale_attn_weights", True) is False:
        raise ConversionError("GPT-2 option scale_attn_weights=False (unscaled attention) is not supported")
    dim = cfg["n_embd"]
    return CausalLMConfig(
        vocab_size=cfg["vocab_size"], dim=dim, n_layers=cfg["n_layer"], n_heads=cfg["n_head"],
        ffn_dim=cfg.get("n_inner") or 4 * dim, max_positions=cfg["n_positions"], positions="learned",
        norm="layer", norm_eps=cfg.get("layer_norm_epsilon", 1e-5),
        activation=_activation(cfg.get("activation_function", "gelu_new")), bias=True,
        tie_embeddings=cfg.get("tie_word_embeddings", True), bos_token_id=cfg.get("bos_token_id"),
        eos_token_id=cfg.get("eos_token_id"), pad_token_id=cfg.get("pad_token_id"),
    )


def llama_config(cfg: Mapping) -> CausalLMConfig:
    rope = cfg.get("rope_parameters") or cfg.get("rope_scaling") or {}
    kind = rope.get("rope_type", rope.get("type", "default"))
    if kind not in ("default", None):
        raise ConversionError(f"rope scaling {kind!r} is not supported (only default rotary positions)")
    if _activation(cfg.get("hidden_act", "silu")) != "silu":
        raise ConversionError(f"Llama hidden_act={cfg.get('hidden_act')!r}: only silu (SwiGLU) is supported")
    if cfg.get("attention_bias") != cfg.get("mlp_bias", cfg.get("attention_bias")):
        raise ConversionError("attention_bias and mlp_bias must agree")
    dim, heads = cfg["hidden_size"], cfg["num_attention_heads"]
    return CausalLMConfig(
        vocab_size=cfg["vocab_size"], dim=dim, n_layers=cfg["num_hidden_layers"], n_heads=heads,
        n_kv_heads=cfg.get("num_key_value_heads") or heads, head_dim=cfg.get("head_dim") or dim // heads,
        ffn_dim=cfg["intermediate_size"], max_positions=cfg.get("max_position_embeddings", 2048),
        positions="rotary", rope_theta=rope.get("rope_theta", cfg.get("rope_theta", 10000.0)), norm="rms",
        norm_eps=cfg.get("rms_norm_eps", 1e-6), activation="swiglu", bias=bool(cfg.get("attention_bias", False)),
        tie_embeddings=cfg.get("tie_word_embeddings", False), bos_token_id=cfg.get("bos_token_id"),
        eos_token_id=cfg.get("eos_token_id"), pad_token_id=cfg.get("pad_token_id"),
    )


def t5_config(cfg: Mapping) -> Seq2SeqConfig:
    ff = cfg.get("feed_forward_proj", "relu")
    acts = {"relu": "relu", "gated-gelu": "geglu_tanh", "gated-relu": "reglu", "gated-silu": "swiglu"}
    if ff not in acts:
        raise ConversionError(f"T5 feed_forward_proj={ff!r} is not supported; known: {sorted(acts)}")
    tie = cfg.get("tie_word_embeddings", True)
    return Seq2SeqConfig(
        vocab_size=cfg["vocab_size"], dim=cfg["d_model"], n_layers=cfg["num_layers"],
        n_decoder_layers=cfg.get("num_decoder_layers") or cfg["num_layers"], n_heads=cfg["num_heads"],
        head_dim=cfg["d_kv"], ffn_dim=cfg["d_ff"], positions="relative",
        relative_buckets=cfg.get("relative_attention_num_buckets", 32),
        relative_max_distance=cfg.get("relative_attention_max_distance", 128), norm="rms",
        norm_eps=cfg.get("layer_norm_epsilon", 1e-6), prenorm=True, final_norm=True, activation=acts[ff],
        bias=False, scale=1.0, tie_embeddings=tie,
        scale_decoder_output=cfg.get("scale_decoder_outputs", tie),  # transformers >= 5 states it explicitly
        decoder_start_token_id=_first(cfg.get("decoder_start_token_id"), cfg.get("pad_token_id"), 0),
        eos_token_id=_first(cfg.get("eos_token_id"), 1), pad_token_id=_first(cfg.get("pad_token_id"), 0),
    )


def bart_config(cfg: Mapping) -> Seq2SeqConfig:
    if cfg["encoder_attention_heads"] != cfg["decoder_attention_heads"] or cfg["encoder_ffn_dim"] != cfg["decoder_ffn_dim"]:
        raise ConversionError("BART checkpoints with different encoder and decoder widths are not supported")
    dim = cfg["d_model"]
    prenorm = bool(cfg.get("normalize_before", False))
    return Seq2SeqConfig(
        vocab_size=cfg["vocab_size"], dim=dim, n_layers=cfg["encoder_layers"], n_decoder_layers=cfg["decoder_layers"],
        n_heads=cfg["encoder_attention_heads"], head_dim=dim // cfg["encoder_attention_heads"],
        ffn_dim=cfg["encoder_ffn_dim"], positions="learned", max_positions=cfg["max_position_embeddings"],
        position_offset=2, norm="layer", norm_eps=1e-5, prenorm=prenorm,
        final_norm=bool(cfg.get("add_final_layer_norm", False)), embed_norm=True,
        activation=_activation(cfg.get("activation_function", "gelu")), bias=True, scale=None,
        embed_scale=math.sqrt(dim) if cfg.get("scale_embedding") else 1.0,
        tie_embeddings=cfg.get("tie_word_embeddings", True), scale_decoder_output=False, final_logits_bias=True,
        decoder_start_token_id=_first(cfg.get("decoder_start_token_id"), 2), eos_token_id=_first(cfg.get("eos_token_id"), 2),
        pad_token_id=_first(cfg.get("pad_token_id"), 1),
    )


def bert(sd: Mapping[str, torch.Tensor], config: TextEncoderConfig) -> dict[str, torch.Tensor]:
    """BertModel / BertFor{SequenceClassification,TokenClassification,QuestionAnswering} -> TextEncoder."""
    p = _prefix(sd, "embeddings.word_embeddings.weight", ("", "bert."))
    km = KeyMap(sd, p)
    km.ignore(r".*position_ids", r".*token_type_ids")
    km.copy("tokens.weight", "embeddings.word_embeddings.weight")
    km.copy("pos.weight", "embeddings.position_embeddings.weight")
    if config.type_vocab_size:
        km.copy("token_type.weight", "embeddings.token_type_embeddings.weight")
    km.copy("embed_norm.weight", "embeddings.LayerNorm.weight")
    km.copy("embed_norm.bias", "embeddings.LayerNorm.bias")
    for i in range(config.n_layers):
        s, t = f"encoder.layer.{i}.", f"encoder.layers.{i}."
        for w in ("weight", "bias"):
            km.cat(t + f"attn.qkv.{w}", [s + f"attention.self.{n}.{w}" for n in ("query", "key", "value")])
            km.copy(t + f"attn.o.{w}", s + f"attention.output.dense.{w}")
            km.copy(t + f"attn_norm.{w}", s + f"attention.output.LayerNorm.{w}")
            km.copy(t + f"ffn.up.{w}", s + f"intermediate.dense.{w}")
            km.copy(t + f"ffn.down.{w}", s + f"output.dense.{w}")
            km.copy(t + f"ffn_norm.{w}", s + f"output.LayerNorm.{w}")
    if config.pooler:
        km.copy("pooler.weight", "pooler.dense.weight")
        km.copy("pooler.bias", "pooler.dense.bias")
    head = KeyMap(sd)  # task heads sit outside the "bert." prefix
    if config.head is not None:
        name = "qa_outputs" if config.head == "question_answering" else "classifier"
        head.copy("classifier.weight", f"{name}.weight")
        head.copy("classifier.bias", f"{name}.bias")
    _no_leftovers(sd, km, head)
    return {**km.out, **head.out}


def _causal_head(km: KeyMap, sd, config: CausalLMConfig, embed_key: str, head_key: str, out: dict) -> None:
    if config.tie_embeddings:
        out["lm_head.weight"] = out["tokens.weight"]
        km.ignore(head_key)  # saved tied duplicates, if any
    else:
        km.copy("lm_head.weight", head_key)


def gpt2(sd: Mapping[str, torch.Tensor], config: CausalLMConfig) -> dict[str, torch.Tensor]:
    """GPT2Model / GPT2LMHeadModel -> CausalLM. GPT-2's Conv1D weights are (in, out): transposed."""
    p = _prefix(sd, "wte.weight", ("", "transformer."))
    km = KeyMap(sd, p)
    km.ignore(r".*attn\.bias", r".*attn\.masked_bias")
    km.copy("tokens.weight", "wte.weight")
    km.copy("pos.weight", "wpe.weight")
    for i in range(config.n_layers):
        s, t = f"h.{i}.", f"stack.layers.{i}."
        km.copy(t + "attn.qkv.weight", s + "attn.c_attn.weight", transpose=True)
        km.copy(t + "attn.qkv.bias", s + "attn.c_attn.bias")
        km.copy(t + "attn.o.weight", s + "attn.c_proj.weight", transpose=True)
        km.copy(t + "attn.o.bias", s + "attn.c_proj.bias")
        km.copy(t + "ffn.up.weight", s + "mlp.c_fc.weight", transpose=True)
        km.copy(t + "ffn.up.bias", s + "mlp.c_fc.bias")
        km.copy(t + "ffn.down.weight", s + "mlp.c_proj.weight", transpose=True)
        km.copy(t + "ffn.down.bias", s + "mlp.c_proj.bias")
        for w in ("weight", "bias"):
            km.copy(t + f"attn_norm.{w}", s + f"ln_1.{w}")
            km.copy(t + f"ffn_norm.{w}", s + f"ln_2.{w}")
    for w in ("weight", "bias"):
        km.copy(f"stack.norm.{w}", f"ln_f.{w}")
    top = KeyMap(sd)
    _causal_head(top, sd, config, "wte.weight", "lm_head.weight", km.out)
    _no_leftovers(sd, km, top)
    return {**km.out, **top.out}


def llama(sd: Mapping[str, torch.Tensor], config: CausalLMConfig) -> dict[str, torch.Tensor]:
    """LlamaModel / LlamaForCausalLM -> CausalLM (q, k, v and gate, up fused)."""
    p = _prefix(sd, "embed_tokens.weight", ("", "model."))
    km = KeyMap(sd, p)
    km.ignore(r".*rotary_emb\.inv_freq")
    km.copy("tokens.weight", "embed_tokens.weight")
    biases = ("weight", "bias") if config.bias else ("weight",)
    for i in range(config.n_layers):
        s, t = f"layers.{i}.", f"stack.layers.{i}."
        for w in biases:
            km.cat(t + f"attn.qkv.{w}", [s + f"self_attn.{n}_proj.{w}" for n in "qkv"])
            km.copy(t + f"attn.o.{w}", s + f"self_attn.o_proj.{w}")
            km.cat(t + f"ffn.up.{w}", [s + f"mlp.{n}_proj.{w}" for n in ("gate", "up")])
            km.copy(t + f"ffn.down.{w}", s + f"mlp.down_proj.{w}")
        km.copy(t + "attn_norm.weight", s + "input_layernorm.weight")
        km.copy(t + "ffn_norm.weight", s + "post_attention_layernorm.weight")
    km.copy("stack.norm.weight", "norm.weight")
    top = KeyMap(sd)
    _causal_head(top, sd, config, "embed_tokens.weight", "lm_head.weight", km.out)
    _no_leftovers(sd, km, top)
    return {**km.out, **top.out}


def _t5_attention(km: KeyMap, s: str, t: str, cross: bool) -> None:
    if cross:
        km.copy(t + "q.weight", s + "q.weight")
        km.cat(t + "kv.weight", [s + "k.weight", s + "v.weight"])
    else:
        km.cat(t + "qkv.weight", [s + n + ".weight" for n in "qkv"])
    km.copy(t + "o.weight", s + "o.weight")


def _t5_ffn(km: KeyMap, s: str, t: str, gated: bool) -> None:
    if gated:
        km.cat(t + "up.weight", [s + "wi_0.weight", s + "wi_1.weight"])
    else:
        km.copy(t + "up.weight", s + "wi.weight")
    km.copy(t + "down.weight", s + "wo.weight")


def t5(sd: Mapping[str, torch.Tensor], config: Seq2SeqConfig) -> dict[str, torch.Tensor]:
    """T5ForConditionalGeneration -> Seq2Seq."""
    km = KeyMap(sd)
    km.ignore(r"encoder\.embed_tokens\.weight", r"decoder\.embed_tokens\.weight")  # tied to shared
    km.copy("tokens.weight", "shared.weight")
    gated = config.activation in ("geglu_tanh", "reglu", "swiglu")
    km.copy("enc_side.rel.embedding.weight", "encoder.block.0.layer.0.SelfAttention.relative_attention_bias.weight")
    km.copy("dec_side.rel.embedding.weight", "decoder.block.0.layer.0.SelfAttention.relative_attention_bias.weight")
    for i in range(config.n_layers):
        s, t = f"encoder.block.{i}.layer.", f"encoder.layers.{i}."
        _t5_attention(km, s + "0.SelfAttention.", t + "attn.", cross=False)
        km.copy(t + "attn_norm.weight", s + "0.layer_norm.weight")
        _t5_ffn(km, s + "1.DenseReluDense.", t + "ffn.", gated)
        km.copy(t + "ffn_norm.weight", s + "1.layer_norm.weight")
    for i in range(config.n_decoder_layers or config.n_layers):
        s, t = f"decoder.block.{i}.layer.", f"decoder.layers.{i}."
        _t5_attention(km, s + "0.SelfAttention.", t + "attn.", cross=False)
        km.copy(t + "attn_norm.weight", s + "0.layer_norm.weight")
        _t5_attention(km, s + "1.EncDecAttention.", t + "cross.", cross=True)
        km.copy(t + "cross_norm.weight", s + "1.layer_norm.weight")
        _t5_ffn(km, s + "2.DenseReluDense.", t + "ffn.", gated)
        km.copy(t + "ffn_norm.weight", s + "2.layer_norm.weight")
    km.copy("encoder.norm.weight", "encoder.final_layer_norm.weight")
    km.copy("decoder.norm.weight", "decoder.final_layer_norm.weight")
    if config.tie_embeddings:
        km.put("lm_head.weight", km.out["tokens.weight"])
        km.ignore(r"lm_head\.weight")
    else:
        km.copy("lm_head.weight", "lm_head.weight")
    return km.result()


def _bart_attention(km: KeyMap, s: str, t: str, cross: bool) -> None:
    for w in ("weight", "bias"):
        if cross:
            km.copy(t + f"q.{w}", s + f"q_proj.{w}")
            km.cat(t + f"kv.{w}", [s + f"k_proj.{w}", s + f"v_proj.{w}"])
        else:
            km.cat(t + f"qkv.{w}", [s + f"{n}_proj.{w}" for n in "qkv"])
        km.copy(t + f"o.{w}", s + f"out_proj.{w}")


def bart(sd: Mapping[str, torch.Tensor], config: Seq2SeqConfig) -> dict[str, torch.Tensor]:
    """BartForConditionalGeneration / BartModel -> Seq2Seq."""
    p = _prefix(sd, "shared.weight", ("model.", ""))
    km = KeyMap(sd, p)
    km.ignore(r"(model\.)?(en|de)coder\.embed_tokens\.weight", r"lm_head\.weight", r"final_logits_bias")
    km.copy("tokens.weight", "shared.weight")
    sides = (("encoder", "enc_side", config.n_layers), ("decoder", "dec_side", config.n_decoder_layers or config.n_layers))
    for stack, side, n in sides:
        km.copy(f"{side}.pos.weight", f"{stack}.embed_positions.weight")
        for w in ("weight", "bias"):
            km.copy(f"{side}.norm.{w}", f"{stack}.layernorm_embedding.{w}")
            if config.final_norm:
                km.copy(f"{stack}.norm.{w}", f"{stack}.layer_norm.{w}")
        for i in range(n):
            s, t = f"{stack}.layers.{i}.", f"{stack}.layers.{i}."
            _bart_attention(km, s + "self_attn.", t + "attn.", cross=False)
            if stack == "decoder":
                _bart_attention(km, s + "encoder_attn.", t + "cross.", cross=True)
            for w in ("weight", "bias"):
                km.copy(t + f"attn_norm.{w}", s + f"self_attn_layer_norm.{w}")
                if stack == "decoder":
                    km.copy(t + f"cross_norm.{w}", s + f"encoder_attn_layer_norm.{w}")
                km.copy(t + f"ffn.up.{w}", s + f"fc1.{w}")
                km.copy(t + f"ffn.down.{w}", s + f"fc2.{w}")
                km.copy(t + f"ffn_norm.{w}", s + f"final_layer_norm.{w}")
    out = km.result()
    if config.tie_embeddings:
        out["lm_head.weight"] = out["tokens.weight"]
    else:
        out["lm_head.weight"] = sd["lm_head.weight"]
    bias = sd.get("final_logits_bias")
    out["logits_bias"] = bias.reshape(-1) if bias is not None else torch.zeros(config.vocab_size)
    return out
