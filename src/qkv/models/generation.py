"""Token-by-token decoding shared by the causal and encoder-decoder families.

A model supplies ``step(tokens) -> logits`` (one position per sequence, reusing
its KV cache); this module picks the next token and handles stop tokens: a
sequence that emitted one is padded from then on, and decoding ends when every
sequence has stopped or ``max_new_tokens`` is reached, as Hugging Face's
``generate`` does.

Choosing a token is two stages, in transformers' order: logits processors,
which apply to greedy decoding, sampling and beam search alike (repetition
penalty, OpenAI's presence/frequency penalties, suppressed tokens), then, only
when sampling, warpers (temperature, top-k, top-p, min-p). Beam search lives in
`qkv.models.beam`, incremental detokenization and stop strings in
`qkv.models.streaming`.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, fields

import torch

log = logging.getLogger(__name__)


def _number(v) -> bool:
    return not isinstance(v, bool) and isinstance(v, (int, float)) and math.isfinite(v)


@dataclass
class GenerationConfig:
    max_new_tokens: int = 32
    do_sample: bool = False  # False: greedy (or beam search with num_beams > 1)
    temperature: float = 1.0
    top_k: int | None = None
    top_p: float | None = None
    min_p: float | None = None  # keep tokens with p >= min_p * p(top token) (arXiv:2407.01082)
    repetition_penalty: float = 1.0  # CTRL's penalty (arXiv:1909.05858) over prompt + generated tokens
    presence_penalty: float = 0.0  # OpenAI: minus this for each token generated at least once
    frequency_penalty: float = 0.0  # OpenAI: minus this times the times a token was generated
    eos_token_id: int | Sequence[int] | None = None  # stop tokens
    pad_token_id: int | None = None  # written after a sequence stops; defaults to the first stop token
    seed: int | None = None  # sampling seed (None: torch's global generator)
    suppress_tokens: Sequence[int] = ()  # never generated
    begin_suppress_tokens: Sequence[int] = ()  # not generated as the first new token
    stop: str | Sequence[str] = ()  # stop strings: the text ends before the first one (needs a tokenizer)
    num_beams: int = 1  # > 1: beam search, as transformers' generate(num_beams=...)
    length_penalty: float = 1.0  # beam score = sum log p / generated_length ** length_penalty
    early_stopping: bool | str = False  # True, False or "never", as transformers
    num_return_sequences: int = 1  # best beams (or samples) returned per prompt

    def __post_init__(self):
        if self.suppress_tokens is None:
            self.suppress_tokens = ()
        if self.begin_suppress_tokens is None:
            self.begin_suppress_tokens = ()
        if isinstance(self.stop, str):
            self.stop = (self.stop,)
        elif isinstance(self.stop, (list, tuple)):
            self.stop = tuple(self.stop)
        elif self.stop is None:
            self.stop = ()
        else:
            raise ValueError(f"stop must be a string or a list of strings, got {self.stop!r}")
        self._check_counts()
        self._check_sampling()
        self._check_penalties()
        self._check_beams()
        self._check_tokens()

    def _check_counts(self):
        for name, lo in (("max_new_tokens", 0), ("num_beams", 1), ("num_return_sequences", 1)):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int) or v < lo:
                raise ValueError(f"{name} must be an int >= {lo}, got {v!r}")
        if self.seed is not None and (isinstance(self.seed, bool) or not isinstance(self.seed, int)
                                      or not 0 <= self.seed < 2**63):
            raise ValueError(f"seed must be an int in [0, 2**63), got {self.seed!r}")

    def _check_sampling(self):
        if not isinstance(self.do_sample, bool):
            raise ValueError(f"do_sample must be True or False, got {self.do_sample!r}")
        if not _number(self.temperature) or self.temperature <= 0:
            raise ValueError(f"temperature must be a finite number > 0, got {self.temperature!r}; "
                             "use do_sample=False for greedy")
        if self.top_k is not None and (isinstance(self.top_k, bool) or not isinstance(self.top_k, int)
                                       or self.top_k < 1):
            raise ValueError(f"top_k must be an int >= 1 (or None for no limit), got {self.top_k!r}")
        if self.top_p is not None and not (_number(self.top_p) and 0 < self.top_p <= 1):
            raise ValueError(f"top_p must be in (0, 1], got {self.top_p!r}")
        if self.min_p is not None and not (_number(self.min_p) and 0 <= self.min_p <= 1):
            raise ValueError(f"min_p must be in [0, 1] (or None), got {self.min_p!r}")

    def _check_penalties(self):
        if not _number(self.repetition_penalty) or self.repetition_penalty <= 0:
            raise ValueError(f"repetition_penalty must be a finite number > 0 (1.0: none; > 1 discourages "
                             f"repeats), got {self.repetition_penalty!r}")
        for name in ("presence_penalty", "frequency_penalty"):
            v = getattr(self, name)
            if not _number(v) or not -2 <= v <= 2:
                raise ValueError(f"{name} must be a number in [-2, 2] as in OpenAI's API (0: none), got {v!r}")

    def _check_beams(self):
        if not _number(self.length_penalty):
            raise ValueError(f"length_penalty must be a finite number (1.0: average log-probability), "
                             f"got {self.length_penalty!r}")
        if not (isinstance(self.early_stopping, bool) or self.early_stopping == "never"):
            raise ValueError(f"early_stopping must be True, False or 'never', got {self.early_stopping!r}")
        if self.num_beams > 1 and self.num_return_sequences > self.num_beams:
            raise ValueError(f"num_return_sequences={self.num_return_sequences} must be <= num_beams="
                             f"{self.num_beams}: beam search returns its best beams; raise num_beams")
        if self.num_beams == 1 and self.num_return_sequences > 1 and not self.do_sample:
            raise ValueError(f"num_return_sequences={self.num_return_sequences} needs do_sample=True or "
                             "num_beams > 1: greedy decoding returns one sequence per prompt")

    def _check_tokens(self):
        if not all(isinstance(s, str) and s for s in self.stop):
            raise ValueError(f"stop must be a non-empty string or a list of them, got {self.stop!r}")
        e = self.eos_token_id
        ids = [] if e is None else [e] if isinstance(e, int) else list(e)
        for name, vals in (("eos_token_id", ids), ("suppress_tokens", list(self.suppress_tokens)),
                           ("begin_suppress_tokens", list(self.begin_suppress_tokens)),
                           ("pad_token_id", [] if self.pad_token_id is None else [self.pad_token_id])):
            bad = [v for v in vals if isinstance(v, bool) or not isinstance(v, int) or v < 0]
            if bad:
                raise ValueError(f"{name} must hold token ids (ints >= 0), got {bad!r}")

    @property
    def stop_ids(self) -> list[int]:
        e = self.eos_token_id
        return [] if e is None else [int(e)] if isinstance(e, int) else [int(x) for x in e]

    @property
    def uses_history(self) -> bool:
        """Whether choosing a token needs the tokens so far (a penalty is set)."""
        return self.repetition_penalty != 1.0 or self.presence_penalty != 0 or self.frequency_penalty != 0


# generation_config.json keys that are bookkeeping or handled by the model config, not decoding options.
_NOT_OPTIONS = {"transformers_version", "_from_model_config", "use_cache", "return_dict_in_generate",
                "output_attentions", "output_hidden_states", "output_scores", "output_logits", "bos_token_id",
                "decoder_start_token_id", "forced_decoder_ids", "alignment_heads", "lang_to_id", "task_to_id",
                "is_multilingual", "no_timestamps_token_id", "prev_sot_token_id", "max_initial_timestamp_index",
                "cache_implementation"}
# keys transformers reads with these defaults: a value equal to its default changes nothing.
_NO_OP = {"num_beam_groups": 1, "diversity_penalty": 0.0, "typical_p": 1.0, "epsilon_cutoff": 0.0,
          "eta_cutoff": 0.0, "encoder_repetition_penalty": 1.0, "no_repeat_ngram_size": 0,
          "encoder_no_repeat_ngram_size": 0, "min_length": 0, "min_new_tokens": 0, "max_length": 20,
          "remove_invalid_values": False, "renormalize_logits": False, "guidance_scale": 1.0,
          "low_memory": False, "constraints": None, "force_words_ids": None, "top_h": None}
_SAME = ("eos_token_id", "pad_token_id", "max_new_tokens", "do_sample", "temperature", "top_p", "min_p",
         "repetition_penalty", "num_beams", "length_penalty", "early_stopping", "num_return_sequences",
         "suppress_tokens", "begin_suppress_tokens")


def generation_defaults(mapping: Mapping, *, strict: bool = False) -> dict:
    """A Hugging Face ``generation_config.json`` dict -> `GenerationConfig` keyword defaults.

    Keys qkv follows are kept (``top_k=0`` means no limit; ``temperature=0`` means greedy); bookkeeping
    keys are dropped; any other key with a non-default value is logged as a warning, or raises a
    ``ValueError`` naming it with ``strict=True``. The result is validated as a `GenerationConfig`.
    """
    out, unsupported = {}, []
    for key, value in mapping.items():
        if value is None or key in _NOT_OPTIONS:
            continue
        if key in _SAME:
            out[key] = list(value) if isinstance(value, (list, tuple)) else value
        elif key == "top_k":
            if value:
                out["top_k"] = value
        elif key not in _NO_OP or _NO_OP[key] != value:
            unsupported.append(f"{key}={value!r}")
    if out.get("temperature", 1.0) == 0:  # transformers' convention for "greedy"
        del out["temperature"]
        out["do_sample"] = False
    if unsupported:
        msg = (f"generation_config.json: {', '.join(unsupported)} not supported by qkv's generate; "
               "ignored (remove the keys to silence this)")
        if strict:
            raise ValueError(msg)
        log.warning(msg)
    try:
        GenerationConfig(**out)
    except ValueError as e:
        raise ValueError(f"generation_config.json: {e}") from None
    return out


# ---- choosing a token -------------------------------------------------------------------------------

def _seen(history: torch.Tensor, vocab: int, start=None) -> torch.Tensor:
    """Counts (B, V) of each token in ``history`` (B, L) from column ``start`` on (int or (B,) tensor);
    negative ids (padding) are not counted."""
    h = history.long()
    if start is not None:
        cols = torch.arange(h.shape[1], device=h.device)
        start = torch.as_tensor(start, device=h.device).view(-1, 1)
        h = h.masked_fill(cols[None, :] < start, -1)
    h = torch.where(h < 0, vocab, h)  # padding goes to an extra column, dropped below
    counts = torch.zeros(h.shape[0], vocab + 1, device=h.device, dtype=torch.float32)
    counts.scatter_add_(1, h, torch.ones_like(h, dtype=torch.float32))
    return counts[:, :vocab]


def process_logits(scores: torch.Tensor, cfg: GenerationConfig, history: torch.Tensor | None = None,
                   first: bool = False, prompt_len=None) -> torch.Tensor:
    """Logits processors that apply to every decoding strategy: scores (B, V) float32 -> (B, V).

    ``history`` (B, L): the tokens so far, prompt then generated; negative ids mark padding.
    ``prompt_len`` (int or (B,)): how many leading columns are the prompt (presence and frequency
    penalties count generated tokens only; None: every column counts).
    """
    if cfg.uses_history:
        if history is None:
            raise ValueError("repetition_penalty, presence_penalty and frequency_penalty need history: "
                             "the (B, L) tokens so far")
        V = scores.shape[-1]
        if cfg.repetition_penalty != 1.0:  # transformers' RepetitionPenaltyLogitsProcessor
            seen = _seen(history, V) > 0
            p = cfg.repetition_penalty
            scores = torch.where(seen, torch.where(scores < 0, scores * p, scores / p), scores)
        if cfg.presence_penalty or cfg.frequency_penalty:  # OpenAI's definition, on generated tokens
            counts = _seen(history, V, prompt_len).to(scores.dtype)
            scores = scores - counts * cfg.frequency_penalty - (counts > 0).to(scores.dtype) * cfg.presence_penalty
    banned = list(cfg.suppress_tokens) + (list(cfg.begin_suppress_tokens) if first else [])
    if banned:
        scores = scores.clone()
        scores[:, banned] = float("-inf")
    return scores


def warp(scores: torch.Tensor, cfg: GenerationConfig, min_tokens_to_keep: int = 1) -> torch.Tensor:
    """Sampling warpers, in transformers' order and arithmetic: temperature, top-k, top-p, min-p."""
    if cfg.temperature != 1.0:
        scores = scores / cfg.temperature
    V = scores.shape[-1]
    if cfg.top_k is not None:
        k = min(max(cfg.top_k, min_tokens_to_keep), V)
        scores = scores.masked_fill(scores < scores.topk(k, dim=-1).values[..., -1:], float("-inf"))
    if cfg.top_p is not None and cfg.top_p < 1.0:
        sorted_scores, order = scores.sort(dim=-1, descending=False)
        drop = sorted_scores.softmax(-1).cumsum(-1) <= 1 - cfg.top_p  # the low tail holding 1 - top_p
        drop[..., -min_tokens_to_keep:] = False
        scores = scores.masked_fill(drop.scatter(-1, order, drop), float("-inf"))
    if cfg.min_p is not None:
        probs = scores.softmax(-1)
        drop = probs < cfg.min_p * probs.amax(-1, keepdim=True)
        drop.scatter_(-1, probs.topk(min(min_tokens_to_keep, V), dim=-1).indices, False)
        scores = scores.masked_fill(drop, float("-inf"))
    return scores


def next_token(logits: torch.Tensor, cfg: GenerationConfig, generator: torch.Generator | None,
               first: bool = False, history: torch.Tensor | None = None, *, prompt_len=None) -> torch.Tensor:
    """Choose one token per row of logits (B, V) -> (B,) long.

    ``first``: the first new token (begin suppression applies). ``history`` (B, L) long: the tokens so far,
    prompt + generated, padding marked with negative ids (needed by the penalties). ``prompt_len``: leading
    columns of ``history`` that are the prompt, excluded from presence/frequency penalties.
    """
    processed = cfg.uses_history or cfg.suppress_tokens or (first and cfg.begin_suppress_tokens)
    scores = process_logits(logits.float(), cfg, history, first, prompt_len) if processed else logits
    if not cfg.do_sample:
        return scores.argmax(-1)
    probs = warp(scores.float(), cfg).softmax(-1)
    return torch.multinomial(probs, 1, generator=generator).squeeze(-1)


def make_generator(cfg: GenerationConfig, device) -> torch.Generator | None:
    if cfg.do_sample and cfg.seed is not None:
        return torch.Generator(device=device).manual_seed(cfg.seed)
    return None


def pad_id(cfg: GenerationConfig) -> int:
    return cfg.pad_token_id if cfg.pad_token_id is not None else (cfg.stop_ids[0] if cfg.stop_ids else 0)


def decode_steps(step: Callable[[torch.Tensor], torch.Tensor], logits: torch.Tensor, cfg: GenerationConfig, *,
                 history: torch.Tensor | None = None,
                 watch: Callable[[torch.Tensor, torch.Tensor], torch.Tensor] | None = None) -> Iterator[torch.Tensor]:
    """Yield the (B,) tokens of each step from the first logits (B, V), up to ``cfg.max_new_tokens``.

    ``history`` (B, P): the prompt (padding negative), for the penalties. ``watch(tokens, running)`` sees
    each step's tokens and the rows still running before them, and returns the rows to stop (stop strings).
    """
    B, device = logits.shape[0], logits.device
    generator = make_generator(cfg, device)
    stops = torch.tensor(cfg.stop_ids, device=device, dtype=torch.long)
    pad = pad_id(cfg)
    running = torch.ones(B, dtype=torch.bool, device=device)
    P = 0 if history is None else history.shape[1]
    buf = None
    if cfg.uses_history:  # prompt then generated tokens, filled in place
        buf = torch.full((B, P + cfg.max_new_tokens), -1, dtype=torch.long, device=device)
        if history is not None:
            buf[:, :P] = history
    for i in range(cfg.max_new_tokens):
        seen = None if buf is None else buf[:, : P + i]
        tok = next_token(logits, cfg, generator, first=i == 0, history=seen, prompt_len=P)
        tok = torch.where(running, tok, pad)
        if buf is not None:
            buf[:, P + i] = tok
        before = running.clone()
        if stops.numel():
            running &= ~torch.isin(tok, stops)
        if watch is not None:
            running &= ~watch(tok, before)
        yield tok
        if not bool(running.any()):
            break
        if i + 1 < cfg.max_new_tokens:
            logits = step(tok)


def decode(step: Callable[[torch.Tensor], torch.Tensor], logits: torch.Tensor, cfg: GenerationConfig, *,
           history: torch.Tensor | None = None, watch=None) -> torch.Tensor:
    """Generate up to ``cfg.max_new_tokens`` tokens from the first logits (B, V); returns (B, n) new tokens."""
    out = list(decode_steps(step, logits, cfg, history=history, watch=watch))
    if not out:
        return torch.empty(logits.shape[0], 0, dtype=torch.long, device=logits.device)
    return torch.stack(out, dim=1)


# ---- the start and end of generate ------------------------------------------------------------------

_FIELDS = {f.name for f in fields(GenerationConfig)}


def options(values: Mapping) -> dict:
    """The generation options among a ``generate`` call's ``locals()`` (None: not given)."""
    return {k: v for k, v in values.items() if k in _FIELDS}


def prepare(model, input_ids, attention_mask, padding_side: str, **options):
    """Shared start of ``generate``: text prompts are tokenized (needs ``model.tokenizer``); options become a
    `GenerationConfig`: explicit options (not None) win over ``model.generation_defaults`` (from
    generation_config.json), which win over the model config's stop/pad tokens.
    Returns (ids, mask, texts or None, single, config)."""
    texts, single = None, isinstance(input_ids, str)
    if single or (isinstance(input_ids, Sequence) and input_ids and isinstance(input_ids[0], str)):
        texts = [input_ids] if single else list(input_ids)
        enc = model._require_tokenizer("generate() on text").encode_batch(texts, padding_side=padding_side,
                                                                         device=model.device)
        input_ids, attention_mask = enc["input_ids"], enc["attention_mask"]
    c = model.config
    merged = {"eos_token_id": c.eos_token_id, "pad_token_id": c.pad_token_id}
    merged = {k: v for k, v in merged.items() if v is not None}
    merged.update(getattr(model, "generation_defaults", None) or {})
    merged.update({k: v for k, v in options.items() if v is not None})
    unknown = set(merged) - _FIELDS
    if unknown:
        raise TypeError(f"unknown generation options {sorted(unknown)}; known: {sorted(_FIELDS)}")
    return input_ids, attention_mask, texts, single, GenerationConfig(**merged)


def cut(row: Sequence[int], cfg: GenerationConfig) -> list[int]:
    """A row of new tokens up to (not including) its first stop token."""
    stops = set(cfg.stop_ids)
    row = [int(t) for t in row]
    return row[: next((i for i, t in enumerate(row) if t in stops), len(row))]


def finish(model, ids: torch.Tensor, new: torch.Tensor, texts, single: bool, cfg: GenerationConfig | None = None):
    """Ids as they are, or the new tokens decoded to text when the prompts were text (up to the first stop
    token, and before the first stop string); several sequences per prompt come as a list per prompt."""
    if texts is None:
        return ids
    from .streaming import cut_at_stop

    cfg = cfg or GenerationConfig()
    decoded = [cut_at_stop(model.tokenizer.decode(cut(row.tolist(), cfg)), cfg.stop) for row in new]
    n = len(decoded) // len(texts)
    if n > 1:
        decoded = [decoded[i * n : (i + 1) * n] for i in range(len(texts))]
    return decoded[0] if single else decoded
