"""The speech recognizer family (Whisper, Radford et al., arXiv:2212.04356): log-mel audio in, text out.

An encoder-decoder: a convolutional stem over 30 s of log-mel features, a
pre-norm encoder, and the text decoder of `Seq2Seq` (learned positions, cross
attention, KV-cached decoding). English transcription without timestamps.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn

from ..nn import TransformerEncoder
from . import _checks
from . import audio as _audio
from ._base import ModelOutput
from .seq2seq import Seq2Seq, Seq2SeqConfig


@dataclass
class WhisperConfig(Seq2SeqConfig):
    """Defaults are whisper-tiny.en. The text decoder fields are those of `Seq2SeqConfig`."""

    vocab_size: int = 51864
    dim: int = 384
    n_layers: int = 4
    n_decoder_layers: int | None = 4
    n_heads: int = 6
    head_dim: int | None = None
    ffn_dim: int = 1536
    positions: str = "learned"
    max_positions: int = 448  # decoder positions
    norm: str = "layer"
    norm_eps: float = 1e-5
    prenorm: bool = True
    final_norm: bool = True
    activation: str = "gelu"
    bias: bool = True
    scale: float | None = None
    scale_decoder_output: bool = False
    decoder_start_token_id: int = 50257  # <|startoftranscript|>
    eos_token_id: int | list[int] | None = 50256  # <|endoftext|>
    pad_token_id: int = 50256
    n_mels: int = 80
    audio_positions: int = 1500  # encoder frames after the stride-2 stem (30 s)
    no_timestamps_token_id: int | None = 50362
    prompt: list[int] | None = None  # decoder prompt; None: [start, no_timestamps]
    suppress_tokens: list[int] = field(default_factory=list)  # never generated
    begin_suppress_tokens: list[int] = field(default_factory=lambda: [220, 50256])  # not as the first token

    _size_fields = Seq2SeqConfig._size_fields + ("n_mels", "audio_positions")

    def _check_values(self) -> None:
        super()._check_values()
        _checks.sizes(self, "n_mels", "audio_positions")
        _checks.tokens(self, "no_timestamps_token_id", "prompt", "suppress_tokens", "begin_suppress_tokens")

    def parameter_estimate(self) -> int:
        """Seq2Seq's estimate plus the convolutional stem and its position table (the encoder has no
        token embeddings or learned positions of its own)."""
        d = self.dim
        stem = 3 * d * (self.n_mels + d) + self.audio_positions * d
        return super().parameter_estimate() - self.max_positions * d + stem

    def decoder_prompt(self) -> list[int]:
        if self.prompt is not None:
            return list(self.prompt)
        ids = [self.decoder_start_token_id]
        return ids + ([self.no_timestamps_token_id] if self.no_timestamps_token_id is not None else [])


class AudioStem(nn.Module):
    """Two 1-D convolutions (the second with stride 2) with GELU, plus fixed sinusoidal positions."""

    def __init__(self, c: WhisperConfig):
        super().__init__()
        self.conv1 = nn.Conv1d(c.n_mels, c.dim, kernel_size=3, padding=1)
        self.conv2 = nn.Conv1d(c.dim, c.dim, kernel_size=3, stride=2, padding=1)
        self.register_buffer("pos", torch.zeros(c.audio_positions, c.dim))

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        """features (B, n_mels, 2 * frames) -> (B, frames, C)."""
        x = F.gelu(self.conv1(features))
        x = F.gelu(self.conv2(x)).transpose(1, 2)  # (B, frames, C)
        if x.shape[1] > self.pos.shape[0]:
            raise ValueError(f"{x.shape[1]} audio frames exceed the model's {self.pos.shape[0]} positions (30 s)")
        return x + self.pos[: x.shape[1]]


class SpeechRecognizer(Seq2Seq):
    """Whisper-style speech recognition: ``transcribe(path_or_array) -> str``."""

    text_pass = None  # its encoder reads audio features, not token ids

    def __init__(self, config: WhisperConfig):
        super().__init__(config)
        self.enc_side = AudioStem(config)
        self.encoder = TransformerEncoder(config.block(False), config.n_layers, final_norm=config.final_norm)

    def encode(self, input_features: torch.Tensor, attention_mask=None, return_weights: bool = False,
               return_hidden: bool = False) -> ModelOutput:
        """input_features (B, n_mels, 3000) log-mel -> ModelOutput(last_hidden_state (B, 1500, C))."""
        x = self.enc_side(input_features.to(self.enc_side.conv1.weight.dtype))
        out = self.encoder(self.drop(x), return_weights=return_weights, return_hidden=return_hidden)
        return ModelOutput(out.hidden, attentions=out.attentions, hidden_states=out.hidden_states)

    def features(self, audio, sample_rate: int | None = None) -> torch.Tensor:
        """Log-mel features (1, n_mels, 3000) of one clip (path, or array with its sample rate)."""
        wave = _audio.load_audio(audio, sample_rate)
        return _audio.log_mel(wave, self.config.n_mels).to(self.device)

    @torch.no_grad()
    def generate(self, input_features: torch.Tensor, attention_mask=None, *, max_new_tokens: int | None = None,
                 **options) -> torch.Tensor:
        """Token ids (B, prompt + n) for log-mel features (B, n_mels, 3000): the decoder prompt, then greedy
        (or sampled, see `Seq2Seq.generate`) tokens with the checkpoint's suppressed tokens."""
        c = self.config
        prompt = c.decoder_prompt()
        limit = c.max_positions - len(prompt)
        options.setdefault("suppress_tokens", c.suppress_tokens)
        options.setdefault("begin_suppress_tokens", c.begin_suppress_tokens)
        n = limit if max_new_tokens is None else min(max_new_tokens, limit)
        return super().generate(input_features, None, max_new_tokens=n,
                                decoder_prompt=prompt, **options)

    @torch.no_grad()
    def transcribe(self, audio, sample_rate: int | None = None, *, return_timing: bool = False, **options):
        """English text of a clip: a file path, or a numpy/torch waveform with ``sample_rate``.

        Clips longer than 30 s are cut into consecutive 30 s windows, each transcribed
        on its own. With ``return_timing`` returns ``(text, seconds)``.
        """
        start = time.perf_counter()
        wave = _audio.load_audio(audio, sample_rate)
        windows = [wave[i : i + _audio.CHUNK_SAMPLES] for i in range(0, max(len(wave), 1), _audio.CHUNK_SAMPLES)]
        texts = []
        tok = self._require_tokenizer("transcribe()")
        n_prompt = len(self.config.decoder_prompt())
        for w in windows:
            ids = self.generate(_audio.log_mel(w, self.config.n_mels).to(self.device), **options)
            texts.append(tok.decode(ids[0, n_prompt:].tolist()).strip())
        text = " ".join(t for t in texts if t)
        return (text, time.perf_counter() - start) if return_timing else text

    def transcribe_batch(self, clips: Sequence, sample_rate: int | None = None, **options) -> list[str]:
        """Transcribe several clips (each up to 30 s) in one batch."""
        feats = torch.cat([_audio.log_mel(_audio.load_audio(c, sample_rate), self.config.n_mels) for c in clips])
        ids = self.generate(feats.to(self.device), **options)
        n_prompt = len(self.config.decoder_prompt())
        tok = self._require_tokenizer("transcribe_batch()")
        stop = set(self.config.eos_token_id if isinstance(self.config.eos_token_id, list) else [self.config.eos_token_id])
        out = []
        for row in ids[:, n_prompt:].tolist():
            row = row[: next((i for i, t in enumerate(row) if t in stop), len(row))]
            out.append(tok.decode(row).strip())
        return out
