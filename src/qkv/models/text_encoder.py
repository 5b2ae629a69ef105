"""The text encoder family (BERT, MiniLM, ...): a bidirectional stack with task heads and sentence embeddings."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from .. import masks
from ..nn import BlockConfig, LearnedPositions, Linear, TransformerEncoder
from . import _checks
from ._base import Model, ModelOutput, key_mask, shape_bucket

HEADS = (None, "sequence_classification", "token_classification", "question_answering")
POOLING = ("mean", "cls", "max", "mean_sqrt_len")


@dataclass
class TextEncoderConfig:
    vocab_size: int = 30522
    dim: int = 768
    n_layers: int = 12
    n_heads: int = 12
    ffn_dim: int = 3072
    max_positions: int = 512
    type_vocab_size: int = 2  # segment (token type) embeddings; 0 for none
    activation: str = "gelu"
    norm_eps: float = 1e-12
    dropout: float = 0.1
    attn_dropout: float = 0.1
    pad_token_id: int = 0
    pooler: bool = True  # BERT's tanh pooler over the first token
    head: str | None = None  # see HEADS
    num_labels: int = 2
    labels: list[str] | None = None  # names of the classes, index = class id
    pooling: str = "mean"  # sentence embeddings (`embed`): mean, cls, max, mean_sqrt_len
    normalize: bool = False  # L2-normalise sentence embeddings
    max_length: int = 512  # texts are truncated to this many tokens

    def __post_init__(self):
        _checks.check_types(self)
        _checks.sizes(self, "vocab_size", "dim", "n_heads", "ffn_dim", "max_positions", "num_labels", "max_length")
        _checks.sizes(self, "type_vocab_size", lo=0)
        _checks.layers(self, "n_layers")
        _checks.positive(self, "norm_eps")
        _checks.fractions(self, "dropout", "attn_dropout")
        _checks.choices(self, head=HEADS, pooling=POOLING)
        if not 0 <= self.pad_token_id < self.vocab_size:
            raise ValueError(f"TextEncoderConfig: pad_token_id={self.pad_token_id} must be a token id below "
                             f"vocab_size={self.vocab_size}")
        _checks.labels(self)
        if self.max_length > self.max_positions:
            raise ValueError(f"max_length={self.max_length} exceeds max_positions={self.max_positions}")
        _checks.heads(self, self.dim, self.n_heads, None)
        self.block()  # validates the activation
        _checks.budget(self, self.parameter_estimate(),
                       ("vocab_size", "dim", "n_layers", "ffn_dim", "max_positions", "type_vocab_size"))

    def parameter_estimate(self) -> int:
        """About how many parameters a model of this config holds (computed, nothing allocated)."""
        d = self.dim
        block = _checks.block_parameters(d, self.n_heads, d // self.n_heads, self.n_heads, self.ffn_dim,
                                         self.activation)
        embed = (self.vocab_size + self.max_positions + self.type_vocab_size) * d
        return embed + self.n_layers * block + (d * d if self.pooler else 0) + d * self.num_labels

    def block(self) -> BlockConfig:
        return BlockConfig(dim=self.dim, n_heads=self.n_heads, ffn_dim=self.ffn_dim, activation=self.activation,
                           norm="layer", norm_eps=self.norm_eps, prenorm=False, dropout=self.dropout,
                           attn_dropout=self.attn_dropout)


def _first_tokens(segments: torch.Tensor) -> torch.Tensor:
    """Where each text of a packed row starts: a (T,) bool mask over its ``segments``."""
    first = torch.ones_like(segments, dtype=torch.bool)
    first[1:] = segments[1:] != segments[:-1]
    return first


def pack(lengths: Sequence[int], max_tokens: int) -> list[list[int]]:
    """Consecutive texts grouped into rows of at most ``max_tokens`` tokens (a longer text: a row of its
    own), in order: the rows `TextEncoder.packed_rows` runs."""
    rows, row, width = [], [], 0
    for i, n in enumerate(lengths):
        if row and width + n > max_tokens:
            rows.append(row)
            row, width = [], 0
        row.append(i)
        width += n
    if row:
        rows.append(row)
    return rows


class TextEncoder(Model):
    """BERT-style encoder: token + position + segment embeddings, post-norm blocks, an optional head.

    ``forward`` gives hidden states (and logits for the head); ``embed`` turns texts
    into sentence vectors, ``classify`` texts into labels (with a tokenizer attached).
    """

    def text_pass(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None) -> ModelOutput:
        """The encoder over a text: what `qkv.explain` captures."""
        return self(input_ids, attention_mask)

    def __init__(self, config: TextEncoderConfig):
        super().__init__()
        self.config = c = config
        self.tokens = nn.Embedding(c.vocab_size, c.dim, padding_idx=c.pad_token_id)
        self.pos = LearnedPositions(c.max_positions, c.dim)
        self.token_type = nn.Embedding(c.type_vocab_size, c.dim) if c.type_vocab_size else None
        self.embed_norm = nn.LayerNorm(c.dim, eps=c.norm_eps)
        self.drop = nn.Dropout(c.dropout)
        self.encoder = TransformerEncoder(c.block(), c.n_layers, final_norm=False)
        self.pooler = Linear(c.dim, c.dim) if c.pooler else None
        if c.head == "question_answering":
            self.classifier = Linear(c.dim, 2)
        elif c.head is not None:
            self.classifier = Linear(c.dim, c.num_labels)
        if c.head == "sequence_classification" and self.pooler is None:
            raise ValueError("head='sequence_classification' classifies the pooled first token: set pooler=True")

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None,
                token_type_ids: torch.Tensor | None = None, position_ids: torch.Tensor | None = None,
                return_weights: bool = False, return_hidden: bool = False) -> ModelOutput:
        """input_ids (B, T) -> ModelOutput(last_hidden_state (B, T, C), pooled, logits / start & end logits)."""
        B, T = input_ids.shape
        if position_ids is None:
            position_ids = torch.arange(T, device=input_ids.device)
        x = self.tokens(input_ids) + self.pos(position_ids)
        if self.token_type is not None:
            tt = torch.zeros_like(input_ids) if token_type_ids is None else token_type_ids
            x = x + self.token_type(tt)
        x = self.drop(self.embed_norm(x))
        out = self.encoder(x, mask=key_mask(attention_mask, causal=False), return_weights=return_weights,
                           return_hidden=return_hidden)
        h = out.hidden
        result = ModelOutput(h, attentions=out.attentions, hidden_states=out.hidden_states)
        if self.pooler is not None:
            result.pooled = torch.tanh(self.pooler(h[:, 0]))
        head = self.config.head
        if head == "sequence_classification":
            result.logits = self.classifier(self.drop(result.pooled))
        elif head == "token_classification":
            result.logits = self.classifier(self.drop(h))
        elif head == "question_answering":
            result.logits = self.classifier(h)
            result.start_logits, result.end_logits = (t.squeeze(-1) for t in result.logits.split(1, dim=-1))
        return result

    def pool(self, hidden: torch.Tensor, attention_mask: torch.Tensor | None) -> torch.Tensor:
        """Sentence vectors (B, C) from hidden states (B, T, C), as the config's pooling says."""
        mode = self.config.pooling
        if mode == "cls":
            v = hidden[:, 0]
        else:
            m = torch.ones(hidden.shape[:2], device=hidden.device) if attention_mask is None else attention_mask
            m = m.to(hidden.dtype)[..., None]
            if mode == "max":
                v = hidden.masked_fill(m == 0, float("-inf")).amax(1)
            else:
                total, n = (hidden * m).sum(1), m.sum(1).clamp(min=1e-9)
                v = total / (n.sqrt() if mode == "mean_sqrt_len" else n)
        return F.normalize(v, dim=-1) if self.config.normalize else v

    def pool_packed(self, hidden: torch.Tensor, segments: torch.Tensor, n: int) -> torch.Tensor:
        """Sentence vectors (n, C) from packed hidden states (T, C) whose token t belongs to text
        ``segments[t]`` (0..n-1, each text's tokens contiguous), as the config's pooling says."""
        mode = self.config.pooling
        if mode == "cls":
            v = hidden[_first_tokens(segments)]
        elif mode == "max":
            v = hidden.new_full((n, hidden.shape[-1]), float("-inf"))
            v = v.scatter_reduce(0, segments[:, None].expand_as(hidden), hidden, "amax")
        else:
            total = hidden.new_zeros(n, hidden.shape[-1]).index_add_(0, segments, hidden)
            count = torch.bincount(segments, minlength=n).to(hidden.dtype)[:, None]
            v = total / (count.sqrt() if mode == "mean_sqrt_len" else count)
        return F.normalize(v, dim=-1) if self.config.normalize else v

    def packed_rows(self, ids: Sequence[Sequence[int]], type_ids: Sequence[Sequence[int]] | None = None,
                    max_tokens: int = 4096):
        """Run tokenized texts packed: the texts are laid end to end in rows of at most ``max_tokens``
        tokens (a longer text gets a row of its own), each text attending only to itself
        (`qkv.masks.document`) with positions from 0, so (almost) no compute goes to padding: a row
        runs at its `shape_bucket` length, at most 1/8 longer. Yields
        ``(index, hidden (T, C), segments (T,))`` per row: ``index`` the texts in the row, ``segments[t]``
        the row-local number of token t's text."""
        if isinstance(max_tokens, bool) or not isinstance(max_tokens, int) or max_tokens < 1:
            raise ValueError(f"packed_rows: max_tokens must be an int >= 1, got {max_tokens!r}")
        ids = [list(x) for x in ids]
        if type_ids is not None and [len(t) for t in type_ids] != [len(x) for x in ids]:
            raise ValueError("packed_rows: type_ids must hold one list per text, as long as its ids")
        limit = self.config.max_length
        for i, x in enumerate(ids):
            if not x or len(x) > limit:
                raise ValueError(f"packed_rows: text {i} has {len(x)} tokens; each text needs 1 to {limit} "
                                 "(the model's max_length): truncate it when tokenizing")
        device = self.device
        for row in pack([len(x) for x in ids], max_tokens):
            tokens = [t for i in row for t in ids[i]]
            n, width = len(tokens), shape_bucket(len(tokens))
            lengths = torch.tensor([len(ids[i]) for i in row] + [width - n], device=device)
            segments = torch.repeat_interleave(torch.arange(len(row) + 1, device=device), lengths)
            starts = torch.cumsum(lengths, 0) - lengths
            positions = (torch.arange(width, device=device) - starts[segments]).masked_fill(segments == len(row), 0)
            flat = torch.tensor(tokens + [self.config.pad_token_id] * (width - n), device=device)[None]
            x = self.tokens(flat) + self.pos(positions)
            if self.token_type is not None:
                types = (torch.zeros_like(flat) if type_ids is None else torch.tensor(
                    [t for i in row for t in type_ids[i]] + [0] * (width - n), device=device)[None])
                x = x + self.token_type(types)
            x = self.drop(self.embed_norm(x))
            hidden = self.encoder(x, mask=masks.document(segments[None])).hidden[0]
            yield torch.tensor(row), hidden[:n], segments[:n]

    @torch.no_grad()
    def embed_ids(self, ids: Sequence[Sequence[int]], type_ids: Sequence[Sequence[int]] | None = None,
                  max_tokens: int = 4096) -> torch.Tensor:
        """Sentence embeddings (N, C) of texts already tokenized (each as the tokenizer's ``encode`` gives
        it, special tokens included), computed packed (`packed_rows`): equal to `embed` of the texts, with
        no compute spent on padding, which is what a server batching texts of mixed lengths wants."""
        out = torch.empty(len(ids), self.config.dim)
        for index, hidden, segments in self.packed_rows(ids, type_ids, max_tokens):
            out[index] = self.pool_packed(hidden, segments, len(index)).float().cpu()
        return out

    @torch.no_grad()
    def classify_ids(self, ids: Sequence[Sequence[int]], type_ids: Sequence[Sequence[int]] | None = None,
                     max_tokens: int = 4096) -> torch.Tensor:
        """Class probabilities (N, num_labels) of texts already tokenized, computed packed (`packed_rows`):
        the sequence-classification head over each text's first token, equal to `classify`'s scores."""
        if self.config.head != "sequence_classification":
            raise ValueError("classify_ids() needs head='sequence_classification'; this model has "
                             f"head={self.config.head!r}")
        out = torch.empty(len(ids), self.config.num_labels)
        for index, hidden, segments in self.packed_rows(ids, type_ids, max_tokens):
            pooled = torch.tanh(self.pooler(hidden[_first_tokens(segments)]))
            out[index] = self.classifier(self.drop(pooled)).float().softmax(-1).cpu()
        return out

    def _over_batches(self, texts, batch_size: int, what: str, width: int, fn) -> tuple[torch.Tensor, bool]:
        """Run ``fn(output, batch) -> (b, width)`` over length-sorted batches; rows back in input order."""
        if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
            raise ValueError(f"{what}: batch_size must be an int >= 1, got {batch_size!r}")
        single = isinstance(texts, str)
        items = [texts] if single else list(texts)
        bad = next((i for i, t in enumerate(items) if not isinstance(t, str)), None)
        if bad is not None:
            raise TypeError(f"{what}: texts must be strings; item {bad} is {type(items[bad]).__name__}")
        tok = self._require_tokenizer(what)
        out = torch.empty(len(items), width)
        for idx, batch in tok.length_batches(items, batch_size, self.config.max_length, self.device):
            result = self(batch["input_ids"], batch["attention_mask"], batch.get("token_type_ids"))
            out[idx] = fn(result, batch).float().cpu()
        return out, single

    @torch.no_grad()
    def embed(self, texts: str | Sequence[str], batch_size: int = 32) -> torch.Tensor:
        """Sentence embeddings (N, C) for texts (a str gives (C,)), in input order.

        Texts are sorted by length and batched, so padding stays small.
        """
        out, single = self._over_batches(texts, batch_size, "embed()", self.config.dim,
                                         lambda r, b: self.pool(r.last_hidden_state, b["attention_mask"]))
        return out[0] if single else out

    @torch.no_grad()
    def classify(self, texts: str | Sequence[str], batch_size: int = 32) -> list[dict]:
        """Predicted label and class probabilities for each text (sequence-classification head)."""
        if self.config.head != "sequence_classification":
            raise ValueError(f"classify() needs head='sequence_classification'; this model has head={self.config.head!r}")
        probs, single = self._over_batches(texts, batch_size, "classify()", self.config.num_labels,
                                           lambda r, b: r.logits.float().softmax(-1))
        names = self.config.labels or [str(i) for i in range(self.config.num_labels)]
        result = [{"label": names[int(p.argmax())], "score": float(p.max()),
                   "scores": {n: float(x) for n, x in zip(names, p)}} for p in probs]
        return result[0] if single else result
