"""The causal language model family: GPT-2 and Llama architectures (and their mixes) in one config."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import nn

from ..nn import BlockConfig, KVCache, LearnedPositions, Linear, RotaryEmbedding, TransformerEncoder
from . import _checks
from ._base import Model, ModelOutput, key_mask, positions_from_mask, step_mask
from .generation import decode, finish, prepare


@dataclass
class CausalLMConfig:
    """Defaults are GPT-2 (124M). Llama: positions="rotary", norm="rms", activation="swiglu", bias=False."""

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
    tie_embeddings: bool = True
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
                      "rotary_dim")
        _checks.layers(self, "n_layers")
        _checks.tokens(self, "bos_token_id", "eos_token_id", "pad_token_id")
        _checks.sizes(self, "token_conv", lo=0, hi=_checks.MAX_SIZE)
        _checks.positive(self, "rope_theta", "norm_eps")
        _checks.fractions(self, "dropout", "attn_dropout")
        _checks.choices(self, positions=("learned", "rotary"), qk_norm=(None, "rms", "layer"))
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
                           norm_eps=self.norm_eps, prenorm=True, bias=self.bias, ffn_bias=self.mlp_bias,
                           qk_norm=self.qk_norm,
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
        head_dim = c.head_dim or c.dim // c.n_heads
        self.rotary = (RotaryEmbedding(c.rotary_dim or head_dim, c.rope_theta, c.rope_interleaved)
                       if c.positions == "rotary" else None)
        self.drop = nn.Dropout(c.dropout)
        self.token_conv = (nn.Conv1d(c.dim, c.dim, c.token_conv, groups=c.dim, bias=False)
                           if c.token_conv else None)
        self.stack = TransformerEncoder(c.block(), c.n_layers, final_norm=True)
        self.lm_head = Linear(c.dim, c.vocab_size, bias=False)
        if c.tie_embeddings:
            self.lm_head.weight = self.tokens.weight

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None,
                position_ids: torch.Tensor | None = None, cache: KVCache | None = None,
                return_weights: bool = False, return_hidden: bool = False, last_only: bool = False,
                logits_for: torch.Tensor | None = None) -> ModelOutput:
        """input_ids (B, T) -> ModelOutput(last_hidden_state, logits (B, T, V), attentions, cache).

        ``attention_mask`` (B, Tk) covers the cached positions too. ``position_ids``
        default to ``cache.length + arange(T)``. ``last_only`` computes logits for
        the last position only (what decoding needs); ``logits_for``, a (B, T) bool
        mask, for the marked positions only, as (N, V) in row-major order (training
        on sparse labels, where a full (B, T, V) tensor would be mostly waste).
        """
        B, T = input_ids.shape
        start = 0 if cache is None else cache.length
        if position_ids is None:
            position_ids = torch.arange(start, start + T, device=input_ids.device)
        x = self.tokens(input_ids)
        if self.pos is not None:
            x = x + self.pos(position_ids)
        if self.token_conv is not None:
            x = x + self._convolve(x, attention_mask, cache, start)
        mask = step_mask(attention_mask) if T == 1 and start > 0 else key_mask(attention_mask, causal=True)
        out = self.stack(self.drop(x), mask=mask, rotary=self.rotary, positions=position_ids, cache=cache,
                          return_weights=return_weights, return_hidden=return_hidden)
        if cache is not None:
            cache.advance(T)
        h = out.hidden
        logits = self.lm_head(h[:, -1:] if last_only else h if logits_for is None else h[logits_for])
        return ModelOutput(h, logits=logits, attentions=out.attentions, hidden_states=out.hidden_states, cache=cache)

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
                 *, max_new_tokens: int = 32, do_sample: bool = False, temperature: float = 1.0,
                 top_k: int | None = None, top_p: float | None = None, eos_token_id=None,
                 pad_token_id: int | None = None, seed: int | None = None):
        """Continue each prompt with a KV cache. Prompts are token ids (B, T), left-padded with an
        ``attention_mask``, or text (needs a tokenizer); returns ids (B, T + n), or text for text.
        Stops at ``eos_token_id`` (default: the config's) or after ``max_new_tokens``.
        """
        input_ids, attention_mask, texts, single, gen = prepare(
            self, input_ids, attention_mask, "left", max_new_tokens=max_new_tokens, do_sample=do_sample,
            temperature=temperature, top_k=top_k, top_p=top_p, eos_token_id=eos_token_id,
            pad_token_id=pad_token_id, seed=seed)
        c = self.config
        B, T = input_ids.shape
        if attention_mask is None:
            attention_mask = torch.ones_like(input_ids)
        positions = positions_from_mask(attention_mask)
        cache = KVCache(c.n_layers, capacity=T + max_new_tokens)
        logits = self(input_ids, attention_mask, positions, cache=cache, last_only=True).logits[:, -1]
        state = {"mask": attention_mask, "pos": positions[:, -1:]}

        def step(tok: torch.Tensor) -> torch.Tensor:
            state["mask"] = torch.cat([state["mask"], state["mask"].new_ones(B, 1)], dim=1)
            state["pos"] = state["pos"] + 1
            return self(tok[:, None], state["mask"], state["pos"], cache=cache).logits[:, -1]

        new = decode(step, logits, gen)
        return finish(self, torch.cat([input_ids, new], dim=1), new, texts, single)
