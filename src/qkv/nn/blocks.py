"""Transformer blocks and stacks: attention, optional cross-attention and feed-forward, each with a residual."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import torch
from torch import nn

from .attention import KVCache, MultiHeadAttention
from .feedforward import ACTIVATIONS, GATED, FeedForward
from .norms import NORMS, make_norm
from .positions import RotaryEmbedding


@dataclass
class BlockConfig:
    """One transformer block. Model configs build this; see `TransformerBlock`."""

    dim: int
    n_heads: int
    ffn_dim: int
    n_kv_heads: int | None = None  # None: = n_heads (multi-head); 1: multi-query
    head_dim: int | None = None  # None: dim // n_heads
    activation: str = "gelu"  # relu, gelu, gelu_tanh, silu, or gated: swiglu, geglu, geglu_tanh, reglu
    norm: str = "layer"  # "layer" or "rms"
    norm_eps: float = 1e-5
    norm_bias: bool = True  # LayerNorm bias
    prenorm: bool = True  # x + f(norm(x)) (GPT-2, Llama, T5); False: norm(x + f(x)) (BERT, BART)
    bias: bool = True  # biases of the attention output (and, by default, q/k/v and feed-forward) projections
    qkv_bias: bool | None = None  # biases of the q, k, v projections; None: = bias
    ffn_bias: bool | None = None  # biases of the feed-forward projections; None: = bias (Llama sets them apart)
    cross_attention: bool = False  # decoder blocks of encoder-decoder models
    context_dim: int | None = None  # width of the cross-attended context; None: dim
    qk_norm: str | None = None  # "rms" / "layer" normalisation of each query and key head
    scale: float | None = None  # attention scale; None: 1/sqrt(head_dim) (T5 uses 1.0)
    softcap: float | None = None  # attention-logit soft-cap, cap * tanh(score / cap) (Gemma 2)
    norm_offset: float = 0.0  # RMSNorm scales by (offset + weight): Gemma's (1 + w) is 1.0
    post_norms: bool = False  # also norm each sublayer's output before its residual add (Gemma 2 / 3)
    dropout: float = 0.0
    attn_dropout: float = 0.0

    def __post_init__(self):
        for name in ("dim", "n_heads", "ffn_dim"):
            if getattr(self, name) <= 0:
                raise ValueError(f"{name}={getattr(self, name)} must be positive")
        kv = self.n_kv_heads or self.n_heads
        if self.n_heads % kv:
            raise ValueError(f"n_heads={self.n_heads} is not divisible by n_kv_heads={kv}; choose a divisor of {self.n_heads}")
        if self.head_dim is None and self.dim % self.n_heads:
            raise ValueError(f"dim={self.dim} is not divisible by n_heads={self.n_heads}; set head_dim")
        if self.activation not in ACTIVATIONS and self.activation not in GATED:
            raise ValueError(f"activation={self.activation!r} is not one of {sorted(ACTIVATIONS) + sorted(GATED)}")
        if self.norm not in NORMS:
            raise ValueError(f"norm={self.norm!r} is not one of {NORMS}")
        if self.post_norms and not self.prenorm:
            raise ValueError("post_norms=True needs prenorm=True (the sandwich of Gemma 2 / 3); a post-norm block "
                             "already norms each output")
        if self.softcap is not None and not self.softcap > 0:
            raise ValueError(f"softcap={self.softcap} must be a number > 0, or None for no cap")


class TransformerBlock(nn.Module):
    """Self-attention, optional cross-attention, feed-forward; each wrapped in a residual and a norm."""

    def __init__(self, cfg: BlockConfig):
        super().__init__()
        self.cfg = cfg
        self.prenorm = cfg.prenorm
        qkv_bias = cfg.bias if cfg.qkv_bias is None else cfg.qkv_bias
        attn = dict(n_kv_heads=cfg.n_kv_heads, head_dim=cfg.head_dim, bias=qkv_bias, out_bias=cfg.bias,
                    qk_norm=cfg.qk_norm, norm_eps=cfg.norm_eps, dropout=cfg.attn_dropout, scale=cfg.scale,
                    softcap=cfg.softcap, norm_offset=cfg.norm_offset)
        self.attn = MultiHeadAttention(cfg.dim, cfg.n_heads, **attn)
        self.attn_norm = self._norm()
        if cfg.cross_attention:
            self.cross = MultiHeadAttention(cfg.dim, cfg.n_heads, kv_dim=cfg.context_dim or cfg.dim, **attn)
            self.cross_norm = self._norm()
        ffn_bias = cfg.bias if cfg.ffn_bias is None else cfg.ffn_bias
        self.ffn = FeedForward(cfg.dim, cfg.ffn_dim, cfg.activation, bias=ffn_bias, dropout=cfg.dropout)
        self.ffn_norm = self._norm()
        if cfg.post_norms:  # "sandwich" norms: x + post(f(pre(x))) (Gemma 2, arXiv:2408.00118)
            self.post_attn_norm, self.post_ffn_norm = self._norm(), self._norm()
        self.drop = nn.Dropout(cfg.dropout)

    def _norm(self) -> nn.Module:
        c = self.cfg
        return make_norm(c.norm, c.dim, c.norm_eps, c.norm_bias, offset=c.norm_offset)

    def _residual(self, x, norm, f, post=None):
        if self.prenorm:
            y, w = f(norm(x))
            if post is not None:
                y = post(y)
            return x + self.drop(y), w
        y, w = f(x)
        return norm(x + self.drop(y)), w

    def forward(self, x: torch.Tensor, *, mask=None, bias=None, rotary: RotaryEmbedding | None = None,
                positions: torch.Tensor | None = None, cache: KVCache | None = None, layer: int = 0,
                context: torch.Tensor | None = None, context_mask=None, context_bias=None,
                return_weights: bool = False):
        """x (B, T, C) -> (x, self-attention weights or None, cross-attention weights or None)."""
        post = self.cfg.post_norms and self.prenorm
        x, w_self = self._residual(x, self.attn_norm, lambda h: self.attn(
            h, mask=mask, bias=bias, rotary=rotary, positions=positions, cache=cache, layer=layer,
            return_weights=return_weights), self.post_attn_norm if post else None)
        w_cross = None
        if self.cfg.cross_attention:
            x, w_cross = self._residual(x, self.cross_norm, lambda h: self.cross(
                h, context=context, mask=context_mask, bias=context_bias, cache=cache, layer=layer,
                return_weights=return_weights))
        x, _ = self._residual(x, self.ffn_norm, lambda h: (self.ffn(h), None), self.post_ffn_norm if post else None)
        return x, w_self, w_cross


@dataclass
class StackOutput:
    hidden: torch.Tensor  # (B, T, C) after the last block (and final norm)
    hidden_states: list[torch.Tensor] | None  # input of each block, then the output
    attentions: list[torch.Tensor] | None  # self-attention weights per block
    cross_attentions: list[torch.Tensor] | None


class TransformerEncoder(nn.Module):
    """A stack of blocks with an optional final norm (pre-norm models end with one)."""

    def __init__(self, cfg: BlockConfig, n_layers: int, final_norm: bool | None = None):
        super().__init__()
        self.layers = nn.ModuleList(TransformerBlock(cfg) for _ in range(n_layers))
        final = cfg.prenorm if final_norm is None else final_norm
        self.norm = make_norm(cfg.norm, cfg.dim, cfg.norm_eps, cfg.norm_bias, offset=cfg.norm_offset) if final else None

    def forward(self, x: torch.Tensor, *, return_weights: bool = False, return_hidden: bool = False,
                per_layer: Mapping[str, Sequence] | None = None, **kwargs) -> StackOutput:
        """Run every block; ``kwargs`` (mask, bias, rotary, positions, cache, context...) go to each block.
        ``per_layer`` maps an argument to one value per block (e.g. a mask and a rotary embedding per
        layer where local and global layers alternate: Mistral, Gemma 2 / 3)."""
        if per_layer:
            for name, values in per_layer.items():
                if len(values) != len(self.layers) or name in kwargs:
                    raise ValueError(f"per_layer[{name!r}] must hold one value per layer ({len(self.layers)}), "
                                     f"got {len(values)}, and not be given as a plain argument too")
        hidden = [] if return_hidden else None
        attns = [] if return_weights else None
        cross = [] if return_weights else None
        for i, block in enumerate(self.layers):
            if hidden is not None:
                hidden.append(x)
            here = {name: values[i] for name, values in per_layer.items()} if per_layer else {}
            x, w, wc = block(x, layer=i, return_weights=return_weights, **kwargs, **here)
            if attns is not None:
                attns.append(w)
            if cross is not None and wc is not None:
                cross.append(wc)
        if self.norm is not None:
            x = self.norm(x)
        if hidden is not None:
            hidden.append(x)
        return StackOutput(x, hidden, attns, cross or None)


class TransformerDecoder(TransformerEncoder):
    """A stack of blocks that also cross-attend to a context (the encoder output)."""

    def __init__(self, cfg: BlockConfig, n_layers: int, final_norm: bool | None = None):
        if not cfg.cross_attention:
            cfg = BlockConfig(**{**cfg.__dict__, "cross_attention": True})
        super().__init__(cfg, n_layers, final_norm)
