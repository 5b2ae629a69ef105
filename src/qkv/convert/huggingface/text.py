"""Hugging Face text checkpoints: BERT (and its task heads), GPT-2, Llama, T5, BART.

Each ``*_config`` reads ``config.json`` through its family's field table (`_tables`): implemented
fields are checked and mapped, anything else that could change the numbers is refused by name.
"""

from __future__ import annotations

import math
from collections.abc import Mapping

import torch

from ...models import CausalLMConfig, Seq2SeqConfig, TextEncoderConfig
from .._keymap import KeyMap, find_prefix
from . import _tables
from ._common import (
    ACTIVATIONS,
    GATED,
    TEXT_HEADS,
    _activation,
    _arch,
    _first,
    _labels,
    build,
)
from ._fields import Fields, read_fields
from .decoders import decoder
from ._layers import attention, bart_stacks, encoder_layer, linear
from .decoders import rope_fields

_CLASSES = ("sequence_classification", "token_classification")


def _read(cfg: Mapping, kind: str, source: str) -> Fields:
    return read_fields(cfg, _tables.TABLES[kind], _tables.FAMILY_NAMES[kind], source)


def bert_config(cfg: Mapping, keys: set[str] = frozenset(), source: str = "config.json") -> TextEncoderConfig:
    f = _read(cfg, "bert", source)
    head = next((h for suffix, h in TEXT_HEADS.items() if _arch(f).endswith(suffix)), None)
    n_labels, labels = _labels(f)
    pooler = head == "sequence_classification" or any(k.endswith("pooler.dense.weight") for k in keys)
    names = dict(dim="hidden_size", n_layers="num_hidden_layers", n_heads="num_attention_heads",
                 ffn_dim="intermediate_size", max_positions="max_position_embeddings", norm_eps="layer_norm_eps")
    return build(
        TextEncoderConfig, f, names,
        vocab_size=f["vocab_size"], dim=f["hidden_size"], n_layers=f["num_hidden_layers"],
        n_heads=f["num_attention_heads"], ffn_dim=f["intermediate_size"], max_positions=f["max_position_embeddings"],
        type_vocab_size=f["type_vocab_size"], activation=_activation(f["hidden_act"]), norm_eps=f["layer_norm_eps"],
        dropout=f["hidden_dropout_prob"], attn_dropout=f["attention_probs_dropout_prob"],
        pad_token_id=_first(f["pad_token_id"], 0), pooler=pooler, head=head,
        num_labels=n_labels if head in _CLASSES else 2, labels=labels if head in _CLASSES else None,
        max_length=f["max_position_embeddings"],
    )


def gpt2_config(cfg: Mapping, source: str = "config.json") -> CausalLMConfig:
    f = _read(cfg, "gpt2", source)
    dim = f["n_embd"]
    names = dict(dim="n_embd", n_layers="n_layer", n_heads="n_head", ffn_dim="n_inner", max_positions="n_positions",
                 norm_eps="layer_norm_epsilon")
    return build(
        CausalLMConfig, f, names,
        vocab_size=f["vocab_size"], dim=dim, n_layers=f["n_layer"], n_heads=f["n_head"],
        ffn_dim=_first(f["n_inner"], 4 * dim), max_positions=f["n_positions"], positions="learned",
        norm="layer", norm_eps=f["layer_norm_epsilon"], activation=_activation(f["activation_function"]), bias=True,
        tie_embeddings=f["tie_word_embeddings"], bos_token_id=f["bos_token_id"], eos_token_id=f["eos_token_id"],
        pad_token_id=f["pad_token_id"],
    )


def _llama_rope(f: Fields) -> dict:
    """The rotary fields: default, linear or llama3 RoPE (Llama 3.1 / 3.2); see `decoders.rope`. Llama's
    default rotary embedding ignores partial_rotary_factor; the scaled ones would read it (and transformers
    then fails to rotate whole heads), so there it must be 1."""
    fields, factor = rope_fields(f)
    if factor != 1.0 and "rope_scaling" in fields:
        which = "rope_scaling" if f["rope_scaling"] else "rope_parameters"
        raise f.refuse(which, f"partial_rotary_factor={factor} with rope_type {fields['rope_scaling']!r} is not "
                              "implemented; remove it")
    return fields


def llama_config(cfg: Mapping, source: str = "config.json") -> CausalLMConfig:
    f = _read(cfg, "llama", source)
    dim, heads = f["hidden_size"], f["num_attention_heads"]
    names = dict(dim="hidden_size", n_layers="num_hidden_layers", n_heads="num_attention_heads",
                 n_kv_heads="num_key_value_heads", ffn_dim="intermediate_size",
                 max_positions="max_position_embeddings", norm_eps="rms_norm_eps")
    pad = f["pad_token_id"]
    return build(
        CausalLMConfig, f, names,
        vocab_size=f["vocab_size"], dim=dim, n_layers=f["num_hidden_layers"], n_heads=heads,
        n_kv_heads=_first(f["num_key_value_heads"], heads), head_dim=_first(f["head_dim"], dim // heads),
        ffn_dim=f["intermediate_size"], max_positions=f["max_position_embeddings"], positions="rotary",
        **_llama_rope(f), norm="rms", norm_eps=f["rms_norm_eps"],
        activation=GATED[_activation(f["hidden_act"])], bias=f["attention_bias"], mlp_bias=f["mlp_bias"],
        tie_embeddings=f["tie_word_embeddings"], bos_token_id=f["bos_token_id"], eos_token_id=f["eos_token_id"],
        pad_token_id=None if pad == -1 else pad,  # -1: "none", as early Llama configs wrote it
    )


def _t5_activation(f: Fields) -> str:
    """transformers' reading of feed_forward_proj: "{act}" or "gated-{act}" ("gated-gelu" is gelu_new)."""
    ff = f["feed_forward_proj"]
    parts = ff.split("-")
    gated = parts[0] == "gated"
    act = "gelu_new" if ff == "gated-gelu" else parts[-1]
    if len(parts) > 2 or (len(parts) == 2 and not gated) or act not in ACTIVATIONS:
        raise f.refuse("feed_forward_proj", f"qkv knows 'ACT' and 'gated-ACT' with ACT one of {sorted(ACTIVATIONS)}")
    return GATED[ACTIVATIONS[act]] if gated else ACTIVATIONS[act]


def t5_config(cfg: Mapping, keys: set[str] = frozenset(), source: str = "config.json") -> Seq2SeqConfig:
    """``keys``: the checkpoint's tensor names. transformers >= 5 always writes tie_word_embeddings=true for
    T5 and leaves a stored lm_head untied: so does qkv."""
    f = _read(cfg, "t5", source)
    tie = f["tie_word_embeddings"]
    names = dict(dim="d_model", n_layers="num_layers", n_decoder_layers="num_decoder_layers", n_heads="num_heads",
                 head_dim="d_kv", ffn_dim="d_ff", relative_buckets="relative_attention_num_buckets",
                 relative_max_distance="relative_attention_max_distance", norm_eps="layer_norm_epsilon")
    return build(
        Seq2SeqConfig, f, names,
        vocab_size=f["vocab_size"], dim=f["d_model"], n_layers=f["num_layers"],
        n_decoder_layers=_first(f["num_decoder_layers"], f["num_layers"]), n_heads=f["num_heads"],
        head_dim=f["d_kv"], ffn_dim=f["d_ff"], positions="relative",
        relative_buckets=f["relative_attention_num_buckets"],
        relative_max_distance=f["relative_attention_max_distance"], norm="rms",
        norm_eps=f["layer_norm_epsilon"], prenorm=True, final_norm=True, activation=_t5_activation(f),
        bias=False, scale=1.0, tie_embeddings=tie and "lm_head.weight" not in keys,
        scale_decoder_output=_first(f["scale_decoder_outputs"], tie),  # transformers >= 5 states it explicitly
        decoder_start_token_id=_first(f["decoder_start_token_id"], f["pad_token_id"], 0),
        eos_token_id=_first(f["eos_token_id"], 1), pad_token_id=_first(f["pad_token_id"], 0),
    )


def same_sides(f: Fields) -> None:
    """qkv's encoder and decoder share one head count and feed-forward width."""
    for side in ("attention_heads", "ffn_dim"):
        if f[f"decoder_{side}"] != f[f"encoder_{side}"]:
            raise f.refuse(f"decoder_{side}", f"qkv needs it equal to encoder_{side}={f[f'encoder_{side}']}; "
                                              "use transformers")


def head_dim(dim: int, heads: int) -> int | None:
    """dim // heads, or None when it does not divide (the qkv config then says so, by name)."""
    return dim // heads if dim % heads == 0 else None


ENCODER_DECODER_NAMES = dict(dim="d_model", n_layers="encoder_layers", n_decoder_layers="decoder_layers",
                             n_heads="encoder_attention_heads", ffn_dim="encoder_ffn_dim")


def bart_config(cfg: Mapping, source: str = "config.json") -> Seq2SeqConfig:
    """transformers' BART is post-norm with an embedding norm and no final norm whatever the fairseq
    fields (normalize_before, add_final_layer_norm) say: so is qkv's."""
    f = _read(cfg, "bart", source)
    same_sides(f)
    dim = f["d_model"]
    return build(
        Seq2SeqConfig, f, {**ENCODER_DECODER_NAMES, "max_positions": "max_position_embeddings"},
        vocab_size=f["vocab_size"], dim=dim, n_layers=f["encoder_layers"], n_decoder_layers=f["decoder_layers"],
        n_heads=f["encoder_attention_heads"], head_dim=head_dim(dim, f["encoder_attention_heads"]),
        ffn_dim=f["encoder_ffn_dim"], positions="learned", max_positions=f["max_position_embeddings"],
        position_offset=2, norm="layer", norm_eps=1e-5, prenorm=False, final_norm=False, embed_norm=True,
        activation=_activation(f["activation_function"]), bias=True, scale=None,
        embed_scale=math.sqrt(dim) if f["scale_embedding"] else 1.0,
        tie_embeddings=f["tie_word_embeddings"], scale_decoder_output=False, final_logits_bias=True,
        decoder_start_token_id=_first(f["decoder_start_token_id"], 2), eos_token_id=_first(f["eos_token_id"], 2),
        pad_token_id=_first(f["pad_token_id"], 1),
    )


def bert(sd: Mapping[str, torch.Tensor], config: TextEncoderConfig) -> dict[str, torch.Tensor]:
    """BertModel / BertFor{SequenceClassification,TokenClassification,QuestionAnswering} -> TextEncoder."""
    km = KeyMap(sd, find_prefix(sd, "embeddings.word_embeddings.weight", ("", "bert.")))
    km.ignore(r".*position_ids", r".*token_type_ids")
    km.copy("tokens.weight", "embeddings.word_embeddings.weight")
    km.copy("pos.weight", "embeddings.position_embeddings.weight")
    if config.type_vocab_size:
        km.copy("token_type.weight", "embeddings.token_type_embeddings.weight")
    linear(km, "embed_norm", "embeddings.LayerNorm")
    for i in range(config.n_layers):
        encoder_layer(km.within(f"encoder.layer.{i}.", f"encoder.layers.{i}."), "self",
                      ("attention.output.LayerNorm", "output.LayerNorm"))
    if config.pooler:
        linear(km, "pooler", "pooler.dense")
    if config.head is not None:  # task heads sit outside the "bert." prefix
        linear(km.scope(""), "classifier", "qa_outputs" if config.head == "question_answering" else "classifier")
    return km.result()


def gpt2(sd: Mapping[str, torch.Tensor], config: CausalLMConfig) -> dict[str, torch.Tensor]:
    """GPT2Model / GPT2LMHeadModel -> CausalLM. GPT-2's Conv1D weights are (in, out): transposed."""
    km = KeyMap(sd, find_prefix(sd, "wte.weight", ("", "transformer.")))
    km.ignore(r".*attn\.bias", r".*attn\.masked_bias")
    km.copy("tokens.weight", "wte.weight")
    km.copy("pos.weight", "wpe.weight")
    for i in range(config.n_layers):
        lk = km.within(f"h.{i}.", f"stack.layers.{i}.")
        for target, source in (("attn.qkv", "attn.c_attn"), ("attn.o", "attn.c_proj"), ("ffn.up", "mlp.c_fc"),
                               ("ffn.down", "mlp.c_proj")):
            linear(lk, target, source, transpose=True)
        linear(lk, "attn_norm", "ln_1")
        linear(lk, "ffn_norm", "ln_2")
    linear(km, "stack.norm", "ln_f")
    km.scope("").head("lm_head.weight", "lm_head.weight", tied_to="tokens.weight", tied=config.tie_embeddings)
    return km.result()


def llama(sd: Mapping[str, torch.Tensor], config: CausalLMConfig) -> dict[str, torch.Tensor]:
    """LlamaModel / LlamaForCausalLM -> CausalLM: the decoder layout shared with Qwen, Mistral, Gemma
    (attention_bias gives q, k, v, o biases; mlp_bias gate, up, down biases)."""
    return decoder(sd, config)


def _t5_ffn(km: KeyMap, gated: bool) -> None:
    km.cat("ffn.up.weight", ["DenseReluDense.wi_0.weight", "DenseReluDense.wi_1.weight"] if gated
           else ["DenseReluDense.wi.weight"])
    km.copy("ffn.down.weight", "DenseReluDense.wo.weight")


def t5(sd: Mapping[str, torch.Tensor], config: Seq2SeqConfig) -> dict[str, torch.Tensor]:
    """T5ForConditionalGeneration -> Seq2Seq."""
    km = KeyMap(sd)
    km.copy("tokens.weight", "shared.weight")
    for stack in ("encoder", "decoder"):  # saved copies of shared
        km.duplicate(f"{stack}.embed_tokens.weight", "tokens.weight",
                     "qkv's T5 has one token embedding for encoder and decoder")
    gated = config.activation in ("geglu", "geglu_tanh", "reglu", "swiglu")
    names = ("q", "k", "v", "o")
    for stack in ("encoder", "decoder"):
        km.copy(f"{stack[:3]}_side.rel.embedding.weight",
                f"{stack}.block.0.layer.0.SelfAttention.relative_attention_bias.weight")
        for i in range(config.n_layers if stack == "encoder" else config.n_decoder_layers or config.n_layers):
            lk = km.within(f"{stack}.block.{i}.layer.", f"{stack}.layers.{i}.")
            attention(lk, "attn.", "0.SelfAttention.", names, bias=False)
            lk.copy("attn_norm.weight", "0.layer_norm.weight")
            ffn = "1." if stack == "encoder" else "2."
            if stack == "decoder":
                attention(lk, "cross.", "1.EncDecAttention.", names, cross=True, bias=False)
                lk.copy("cross_norm.weight", "1.layer_norm.weight")
            _t5_ffn(lk.within(ffn, ""), gated)
            lk.copy("ffn_norm.weight", ffn + "layer_norm.weight")
        km.copy(f"{stack}.norm.weight", f"{stack}.final_layer_norm.weight")
    km.head("lm_head.weight", "lm_head.weight", tied_to="tokens.weight", tied=config.tie_embeddings)
    return km.result()


def bart(sd: Mapping[str, torch.Tensor], config: Seq2SeqConfig) -> dict[str, torch.Tensor]:
    """BartForConditionalGeneration / BartModel -> Seq2Seq."""
    km = KeyMap(sd, find_prefix(sd, "shared.weight", ("model.", "")))
    km.copy("tokens.weight", "shared.weight")
    for stack in ("encoder", "decoder"):  # saved copies of shared, unless transformers >= 5 untied them
        km.duplicate(f"{stack}.embed_tokens.weight", "tokens.weight",
                     "qkv's BART has one token embedding for encoder, decoder and head; transformers >= 5 unties "
                     "all three when tie_word_embeddings=false: load this model with transformers")
    for stack, side in (("encoder", "enc_side"), ("decoder", "dec_side")):
        km.copy(f"{side}.pos.weight", f"{stack}.embed_positions.weight")
        linear(km, f"{side}.norm", f"{stack}.layernorm_embedding")
    bart_stacks(km, config.n_layers, config.n_decoder_layers or config.n_layers)
    top = km.scope("")  # the head and its bias sit outside "model."
    top.head("lm_head.weight", "lm_head.weight", tied_to="tokens.weight", tied=config.tie_embeddings)
    if top.has("final_logits_bias"):
        top.copy("logits_bias", "final_logits_bias", fn=lambda t: t.reshape(-1))  # stored as (1, vocab)
    else:
        top.put("logits_bias", torch.zeros(config.vocab_size))
    return km.result()
