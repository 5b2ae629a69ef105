"""What every model family shares: the output record, the tokenizer slot, backend switching."""

from __future__ import annotations

from dataclasses import dataclass, fields

import torch
from torch import nn

from .. import masks
from ..nn import KVCache, MultiHeadAttention


@dataclass
class ModelOutput:
    """What a model returns; fields a model does not produce stay None."""

    last_hidden_state: torch.Tensor
    logits: torch.Tensor | None = None
    attentions: list[torch.Tensor] | None = None  # one (B, H, Tq, Tk) tensor per layer (return_weights=True)
    hidden_states: list[torch.Tensor] | None = None  # embeddings, then the output of each layer
    cache: KVCache | None = None
    pooled: torch.Tensor | None = None  # BERT pooler output
    start_logits: torch.Tensor | None = None  # extractive question answering
    end_logits: torch.Tensor | None = None
    cross_attentions: list[torch.Tensor] | None = None
    encoder_last_hidden_state: torch.Tensor | None = None
    encoder_attentions: list[torch.Tensor] | None = None

    def __getitem__(self, name: str):
        return getattr(self, name)

    def keys(self) -> list[str]:
        return [f.name for f in fields(self) if getattr(self, f.name) is not None]


class Model(nn.Module):
    """Base of the model families: a config, an optional tokenizer, attention backend control."""

    config: object
    tokenizer = None  # set by qkv.load (a qkv.pretrained.Tokenizer)
    continues_prompt = False  # generate() returns a continuation of the prompt (decoder-only models)
    text_pass = None  # text models: fn(input_ids, attention_mask), the pass whose self-attention qkv.explain shows

    @torch.no_grad()
    def init_weights(self, std: float = 0.02) -> Model:
        """Fresh weights for training from scratch (GPT-2 / BERT scheme): N(0, std) matrices and
        embeddings, zero biases, unit norms; residual output projections scaled by 1/sqrt(2 * layers)."""
        layers = sum(1 for m in self.modules() if isinstance(m, MultiHeadAttention) and not m.is_cross)
        for name, m in self.named_modules():
            if isinstance(m, nn.Linear):
                scale = std / (2 * max(layers, 1)) ** 0.5 if name.endswith((".o", ".down")) else std
                m.weight.normal_(0.0, scale)
                if m.bias is not None:
                    m.bias.zero_()
            elif isinstance(m, nn.Embedding):
                m.weight.normal_(0.0, std)
                if m.padding_idx is not None:
                    m.weight[m.padding_idx].zero_()
            elif isinstance(m, nn.LayerNorm):
                if m.weight is not None:
                    m.weight.fill_(1.0)
                if m.bias is not None:
                    m.bias.zero_()
        return self

    def set_backend(self, backend: str) -> Model:
        """Use attention backend ``backend`` ("auto", "sdpa", "chunked", "eager", ...) in every layer."""
        from ..backends import get

        if backend != "auto":
            get(backend)  # unknown names fail here, with the list of known ones
        for m in self.modules():
            if isinstance(m, MultiHeadAttention):
                m.backend = backend
        return self

    @property
    def backend(self) -> str:
        names = {m.backend for m in self.modules() if isinstance(m, MultiHeadAttention)}
        return names.pop() if len(names) == 1 else "mixed"

    @property
    def device(self) -> torch.device:
        return next(self.parameters()).device

    def quantize(self, mode: str = "int8", *, activations: str = "dynamic", skip: tuple[str, ...] = ()) -> Model:
        """int8 weights (one scale per output row) in every linear layer, for CPU inference; in place.

        ``activations="dynamic"`` also quantizes each layer's input, one scale per row, and multiplies in
        int8 (the fastest); ``"none"`` keeps inputs in float (weight-only, closer to float32). ``skip``: module
        names to keep in float. Embeddings, norms and convolutions stay float. See `qkv.nn.quantized`.
        """
        from ..nn.quantized import quantize

        quantize(self, mode, activations=activations, skip=skip)
        self.quantized = (mode, activations)
        return self

    quantized: tuple[str, str] | None = None  # (mode, activations) after `quantize`

    def num_parameters(self) -> int:
        """Distinct parameters (tied weights counted once)."""
        return sum(p.numel() for p in {id(p): p for p in self.parameters()}.values())

    def _require_tokenizer(self, what: str):
        if self.tokenizer is None:
            raise ValueError(
                f"{what} needs a tokenizer: load the model with qkv.load(...) from a folder with tokenizer.json, "
                "or set model.tokenizer = qkv.pretrained.Tokenizer.from_file(...)"
            )
        return self.tokenizer


def key_mask(attention_mask: torch.Tensor | None, causal: bool):
    """The attention mask for ``attention_mask`` (B, Tk) of 0/1 (None: no padding), optionally causal."""
    pad = None
    if attention_mask is not None and not bool(attention_mask.bool().all()):
        pad = masks.key_padding(attention_mask)
    if causal:
        return masks.causal() if pad is None else masks.causal() & pad
    return pad


def step_mask(attention_mask: torch.Tensor | None):
    """Mask for one decoding step (Tq = 1 sees every cached key it may): a (B, 1, 1, Tk) bool tensor or None."""
    if attention_mask is None or bool(attention_mask.bool().all()):
        return None
    return attention_mask.bool()[:, None, None, :]


def positions_from_mask(attention_mask: torch.Tensor) -> torch.Tensor:
    """Positions that skip left padding, as Hugging Face's generate computes them: (B, T)."""
    pos = attention_mask.long().cumsum(-1) - 1
    return pos.masked_fill(attention_mask == 0, 1)


def shape_bucket(n: int) -> int:
    """``n`` rounded up to one of a few sizes per octave (a multiple of 2**(bits(n) - 4); at most 1/8
    more): the lengths packed encoder rows and batched prefills run at (the rest is padding nobody
    reads). oneDNN builds and keeps a kernel for each new matrix shape, so rows of every possible
    length made a long-running server's memory grow without end (376 MB after 150 batches of MiniLM)."""
    step = 1 << max(0, n.bit_length() - 4)
    return -(-n // step) * step
