"""The causal language model family in one config: GPT-2, Llama (2 and 3), Qwen 2 / 3, Mistral, Gemma 2 / 3
and Phi-3 are settings of it (and their mixes)."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import nn

from .. import masks
from ..nn import (
    BlockConfig,
    KVCache,
    LearnedPositions,
    Linear,
    RotaryEmbedding,
    TransformerEncoder,
)
from . import _checks, decoding
from ._base import Model, ModelOutput, key_mask, step_mask
from .generation import options, prepare


@dataclass
class CausalLMConfig:
    """Defaults are GPT-2 (124M). Llama: positions="rotary", norm="rms", activation="swiglu", bias=False.

    Qwen 2: qkv_bias=True; Qwen 3: qk_norm="rms"; Mistral: sliding_window; Gemma 2 / 3: norm_offset=1,
    post_norms, embed_scale, attn_scale, softcaps, alternating layer_types; Phi-3: rotary_dim.
    """

    vocab_size: int = 50257
    dim: int = 768
    n_layers: int = 12
    n_heads: int = 12
    n_kv_heads: int | None = None  # grouped-query attention when < n_heads
    head_dim: int | None = None
    ffn_dim: int = 3072
    max_positions: int = 1024  # learned positions: table size; rotary: nominal context
    positions: str = "learned"  # "learned" (GPT-2) or "rotary" (Llama)
    rope_theta: float = 10000.0
    rope_interleaved: bool = False  # False: half-split pairs (Llama/NeoX); True: GPT-J pairs
    rotary_dim: int | None = None  # rotate only the first rotary_dim features of each head
    norm: str = "layer"  # "layer" (GPT-2) or "rms" (Llama)
    norm_eps: float = 1e-5
    activation: str = "gelu_tanh"  # GPT-2's gelu_new; Llama: "swiglu"
    bias: bool = True  # biases of the attention projections (and of the feed-forward, unless mlp_bias says)
    mlp_bias: bool | None = None  # biases of the feed-forward projections; None: = bias (Llama: mlp_bias)
    qk_norm: str | None = None
    qkv_bias: bool | None = None  # biases of the q, k, v projections; None: = bias (Qwen 2: q/k/v only)
    tie_embeddings: bool = True
    # rotary scaling of the global (full-attention) layers: None, "linear" (positions / rope_factor) or
    # "llama3" (Llama 3.1's frequency bands: rope_factor, rope_low/high_freq_factor, rope_original_max_positions)
    rope_scaling: str | None = None
    rope_factor: float = 1.0
    rope_low_freq_factor: float = 1.0
    rope_high_freq_factor: float = 4.0
    rope_original_max_positions: int = 8192
    rope_local_theta: float | None = None  # rotary base of the sliding layers (Gemma 3); None: as global layers
    # one of "full" / "sliding" per layer (None: all full); sliding layers see the keys at distance
    # < sliding_window (the query's own included), as transformers' sliding_window
    layer_types: list[str] | None = None
    sliding_window: int | None = None
    attn_scale: float | None = None  # attention scale; None: 1/sqrt(head_dim) (Gemma: query_pre_attn_scalar**-0.5)
    attn_softcap: float | None = None  # cap * tanh(score / cap) on attention scores (Gemma 2)
    final_softcap: float | None = None  # the same on the logits (Gemma 2)
    embed_scale: float = 1.0  # token embeddings times this, in their dtype (Gemma: sqrt(dim))
    norm_offset: float = 0.0  # RMSNorms scale by (norm_offset + weight): Gemma's (1 + w) is 1.0
    post_norms: bool = False  # norm each attention / feed-forward output before its residual (Gemma 2 / 3)
    dropout: float = 0.0
    attn_dropout: float = 0.0
    bos_token_id: int | None = None
    eos_token_id: int | list[int] | None = None
    pad_token_id: int | None = None
    # > 0: a causal depthwise convolution of this width over the token embeddings, added to them
    # (the short convolution of H3 / Based): each position also carries its predecessors, so one
    # attention layer can match "the token after k" (associative recall) without a previous-token head
    token_conv: int = 0

    def __post_init__(self):
        _checks.check_types(self)
        _checks.sizes(self, "vocab_size", "dim", "n_heads", "n_kv_heads", "head_dim", "ffn_dim", "max_positions",
                      "rotary_dim", "sliding_window", "rope_original_max_positions")
        _checks.layers(self, "n_layers")
        _checks.tokens(self, "bos_token_id", "eos_token_id", "pad_token_id")
        _checks.sizes(self, "token_conv", lo=0, hi=_checks.MAX_SIZE)
        _checks.positive(self, "rope_theta", "norm_eps", "rope_factor", "rope_low_freq_factor", "rope_high_freq_factor",
                         "rope_local_theta", "attn_scale", "attn_softcap", "final_softcap", "embed_scale")
        _checks.fractions(self, "dropout", "attn_dropout")
        _checks.choices(self, positions=("learned", "rotary"), qk_norm=(None, "rms", "layer"),
                        rope_scaling=(None, "linear", "llama3"))
        self._check_layers()
        if self.token_conv == 1:
            raise ValueError(f"CausalLMConfig: token_conv={self.token_conv} must be 0 (none) or a width >= 2")
        _checks.heads(self, self.dim, self.n_heads, self.head_dim, self.n_kv_heads)
        head_dim = self.head_dim or self.dim // self.n_heads
        if self.rotary_dim is not None and (self.rotary_dim > head_dim or self.rotary_dim % 2):
            raise ValueError(f"CausalLMConfig: rotary_dim={self.rotary_dim} must be even and at most the head "
                             f"width {head_dim}")
        self.block()  # validates activation and norm
        _checks.budget(self, self.parameter_estimate(),
                       ("vocab_size", "dim", "n_layers", "n_heads", "head_dim", "ffn_dim", "max_positions"))

    def _check_layers(self) -> None:
        name = type(self).__name__
        if self.layer_types is not None:
            if len(self.layer_types) != self.n_layers or set(self.layer_types) - {"full", "sliding"}:
                raise ValueError(f"{name}: layer_types={_checks._short(self.layer_types)} must hold one of 'full' / "
                                 f"'sliding' per layer ({self.n_layers})")
            if "sliding" in self.layer_types and self.sliding_window is None:
                raise ValueError(f"{name}: layer_types has sliding layers but sliding_window is None; set the window")
        if self.rope_scaling == "llama3" and not self.rope_high_freq_factor > self.rope_low_freq_factor:
            raise ValueError(f"{name}: rope_high_freq_factor={self.rope_high_freq_factor} must be greater than "
                             f"rope_low_freq_factor={self.rope_low_freq_factor}")
        if (self.rope_scaling or self.rope_local_theta is not None) and self.positions != "rotary":
            raise ValueError(f"{name}: rope_scaling / rope_local_theta need positions='rotary'")
        if self.norm_offset and self.norm != "rms":
            raise ValueError(f"{name}: norm_offset={self.norm_offset} needs norm='rms'")

    def kinds(self) -> list[str]:
        """The attention of each layer, "full" or "sliding"."""
        return list(self.layer_types) if self.layer_types is not None else ["full"] * self.n_layers

    def parameter_estimate(self) -> int:
        """About how many parameters a model of this config holds (computed, nothing allocated)."""
        head_dim = self.head_dim or self.dim // self.n_heads
        block = _checks.block_parameters(self.dim, self.n_heads, head_dim, self.n_kv_heads or self.n_heads,
                                         self.ffn_dim, self.activation)
        embed = self.vocab_size * self.dim * (1 if self.tie_embeddings else 2)
        pos = self.max_positions * self.dim if self.positions == "learned" else 0
        return embed + pos + self.n_layers * block + self.token_conv * self.dim

    def block(self) -> BlockConfig:
        return BlockConfig(dim=self.dim, n_heads=self.n_heads, ffn_dim=self.ffn_dim, n_kv_heads=self.n_kv_heads,
                           head_dim=self.head_dim, activation=self.activation, norm=self.norm,
                           norm_eps=self.norm_eps, prenorm=True, bias=self.bias, qkv_bias=self.qkv_bias,
                           ffn_bias=self.mlp_bias, qk_norm=self.qk_norm, scale=self.attn_scale,
                           softcap=self.attn_softcap, norm_offset=self.norm_offset, post_norms=self.post_norms,
                           dropout=self.dropout, attn_dropout=self.attn_dropout)


class CausalLM(Model):
    """Decoder-only language model: embeddings, pre-norm causal blocks, final norm, output head."""

    continues_prompt = True

    def text_pass(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None) -> ModelOutput:
        """The whole stack over a text (logits of the last position only): what `qkv.explain` captures."""
        return self(input_ids, attention_mask, last_only=True)

    def __init__(self, config: CausalLMConfig):
        super().__init__()
        self.config = c = config
        self.tokens = nn.Embedding(c.vocab_size, c.dim)
        self.pos = LearnedPositions(c.max_positions, c.dim) if c.positions == "learned" else None
        self.rotary = self._rotary(c.rope_theta, scaled=True) if c.positions == "rotary" else None
        # sliding layers with their own rotary base (Gemma 3's local layers: default RoPE, no scaling)
        self.local_rotary = (self._rotary(c.rope_local_theta, scaled=False)
                             if c.positions == "rotary" and c.rope_local_theta is not None else None)
        self.drop = nn.Dropout(c.dropout)
        self.token_conv = (nn.Conv1d(c.dim, c.dim, c.token_conv, groups=c.dim, bias=False)
                           if c.token_conv else None)
        self.stack = TransformerEncoder(c.block(), c.n_layers, final_norm=True)
        self.lm_head = Linear(c.dim, c.vocab_size, bias=False)
        if c.tie_embeddings:
            self.lm_head.weight = self.tokens.weight

    def _rotary(self, theta: float, scaled: bool) -> RotaryEmbedding:
        c = self.config
        dim = c.rotary_dim or c.head_dim or c.dim // c.n_heads
        kind = c.rope_scaling if scaled else None
        llama3 = ((c.rope_factor, c.rope_low_freq_factor, c.rope_high_freq_factor, c.rope_original_max_positions)
                  if kind == "llama3" else None)
        return RotaryEmbedding(dim, theta, c.rope_interleaved, scaling=c.rope_factor if kind == "linear" else 1.0,
                               llama3=llama3)

    def _layer_args(self, mask, attention_mask, step: bool) -> dict:
        """The stack's per-layer arguments where sliding and full layers differ: the mask (the window on
        top of causality and padding; in a decoding step on top of the step's padding mask) and the
        rotary embedding. Key positions are cache slots: left padding shifts queries and keys alike, so
        slot distances are token distances."""
        c = self.config
        kinds = c.kinds()
        if "sliding" not in kinds:
            return {"mask": mask, "rotary": self.rotary}
        window = masks.sliding_window(c.sliding_window - 1)  # transformers: q - k < sliding_window
        if mask is None:
            local = window
        elif step:
            local = window & masks.from_tensor(mask)
        else:
            local = window & mask
        local_rotary = self.local_rotary or self.rotary
        return {"per_layer": {"mask": [local if k == "sliding" else mask for k in kinds],
                              "rotary": [local_rotary if k == "sliding" else self.rotary for k in kinds]}}

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None,
                position_ids: torch.Tensor | None = None, cache: KVCache | None = None,
                return_weights: bool = False, return_hidden: bool = False, last_only: bool = False,
                logits_for: torch.Tensor | None = None, context: torch.Tensor | None = None) -> ModelOutput:
        """input_ids (B, T) -> ModelOutput(last_hidden_state, logits (B, T, V), attentions, cache).

        ``attention_mask`` (B, Tk) covers the cached positions too. ``position_ids``
        default to ``cache.length + arange(T)``. ``last_only`` computes logits for
        the last position only (what decoding needs); ``logits_for``, a (B, T) bool
        mask, for the marked positions only, as (N, V) in row-major order (training
        on sparse labels, where a full (B, T, V) tensor would be mostly waste). ``context`` (B, S, C): what
        cross-attending blocks read (a stack built with cross-attention, as `qkv.models.ImageCaptioner`'s).
        """
        B, T = input_ids.shape
        start = 0 if cache is None else cache.length
        if position_ids is None:
            position_ids = torch.arange(start, start + T, device=input_ids.device)
        x = self.tokens(input_ids)
        if self.config.embed_scale != 1.0:  # Gemma: sqrt(dim), rounded to the activations' dtype first
            x = x * torch.tensor(self.config.embed_scale, dtype=x.dtype, device=x.device)
        if self.pos is not None:
            x = x + self.pos(position_ids)
        if self.token_conv is not None:
            x = x + self._convolve(x, attention_mask, cache, start)
        step = T == 1 and start > 0
        mask = step_mask(attention_mask) if step else key_mask(attention_mask, causal=True)
        out = self.stack(self.drop(x), positions=position_ids, cache=cache, return_weights=return_weights,
                         return_hidden=return_hidden, context=context, **self._layer_args(mask, attention_mask, step))
        if cache is not None:
            cache.advance(T)
        h = out.hidden
        logits = self.lm_head(h[:, -1:] if last_only else h if logits_for is None else h[logits_for])
        if self.config.final_softcap is not None:  # Gemma 2: cap * tanh(logits / cap)
            cap = self.config.final_softcap
            logits = torch.tanh(logits / cap) * cap
        return ModelOutput(h, logits=logits, attentions=out.attentions, hidden_states=out.hidden_states, cache=cache,
                           cross_attentions=out.cross_attentions)

    def _convolve(self, x: torch.Tensor, attention_mask, cache: KVCache | None, start: int) -> torch.Tensor:
        """The causal depthwise convolution over (B, T, C) embeddings; padding positions count as zeros,
        and a cache carries the last ``width - 1`` inputs to the next step."""
        width = self.config.token_conv
        if attention_mask is not None:
            x = x * attention_mask[:, -x.shape[1]:, None].to(x.dtype)
        before = cache.state.get("token_conv") if cache is not None and start > 0 else None
        if before is None:
            before = x.new_zeros(x.shape[0], width - 1, x.shape[2])
        seq = torch.cat([before, x], dim=1)
        if cache is not None:
            cache.state["token_conv"] = seq[:, -(width - 1):]
        return self.token_conv(seq.transpose(1, 2)).transpose(1, 2)

    @torch.no_grad()
    def generate(self, input_ids: torch.Tensor | str | Sequence[str], attention_mask: torch.Tensor | None = None,
                 *, max_new_tokens: int | None = None, do_sample: bool | None = None,
                 temperature: float | None = None, top_k: int | None = None, top_p: float | None = None,
                 min_p: float | None = None, repetition_penalty: float | None = None,
                 presence_penalty: float | None = None, frequency_penalty: float | None = None,
                 eos_token_id=None, pad_token_id: int | None = None, seed: int | None = None,
                 stop: str | Sequence[str] | None = None, suppress_tokens: Sequence[int] | None = None,
                 begin_suppress_tokens: Sequence[int] | None = None, num_beams: int | None = None,
                 length_penalty: float | None = None, early_stopping: bool | str | None = None,
                 num_return_sequences: int | None = None):
        """Continue each prompt with a KV cache. Prompts are token ids (B, T), left-padded with an
        ``attention_mask``, or text (needs a tokenizer); returns ids (B * num_return_sequences, T + n),
        or text for text (a list per prompt when num_return_sequences > 1).

        Options are those of `qkv.models.GenerationConfig` (unset: ``model.generation_defaults``, then
        the defaults; stop tokens: the config's): greedy, sampling (temperature, top_k, top_p, min_p),
        penalties, ``stop`` strings (the text ends before the first), beam search (``num_beams``,
        ``length_penalty``, ``early_stopping``) as transformers' ``generate``.
        """
        input_ids, attention_mask, texts, single, gen = prepare(self, input_ids, attention_mask, "left",
                                                                **options(locals()))
        session = decoding.causal_session(self, input_ids, attention_mask, gen)
        return decoding.run(self, session, gen, texts, single)

    @torch.no_grad()
    def chat(self, messages, *, stream: bool = False, tools=None, documents=None, chat_template: str | None = None,
             template_variables: dict | None = None, **options):
        """The assistant's reply to a conversation (``[{"role": ..., "content": ...}, ...]``): rendered by
        the tokenizer's chat template with the generation prompt (as ``apply_chat_template``), then
        continued as ``generate`` does, with its options. Returns the reply text (a list of texts
        with ``num_return_sequences > 1``), or with ``stream=True`` an iterator of its pieces.
        Unless ``eos_token_id`` is given, decoding stops at the checkpoint's stop tokens and at the
        tokenizer's end token (where a chat template usually ends a turn).
        ``template_variables`` reach the template (e.g. ``{"enable_thinking": False}``).
        """
        tok = self._require_tokenizer("chat()")
        text = tok.apply_chat_template(messages, add_generation_prompt=True, tokenize=False, tools=tools,
                                       documents=documents, chat_template=chat_template,
                                       **(template_variables or {}))
        if not isinstance(text, str):
            raise TypeError("chat() takes one conversation (a list of messages), not a batch of them")
        prompt = torch.tensor([tok.encode(text, add_special_tokens=False)], device=self.device)
        if options.get("eos_token_id") is None:
            _, _, _, _, base = prepare(self, prompt, None, "left")
            stops = list(base.stop_ids)
            if tok.eos_id is not None and tok.eos_id not in stops:
                stops.append(tok.eos_id)
            options["eos_token_id"] = stops or None
        if stream:
            return self.stream(prompt, **options)
        ids, mask, _, _, gen = prepare(self, prompt, None, "left", **options)
        return decoding.run(self, decoding.causal_session(self, ids, mask, gen), gen, [text], True)

    @torch.no_grad()
    def stream(self, prompt: torch.Tensor | str, attention_mask: torch.Tensor | None = None, **options):
        """Text pieces of the continuation of one prompt (text, or ids (1, T)) as its tokens are chosen;
        joined, they equal ``generate``'s text. Takes ``generate``'s options (not beam search)."""
        if not isinstance(prompt, (str, torch.Tensor)):
            raise TypeError(f"stream() takes one prompt (a str or (1, T) ids), got {type(prompt).__name__}")
        ids, attention_mask, _, _, gen = prepare(self, prompt, attention_mask, "left", **options)
        session = decoding.causal_session(self, ids, attention_mask, gen)
        yield from decoding.stream(self, session, gen)
