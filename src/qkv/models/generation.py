"""Token-by-token decoding shared by the causal and encoder-decoder families.

A model supplies ``step(tokens) -> logits`` (one position per sequence, reusing
its KV cache); this module picks the next token (greedy, temperature, top-k,
top-p) and handles stop tokens: a sequence that emitted one is padded from
then on, and decoding ends when every sequence has stopped or
``max_new_tokens`` is reached, as Hugging Face's ``generate`` does.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch


@dataclass
class GenerationConfig:
    max_new_tokens: int = 32
    do_sample: bool = False  # False: greedy
    temperature: float = 1.0
    top_k: int | None = None
    top_p: float | None = None
    eos_token_id: int | Sequence[int] | None = None  # stop tokens
    pad_token_id: int | None = None  # written after a sequence stops; defaults to the first stop token
    seed: int | None = None  # sampling seed (None: torch's global generator)
    suppress_tokens: Sequence[int] = ()  # never generated
    begin_suppress_tokens: Sequence[int] = ()  # not generated as the first new token

    def __post_init__(self):
        if isinstance(self.max_new_tokens, bool) or not isinstance(self.max_new_tokens, int) or self.max_new_tokens < 0:
            raise ValueError(f"max_new_tokens must be an int >= 0, got {self.max_new_tokens!r}")
        if isinstance(self.temperature, bool) or not isinstance(self.temperature, (int, float)) \
                or not 0 < self.temperature < float("inf"):
            raise ValueError(f"temperature must be a finite number > 0, got {self.temperature!r}; "
                             "use do_sample=False for greedy")
        if self.top_k is not None and (not isinstance(self.top_k, int) or self.top_k < 1):
            raise ValueError(f"top_k must be an int >= 1, got {self.top_k!r}")
        if self.top_p is not None and not 0 < self.top_p <= 1:
            raise ValueError(f"top_p must be in (0, 1], got {self.top_p!r}")
        if self.seed is not None and (isinstance(self.seed, bool) or not isinstance(self.seed, int)
                                      or not 0 <= self.seed < 2**63):
            raise ValueError(f"seed must be an int in [0, 2**63), got {self.seed!r}")

    @property
    def stop_ids(self) -> list[int]:
        e = self.eos_token_id
        return [] if e is None else [int(e)] if isinstance(e, int) else [int(x) for x in e]


def next_token(logits: torch.Tensor, cfg: GenerationConfig, generator: torch.Generator | None,
               first: bool = False) -> torch.Tensor:
    """Choose one token per row of logits (B, V); ``first``: the first new token (begin suppression applies)."""
    banned = list(cfg.suppress_tokens) + (list(cfg.begin_suppress_tokens) if first else [])
    if banned:
        logits = logits.clone()
        logits[:, banned] = float("-inf")
    if not cfg.do_sample:
        return logits.argmax(-1)
    scores = logits.float() / cfg.temperature
    if cfg.top_k is not None and cfg.top_k < scores.shape[-1]:
        kth = scores.topk(cfg.top_k, dim=-1).values[..., -1:]
        scores = scores.masked_fill(scores < kth, float("-inf"))
    if cfg.top_p is not None and cfg.top_p < 1:
        sorted_scores, order = scores.sort(dim=-1, descending=True)
        cum = sorted_scores.softmax(-1).cumsum(-1)
        drop = cum - sorted_scores.softmax(-1) >= cfg.top_p  # keep the smallest prefix reaching top_p
        scores = scores.masked_fill(drop.scatter(-1, order, drop), float("-inf"))
    probs = scores.softmax(-1)
    return torch.multinomial(probs, 1, generator=generator).squeeze(-1)


def decode(step: Callable[[torch.Tensor], torch.Tensor], logits: torch.Tensor, cfg: GenerationConfig) -> torch.Tensor:
    """Generate up to ``cfg.max_new_tokens`` tokens from the first logits (B, V); returns (B, n) new tokens."""
    B = logits.shape[0]
    device = logits.device
    generator = None
    if cfg.do_sample and cfg.seed is not None:
        generator = torch.Generator(device=device).manual_seed(cfg.seed)
    stops = torch.tensor(cfg.stop_ids, device=device, dtype=torch.long)
    pad = cfg.pad_token_id if cfg.pad_token_id is not None else (cfg.stop_ids[0] if cfg.stop_ids else 0)
    running = torch.ones(B, dtype=torch.bool, device=device)
    out = []
    for i in range(cfg.max_new_tokens):
        tok = next_token(logits, cfg, generator, first=i == 0)
        tok = torch.where(running, tok, pad)
        out.append(tok)
        if stops.numel():
            running &= ~torch.isin(tok, stops)
            if not bool(running.any()):
                break
        if i + 1 < cfg.max_new_tokens:
            logits = step(tok)
    if not out:
        return torch.empty(B, 0, dtype=torch.long, device=device)
    return torch.stack(out, dim=1)


def prepare(model, input_ids, attention_mask, padding_side: str, **options):
    """Shared start of ``generate``: text prompts are tokenized (needs ``model.tokenizer``); options and the
    config's stop/pad tokens become a `GenerationConfig`. Returns (ids, mask, texts or None, single, config)."""
    texts, single = None, isinstance(input_ids, str)
    if single or (isinstance(input_ids, Sequence) and input_ids and isinstance(input_ids[0], str)):
        texts = [input_ids] if single else list(input_ids)
        enc = model._require_tokenizer("generate() on text").encode_batch(texts, padding_side=padding_side,
                                                                         device=model.device)
        input_ids, attention_mask = enc["input_ids"], enc["attention_mask"]
    c = model.config
    if options.get("eos_token_id") is None:
        options["eos_token_id"] = c.eos_token_id
    if options.get("pad_token_id") is None:
        options["pad_token_id"] = c.pad_token_id
    return input_ids, attention_mask, texts, single, GenerationConfig(**options)


def finish(model, ids: torch.Tensor, new: torch.Tensor, texts, single: bool):
    """Ids as they are, or the new tokens decoded to text when the prompts were text."""
    if texts is None:
        return ids
    decoded = [model.tokenizer.decode(row.tolist()) for row in new]
    return decoded[0] if single else decoded
