"""What ``generate`` and ``stream`` share: a decoding session over a model's KV cache, and the strategy
(greedy / sampling, or beam search) run over it.

A `Session` is the model side of decoding: the first logits, ``step(tokens) -> logits`` (one position per
row, appended to the cache), ``reorder(index)`` (keep cache rows ``index``, for beam search), the prompt
the output starts with, and the history the penalties look at.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass

import torch

from ..nn import KVCache
from ._base import positions_from_mask
from .generation import GenerationConfig, decode, decode_steps, finish
from .streaming import StopWatch, TextStream


@dataclass
class Session:
    logits: torch.Tensor  # (N, V) logits of the first new token
    step: Callable[[torch.Tensor], torch.Tensor]  # (N,) tokens -> (N, V) logits
    reorder: Callable[[torch.Tensor], None]  # keep rows index (N,) of every per-row state
    prompt: torch.Tensor  # (N, P) the ids the output starts with
    history: torch.Tensor  # (N, P) the prompt as the penalties see it (padding: -1)


def rows_per_prompt(cfg: GenerationConfig) -> int:
    """Rows each prompt is expanded to: its beams, or its samples."""
    return cfg.num_beams if cfg.num_beams > 1 else cfg.num_return_sequences


def causal_session(model, input_ids: torch.Tensor, attention_mask, cfg: GenerationConfig) -> Session:
    """A causal LM over left-padded prompts (B, T), each repeated `rows_per_prompt` times (as transformers
    expands them before the first forward)."""
    if attention_mask is None:
        attention_mask = torch.ones_like(input_ids)
    n = rows_per_prompt(cfg)
    if n > 1:
        input_ids, attention_mask = input_ids.repeat_interleave(n, 0), attention_mask.repeat_interleave(n, 0)
    N, T = input_ids.shape
    positions = positions_from_mask(attention_mask)
    cache = KVCache(model.config.n_layers, capacity=T + cfg.max_new_tokens)
    logits = model(input_ids, attention_mask, positions, cache=cache, last_only=True).logits[:, -1]
    state = {"mask": attention_mask, "pos": positions[:, -1:]}

    def step(tok: torch.Tensor) -> torch.Tensor:
        state["mask"] = torch.cat([state["mask"], state["mask"].new_ones(N, 1)], dim=1)
        state["pos"] = state["pos"] + 1
        return model(tok[:, None], state["mask"], state["pos"], cache=cache).logits[:, -1]

    def reorder(index: torch.Tensor) -> None:
        cache.select(index)
        state["mask"], state["pos"] = state["mask"].index_select(0, index), state["pos"].index_select(0, index)

    history = input_ids.masked_fill(attention_mask == 0, -1)
    return Session(logits, step, reorder, input_ids, history)


def seq2seq_session(model, input_ids: torch.Tensor, attention_mask, cfg: GenerationConfig,
                    decoder_prompt: Sequence[int] | None) -> Session:
    """An encoder-decoder: encode once (B rows), repeat the encoding `rows_per_prompt` times, decode after
    ``decoder_prompt`` (default: the decoder start token)."""
    c = model.config
    encoded = model.encode(input_ids, attention_mask)
    n = rows_per_prompt(cfg)
    if n > 1:
        encoded.last_hidden_state = encoded.last_hidden_state.repeat_interleave(n, 0)
        attention_mask = None if attention_mask is None else attention_mask.repeat_interleave(n, 0)
    N = encoded.last_hidden_state.shape[0]
    prompt = list(decoder_prompt) if decoder_prompt is not None else [c.decoder_start_token_id]
    first = torch.tensor(prompt, dtype=torch.long, device=encoded.last_hidden_state.device).expand(N, -1)
    cache = KVCache(len(model.decoder.layers), capacity=cfg.max_new_tokens + len(prompt))
    state = {"mask": attention_mask, "encoded": encoded}

    def step(tok: torch.Tensor) -> torch.Tensor:
        return model(attention_mask=state["mask"], decoder_input_ids=tok.view(N, -1),
                     encoder_output=state["encoded"], cache=cache).logits[:, -1]

    def reorder(index: torch.Tensor) -> None:
        cache.select(index)
        if state["mask"] is not None:
            state["mask"] = state["mask"].index_select(0, index)
        enc = state["encoded"]
        enc.last_hidden_state = enc.last_hidden_state.index_select(0, index)

    return Session(step(first), step, reorder, first.contiguous(), first.contiguous())


def _watch(model, cfg: GenerationConfig, rows: int) -> StopWatch | None:
    if not cfg.stop:
        return None
    return StopWatch(model._require_tokenizer("stop strings"), rows, cfg.stop, cfg.stop_ids)


def run(model, session: Session, cfg: GenerationConfig, texts, single: bool):
    """Decode with the configured strategy; the result as ``generate`` returns it."""
    if cfg.num_beams > 1:
        from .beam import beam_search

        new = beam_search(session, cfg, watch_factory=lambda n: _watch(model, cfg, n))
        rows = session.prompt.index_select(0, torch.arange(0, session.prompt.shape[0], cfg.num_beams,
                                                           device=session.prompt.device))
        prompt = rows.repeat_interleave(cfg.num_return_sequences, 0)
    else:
        watch = _watch(model, cfg, session.logits.shape[0])
        new = decode(session.step, session.logits, cfg, history=session.history, watch=watch)
        prompt = session.prompt
    return finish(model, torch.cat([prompt, new], dim=1), new, texts, single, cfg)


def stream(model, session: Session, cfg: GenerationConfig) -> Iterator[str]:
    """Text pieces of one sequence as its tokens are chosen (see `TextStream`)."""
    if cfg.num_beams > 1 or session.logits.shape[0] != 1:
        raise ValueError(f"stream() follows one sequence: got num_beams={cfg.num_beams}, "
                         f"num_return_sequences={cfg.num_return_sequences} and {session.logits.shape[0]} rows; "
                         "stream one prompt with num_beams=1, or use generate()")
    text = TextStream(model._require_tokenizer("stream()"), cfg.stop, stop_token_ids=cfg.stop_ids)

    def watch(tok: torch.Tensor, running: torch.Tensor) -> torch.Tensor:
        state["piece"] = text.push(int(tok[0])) if bool(running[0]) else ""
        return torch.tensor([text.stopped], device=tok.device)

    state = {"piece": ""}
    for _ in decode_steps(session.step, session.logits, cfg, history=session.history, watch=watch):
        if state["piece"]:
            yield state["piece"]
    rest = text.flush()
    if rest:
        yield rest
