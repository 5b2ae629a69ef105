"""The encoder-decoder family: T5 (relative position bias, pre-norm, RMSNorm) and BART (learned positions,
post-norm, LayerNorm) as settings of one config."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import nn

from ..nn import BlockConfig, KVCache, LearnedPositions, Linear, RelativePositionBias, TransformerDecoder, TransformerEncoder
from . import _checks, decoding
from ._base import Model, ModelOutput, key_mask, step_mask
from .generation import options, prepare


@dataclass
class Seq2SeqConfig:
    """Defaults are T5-small. BART: positions="learned", norm="layer", prenorm=False, bias=True,
    activation="gelu", scale=None, embed_norm=True, final_norm=False, scale_decoder_output=False."""

    vocab_size: int = 32128
    dim: int = 512
    n_layers: int = 6
    n_decoder_layers: int | None = None  # None: = n_layers
    n_heads: int = 8
    head_dim: int | None = 64
    ffn_dim: int = 2048
    positions: str = "relative"  # "relative" (T5 buckets) or "learned" (BART)
    relative_buckets: int = 32
    relative_max_distance: int = 128
    max_positions: int = 1024  # learned positions
    position_offset: int = 0  # BART stores positions from 2
    norm: str = "rms"
    norm_eps: float = 1e-6
    prenorm: bool = True
    final_norm: bool = True  # norm after each stack (T5); BART has none
    embed_norm: bool = False  # LayerNorm after the embeddings (BART's layernorm_embedding)
    activation: str = "relu"  # T5 v1.1: "geglu_tanh"
    bias: bool = False
    scale: float | None = 1.0  # attention scale; T5 folds it into the init (1.0), BART uses 1/sqrt(d)
    embed_scale: float = 1.0  # multiplies token embeddings (BART's scale_embedding: sqrt(dim))
    tie_embeddings: bool = True
    scale_decoder_output: bool = True  # T5 (with tied embeddings): decoder output * dim**-0.5 before the head
    final_logits_bias: bool = False  # BART's extra bias on the logits
    dropout: float = 0.0
    attn_dropout: float = 0.0
    decoder_start_token_id: int = 0
    eos_token_id: int | list[int] | None = 1
    pad_token_id: int = 0

    def __post_init__(self):
        _checks.check_types(self)
        self._check_values()
        _checks.budget(self, self.parameter_estimate(), self._size_fields)

    _size_fields = ("vocab_size", "dim", "n_layers", "n_decoder_layers", "n_heads", "head_dim", "ffn_dim",
                    "max_positions")

    def _check_values(self) -> None:
        _checks.sizes(self, "vocab_size", "dim", "n_heads", "head_dim", "ffn_dim", "relative_buckets",
                      "relative_max_distance", "max_positions")
        _checks.sizes(self, "position_offset", lo=0)
        _checks.layers(self, "n_layers", "n_decoder_layers")
        _checks.tokens(self, "decoder_start_token_id", "eos_token_id", "pad_token_id")
        _checks.positive(self, "norm_eps", "scale", "embed_scale")
        _checks.fractions(self, "dropout", "attn_dropout")
        _checks.choices(self, positions=("relative", "learned"))
        _checks.heads(self, self.dim, self.n_heads, self.head_dim)
        self.block(False)  # validates activation and norm

    def parameter_estimate(self) -> int:
        """About how many parameters a model of this config holds (computed, nothing allocated)."""
        d, h = self.dim, self.n_heads
        hd = self.head_dim or d // h
        enc = _checks.block_parameters(d, h, hd, h, self.ffn_dim, self.activation)
        dec = _checks.block_parameters(d, h, hd, h, self.ffn_dim, self.activation, cross=True)
        pos = 2 * (self.max_positions * d if self.positions == "learned" else self.relative_buckets * h)
        embed = self.vocab_size * d * (1 if self.tie_embeddings else 2)
        return embed + pos + self.n_layers * enc + (self.n_decoder_layers or self.n_layers) * dec

    def block(self, cross: bool) -> BlockConfig:
        return BlockConfig(dim=self.dim, n_heads=self.n_heads, ffn_dim=self.ffn_dim, head_dim=self.head_dim,
                           activation=self.activation, norm=self.norm, norm_eps=self.norm_eps, prenorm=self.prenorm,
                           bias=self.bias, cross_attention=cross, scale=self.scale, dropout=self.dropout,
                           attn_dropout=self.attn_dropout)


class _Side(nn.Module):
    """Position handling and embedding norm of one side (encoder or decoder)."""

    def __init__(self, c: Seq2SeqConfig, bidirectional: bool):
        super().__init__()
        if c.positions == "relative":
            self.rel = RelativePositionBias(c.n_heads, c.relative_buckets, c.relative_max_distance, bidirectional)
            self.pos = None
        else:
            self.rel = None
            self.pos = LearnedPositions(c.max_positions, c.dim, offset=c.position_offset)
        self.norm = nn.LayerNorm(c.dim, eps=c.norm_eps) if c.embed_norm else None

    def embed(self, x: torch.Tensor, start: int) -> torch.Tensor:
        if self.pos is not None:
            x = x + self.pos(torch.arange(start, start + x.shape[1], device=x.device))
        return self.norm(x) if self.norm is not None else x

    def bias(self, tq: int, tk: int, device) -> torch.Tensor | None:
        return None if self.rel is None else self.rel(tq, tk, device=device)


class Seq2Seq(Model):
    """Encoder-decoder transformer with a language-model head on the decoder."""

    def text_pass(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None) -> ModelOutput:
        """The encoder over a text: what `qkv.explain` captures."""
        return self.encode(input_ids, attention_mask)

    def __init__(self, config: Seq2SeqConfig):
        super().__init__()
        self.config = c = config
        self.tokens = nn.Embedding(c.vocab_size, c.dim)
        self.enc_side = _Side(c, bidirectional=True)
        self.dec_side = _Side(c, bidirectional=False)
        self.drop = nn.Dropout(c.dropout)
        self.encoder = TransformerEncoder(c.block(False), c.n_layers, final_norm=c.final_norm)
        self.decoder = TransformerDecoder(c.block(True), c.n_decoder_layers or c.n_layers, final_norm=c.final_norm)
        self.lm_head = Linear(c.dim, c.vocab_size, bias=False)
        if c.tie_embeddings:
            self.lm_head.weight = self.tokens.weight
        self.register_buffer("logits_bias", torch.zeros(c.vocab_size) if c.final_logits_bias else None)

    def encode(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None,
               return_weights: bool = False, return_hidden: bool = False) -> ModelOutput:
        """input_ids (B, S) -> ModelOutput(last_hidden_state (B, S, C), attentions, hidden_states)."""
        S = input_ids.shape[1]
        x = self.enc_side.embed(self.tokens(input_ids) * self.config.embed_scale, 0)
        out = self.encoder(self.drop(x), mask=key_mask(attention_mask, causal=False),
                           bias=self.enc_side.bias(S, S, input_ids.device), return_weights=return_weights,
                           return_hidden=return_hidden)
        return ModelOutput(out.hidden, attentions=out.attentions, hidden_states=out.hidden_states)

    def forward(self, input_ids: torch.Tensor | None = None, attention_mask: torch.Tensor | None = None,
                decoder_input_ids: torch.Tensor | None = None, decoder_attention_mask: torch.Tensor | None = None,
                encoder_output: ModelOutput | None = None, cache: KVCache | None = None,
                return_weights: bool = False, return_hidden: bool = False, last_only: bool = False) -> ModelOutput:
        """Encode ``input_ids`` (or reuse ``encoder_output``) and decode ``decoder_input_ids`` (B, T).

        Returns ModelOutput(last_hidden_state: decoder, logits (B, T, V), attentions: decoder
        self-attention, cross_attentions, encoder_last_hidden_state, encoder_attentions, cache).
        """
        if encoder_output is None:
            if input_ids is None:
                raise ValueError("pass input_ids (to encode) or encoder_output")
            encoder_output = self.encode(input_ids, attention_mask, return_weights=return_weights)
        if decoder_input_ids is None:
            raise ValueError("pass decoder_input_ids: the decoder's tokens (start with decoder_start_token_id)")
        ctx = encoder_output.last_hidden_state
        T = decoder_input_ids.shape[1]
        start = 0 if cache is None else cache.length
        x = self.dec_side.embed(self.tokens(decoder_input_ids) * self.config.embed_scale, start)
        self_mask = step_mask(decoder_attention_mask) if T == 1 and start > 0 else key_mask(decoder_attention_mask, causal=True)
        bias = self.dec_side.bias(T, start + T, x.device)
        context_mask = step_mask(attention_mask) if T == 1 else key_mask(attention_mask, causal=False)
        out = self.decoder(self.drop(x), mask=self_mask, bias=bias, cache=cache, context=ctx,
                           context_mask=context_mask, return_weights=return_weights,
                           return_hidden=return_hidden)
        if cache is not None:
            cache.advance(T)
        h = out.hidden
        y = h[:, -1:] if last_only else h
        if self.config.scale_decoder_output:
            y = y * self.config.dim**-0.5
        logits = self.lm_head(y)
        if self.logits_bias is not None:
            logits = logits + self.logits_bias
        return ModelOutput(h, logits=logits, attentions=out.attentions, hidden_states=out.hidden_states,
                           cross_attentions=out.cross_attentions, encoder_last_hidden_state=ctx,
                           encoder_attentions=encoder_output.attentions, cache=cache)

    @torch.no_grad()
    def generate(self, input_ids: torch.Tensor | str | Sequence[str], attention_mask: torch.Tensor | None = None,
                 *, max_new_tokens: int | None = None, do_sample: bool | None = None,
                 temperature: float | None = None, top_k: int | None = None, top_p: float | None = None,
                 min_p: float | None = None, repetition_penalty: float | None = None,
                 presence_penalty: float | None = None, frequency_penalty: float | None = None,
                 eos_token_id=None, pad_token_id: int | None = None, seed: int | None = None,
                 stop: str | Sequence[str] | None = None, decoder_prompt: Sequence[int] | None = None,
                 suppress_tokens: Sequence[int] | None = None, begin_suppress_tokens: Sequence[int] | None = None,
                 num_beams: int | None = None, length_penalty: float | None = None,
                 early_stopping: bool | str | None = None, num_return_sequences: int | None = None):
        """Encode the inputs once, then decode after ``decoder_prompt`` (default: the decoder start token)
        with a KV cache. Returns decoder ids (B * num_return_sequences, prompt + n) starting with the
        prompt, or text for text inputs. Options: see `CausalLM.generate` and `GenerationConfig`."""
        input_ids, attention_mask, texts, single, gen = prepare(self, input_ids, attention_mask, "right",
                                                                **options(locals()))
        session = decoding.seq2seq_session(self, input_ids, attention_mask, gen, decoder_prompt)
        return decoding.run(self, session, gen, texts, single)

    @torch.no_grad()
    def stream(self, prompt: torch.Tensor | str, attention_mask: torch.Tensor | None = None, *,
               decoder_prompt: Sequence[int] | None = None, **options):
        """Text pieces of the output for one input (text, or ids (1, S)) as its tokens are chosen; joined,
        they equal ``generate``'s text. Takes ``generate``'s options (not beam search)."""
        if not isinstance(prompt, (str, torch.Tensor)):
            raise TypeError(f"stream() takes one input (a str or (1, S) ids), got {type(prompt).__name__}")
        ids, attention_mask, _, _, gen = prepare(self, prompt, attention_mask, "right", **options)
        session = decoding.seq2seq_session(self, ids, attention_mask, gen, decoder_prompt)
        yield from decoding.stream(self, session, gen)
