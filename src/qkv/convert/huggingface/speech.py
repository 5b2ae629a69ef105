"""Hugging Face speech checkpoints: Whisper (WhisperForConditionalGeneration / WhisperModel)."""

from __future__ import annotations

from collections.abc import Mapping

import torch

from ...models import WhisperConfig
from .._keymap import ConversionError, KeyMap
from ._common import _activation, _first, _prefix


def whisper_config(cfg: Mapping, generation: Mapping | None = None) -> WhisperConfig:
    """``config.json`` (and ``generation_config.json``, whose token lists take precedence) -> WhisperConfig."""
    if cfg["encoder_attention_heads"] != cfg["decoder_attention_heads"] or cfg["encoder_ffn_dim"] != cfg["decoder_ffn_dim"]:
        raise ConversionError("Whisper checkpoints with different encoder and decoder widths are not supported")
    gen = dict(generation or {})
    dim = cfg["d_model"]
    return WhisperConfig(
        vocab_size=cfg["vocab_size"], dim=dim, n_layers=cfg["encoder_layers"], n_decoder_layers=cfg["decoder_layers"],
        n_heads=cfg["encoder_attention_heads"], head_dim=dim // cfg["encoder_attention_heads"],
        ffn_dim=cfg["encoder_ffn_dim"], max_positions=cfg.get("max_target_positions", 448),
        activation=_activation(cfg.get("activation_function", "gelu")), n_mels=cfg.get("num_mel_bins", 80),
        audio_positions=cfg.get("max_source_positions", 1500),
        decoder_start_token_id=_first(gen.get("decoder_start_token_id"), cfg.get("decoder_start_token_id"), 50257),
        eos_token_id=_first(gen.get("eos_token_id"), cfg.get("eos_token_id"), 50256),
        pad_token_id=_first(gen.get("pad_token_id"), cfg.get("pad_token_id"), 50256),
        no_timestamps_token_id=gen.get("no_timestamps_token_id", cfg.get("no_timestamps_token_id")),
        suppress_tokens=list(_first(gen.get("suppress_tokens"), cfg.get("suppress_tokens"), [])),
        begin_suppress_tokens=list(_first(gen.get("begin_suppress_tokens"), cfg.get("begin_suppress_tokens"), [220, 50256])),
    )


def _attention(km: KeyMap, s: str, t: str, cross: bool) -> None:
    """Whisper's key projection has no bias: its part of the fused bias is zero."""
    q_b, v_b = km.get(s + "q_proj.bias"), km.get(s + "v_proj.bias")
    zeros = torch.zeros_like(v_b)
    if cross:
        km.copy(t + "q.weight", s + "q_proj.weight")
        km.put(t + "q.bias", q_b)
        km.cat(t + "kv.weight", [s + "k_proj.weight", s + "v_proj.weight"])
        km.put(t + "kv.bias", torch.cat([zeros, v_b]))
    else:
        km.cat(t + "qkv.weight", [s + f"{n}_proj.weight" for n in "qkv"])
        km.put(t + "qkv.bias", torch.cat([q_b, zeros, v_b]))
    km.copy(t + "o.weight", s + "out_proj.weight")
    km.copy(t + "o.bias", s + "out_proj.bias")


def whisper(sd: Mapping[str, torch.Tensor], config: WhisperConfig) -> dict[str, torch.Tensor]:
    """WhisperForConditionalGeneration / WhisperModel -> SpeechRecognizer."""
    p = _prefix(sd, "encoder.conv1.weight", ("model.", ""))
    km = KeyMap(sd, p)
    km.ignore(r"proj_out\.weight")  # tied to the token embeddings
    for w in ("weight", "bias"):
        km.copy(f"enc_side.conv1.{w}", f"encoder.conv1.{w}")
        km.copy(f"enc_side.conv2.{w}", f"encoder.conv2.{w}")
        km.copy(f"encoder.norm.{w}", f"encoder.layer_norm.{w}")
        km.copy(f"decoder.norm.{w}", f"decoder.layer_norm.{w}")
    km.copy("enc_side.pos", "encoder.embed_positions.weight")
    km.copy("tokens.weight", "decoder.embed_tokens.weight")
    km.copy("dec_side.pos.weight", "decoder.embed_positions.weight")
    for stack, n in (("encoder", config.n_layers), ("decoder", config.n_decoder_layers or config.n_layers)):
        for i in range(n):
            s = t = f"{stack}.layers.{i}."
            _attention(km, s + "self_attn.", t + "attn.", cross=False)
            if stack == "decoder":
                _attention(km, s + "encoder_attn.", t + "cross.", cross=True)
            for w in ("weight", "bias"):
                km.copy(t + f"attn_norm.{w}", s + f"self_attn_layer_norm.{w}")
                if stack == "decoder":
                    km.copy(t + f"cross_norm.{w}", s + f"encoder_attn_layer_norm.{w}")
                km.copy(t + f"ffn.up.{w}", s + f"fc1.{w}")
                km.copy(t + f"ffn.down.{w}", s + f"fc2.{w}")
                km.copy(t + f"ffn_norm.{w}", s + f"final_layer_norm.{w}")
    out = km.result()
    out["lm_head.weight"] = out["tokens.weight"]
    return out
