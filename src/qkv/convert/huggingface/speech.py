"""Hugging Face speech checkpoints: Whisper (WhisperForConditionalGeneration / WhisperModel).

Whisper's layers are BART's, name for name, except that its key projections have no bias: the
layer map is BART's (`_layers.bart_stacks`).
"""

from __future__ import annotations

from collections.abc import Mapping

import torch

from ...models import WhisperConfig
from .._keymap import KeyMap, find_prefix
from . import _tables
from ._common import _activation, _first, build
from ._fields import read_fields
from ._layers import bart_stacks, linear
from .text import ENCODER_DECODER_NAMES, head_dim, same_sides


def whisper_config(cfg: Mapping, generation: Mapping | None = None, source: str = "config.json") -> WhisperConfig:
    """``config.json`` (and ``generation_config.json``, whose token lists take precedence) -> WhisperConfig."""
    f = read_fields(cfg, _tables.WHISPER, "Whisper", source)
    g = read_fields(generation or {}, _tables.WHISPER_GENERATION, "Whisper",
                    source.replace("config.json", "generation_config.json"), strict=False)
    same_sides(f)
    dim = f["d_model"]
    names = {**ENCODER_DECODER_NAMES, "max_positions": "max_target_positions", "n_mels": "num_mel_bins",
             "audio_positions": "max_source_positions"}
    return build(
        WhisperConfig, f, names,
        vocab_size=f["vocab_size"], dim=dim, n_layers=f["encoder_layers"], n_decoder_layers=f["decoder_layers"],
        n_heads=f["encoder_attention_heads"], head_dim=head_dim(dim, f["encoder_attention_heads"]),
        ffn_dim=f["encoder_ffn_dim"], max_positions=f["max_target_positions"],
        activation=_activation(f["activation_function"]), n_mels=f["num_mel_bins"],
        audio_positions=f["max_source_positions"], tie_embeddings=f["tie_word_embeddings"],
        decoder_start_token_id=_first(g["decoder_start_token_id"], f["decoder_start_token_id"]),
        eos_token_id=_first(g["eos_token_id"], f["eos_token_id"]),
        pad_token_id=_first(g["pad_token_id"], f["pad_token_id"]),
        no_timestamps_token_id=(g if g["no_timestamps_token_id"] is not None else f)["no_timestamps_token_id"],
        suppress_tokens=_first(g["suppress_tokens"], f["suppress_tokens"], []),
        begin_suppress_tokens=_first(g["begin_suppress_tokens"], f["begin_suppress_tokens"], [220, 50256]),
    )


def whisper(sd: Mapping[str, torch.Tensor], config: WhisperConfig) -> dict[str, torch.Tensor]:
    """WhisperForConditionalGeneration / WhisperModel -> SpeechRecognizer."""
    km = KeyMap(sd, find_prefix(sd, "encoder.conv1.weight", ("model.", "")))
    linear(km, "enc_side.conv1", "encoder.conv1")
    linear(km, "enc_side.conv2", "encoder.conv2")
    linear(km, "encoder.norm", "encoder.layer_norm")
    linear(km, "decoder.norm", "decoder.layer_norm")
    km.copy("enc_side.pos", "encoder.embed_positions.weight")
    km.copy("tokens.weight", "decoder.embed_tokens.weight")
    km.copy("dec_side.pos.weight", "decoder.embed_positions.weight")
    bart_stacks(km, config.n_layers, config.n_decoder_layers or config.n_layers, k_bias=False)
    km.scope("").head("lm_head.weight", "proj_out.weight", tied_to="tokens.weight", tied=config.tie_embeddings)
    return km.result()
