"""Continuous batching for decoder-only models: requests join and leave one running batch between steps.

An `Engine` keeps one left-padded batch: a `qkv.nn.KVCache` of (B, Hkv, T, D)
buffers, a (B, T) 0/1 attention mask over its columns and each row's next
position. The requests that arrive before a step are prefilled together (one
left-padded call, as ``model.generate`` prefills a batch: each weight matrix is
read once for all of them), then merged into the batch by left-padding
whichever side is shorter; each `Engine.step` then
decodes one token for every running row in one model call; finished and
cancelled rows are removed (``index_select``) and all-padding leading columns
trimmed. Left padding keeps every row's real tokens contiguous and ending at the
last column, so column distances equal position distances and the model's own
masks (causal, windows) stay right; the engine only ever calls ``model(...)``.
This is the iteration-level scheduling of Orca (Yu et al., OSDI 2022).

Each request has its own `GenerationConfig` and, when sampling with a seed, its
own ``torch.Generator``, so its tokens do not depend on the company it keeps.

A request submitted with ``attention={...}`` records the exact attention of each of its
positions as the batch computes it (`qkv.explain.live`): the prompt's rows at prefill, one
row per step after, and, once it has finished, one more step that feeds its last token for
the last row. Requests that do not ask cost nothing more.
"""

from __future__ import annotations

import collections
import concurrent.futures
import contextlib
import dataclasses
import logging
import threading
from collections.abc import Callable, Sequence

import torch

from ..nn import KVCache
from . import generation
from ._base import shape_bucket
from .generation import GenerationConfig
from .request import Request

log = logging.getLogger(__name__)


@dataclasses.dataclass(eq=False)
class _Row:
    """A running request's place in the batch: what it needs to pick its next token."""

    request: Request
    generator: torch.Generator | None
    history: torch.Tensor  # (1, prompt + max_new_tokens) long: prompt, then the tokens generated
    n: int  # tokens in history so far
    stops: frozenset
    text: object = None  # a qkv.models.streaming.TextStream when the request has stop strings
    ending: str | None = None  # finished, but its last token is fed once more for its attention row

    @property
    def remaining(self) -> int:
        return self.request.config.max_new_tokens - len(self.request.tokens)


class Engine:
    """Continuous-batching generation over a decoder-only model (`qkv.models.CausalLM`).

    ``max_batch`` rows decode together; ``max_tokens`` bounds the tokens the running
    requests may hold (prompt + max_new_tokens each); a request waits in the queue
    until both allow it. Drive it synchronously (`step`, `run_until_idle`, or just
    ``request.result()``) or from a background thread (`start` / `stop`, or
    ``with Engine(model) as engine:``).
    """

    def __init__(self, model, *, max_batch: int = 16, max_tokens: int = 65536):
        if not getattr(model, "continues_prompt", False):
            raise TypeError(f"Engine needs a decoder-only model (qkv.models.CausalLM), got {type(model).__name__}")
        for name, value in (("max_batch", max_batch), ("max_tokens", max_tokens)):
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"Engine: {name}={value!r} must be an int >= 1")
        self.model, self.max_batch, self.max_tokens = model, max_batch, max_tokens
        self._lock = threading.RLock()  # the batch below; held for a whole step
        self._owner: int | None = None  # thread running a step
        self._cv = threading.Condition()  # the queue and the background thread's wake-ups
        self._pending: collections.deque[Request] = collections.deque()
        self._thread: threading.Thread | None = None
        self._executor = None  # where the background thread runs each step (None: on itself)
        self._stopping = False
        self.on_step: Callable[[int], None] | None = None  # called with the rows of each decoding step
        self._reset()

    def _reset(self) -> None:
        self._rows: list[_Row] = []
        self._cache: KVCache | None = None
        self._mask = self._pos = self._tok = None  # (B, capacity) 0/1, (B, 1) next positions, (B, 1) last tokens
        self._inflight: list[Request] = []  # taken from the queue by this step, not yet in the batch

    # -- submitting ------------------------------------------------------------------------------------------

    def submit(self, prompt_ids: Sequence[int] | torch.Tensor | str, *, config: GenerationConfig | None = None,
               on_token: Callable[[Request, int], None] | None = None,
               on_finish: Callable[[Request], None] | None = None, attention: dict | None = None,
               **options) -> Request:
        """Queue a prompt (token ids, or text with the model's tokenizer); it joins the batch at the next step.

        ``options`` are `GenerationConfig` fields (max_new_tokens, do_sample, temperature,
        top_k, top_p, seed, eos_token_id, ...), applied over ``config``; the stop tokens
        default to the model config's ``eos_token_id`` (``eos_token_id=[]``: none).
        ``attention``: record the request's attention in ``request.attention`` (a
        `qkv.explain.live.RowRecorder`; keys ``layers``, ``heads``, ``topk``, ``full`` as
        `qkv.explain.capture`). Thread-safe.
        """
        ids = self._ids(prompt_ids)
        if config is not None:
            cfg = dataclasses.replace(config, **options)
        else:  # as generate: explicit options, then model.generation_defaults, then the config's stop tokens
            cfg = generation.prepare(self.model, torch.tensor([ids]), None, "left", **options)[-1]
        if cfg.num_beams > 1 or cfg.num_return_sequences > 1:
            raise ValueError(f"submit: num_beams={cfg.num_beams}, num_return_sequences={cfg.num_return_sequences}: "
                             "the engine decodes one sequence per request; use model.generate for beam search")
        if cfg.stop:
            self.model._require_tokenizer("stop strings")
        need = len(ids) + cfg.max_new_tokens
        if need > self.max_tokens:
            raise ValueError(f"submit: prompt ({len(ids)}) + max_new_tokens ({cfg.max_new_tokens}) = {need} tokens "
                             f"exceeds the engine's max_tokens={self.max_tokens}; raise max_tokens or shorten it")
        c = self.model.config
        if getattr(c, "positions", None) == "learned" and need > c.max_positions:
            raise ValueError(f"submit: prompt ({len(ids)}) + max_new_tokens ({cfg.max_new_tokens}) = {need} "
                             f"exceeds the model's {c.max_positions} learned positions; shorten either")
        req = Request(self, ids, cfg, on_token, on_finish)
        if attention is not None:
            from ..explain.live import RowRecorder

            req.attention = RowRecorder(c.n_layers, c.n_heads, **attention)
        with self._cv:
            self._pending.append(req)
            self._cv.notify_all()
        return req

    def _ids(self, prompt) -> list[int]:
        if isinstance(prompt, str):
            ids = self.model._require_tokenizer("Engine.submit(text)").encode(prompt)
        elif isinstance(prompt, torch.Tensor):
            if prompt.dim() == 2 and prompt.shape[0] == 1:
                prompt = prompt[0]
            if prompt.dim() != 1 or prompt.dtype.is_floating_point:
                raise ValueError(f"submit: prompt_ids must be one sequence of ids, got a {prompt.dtype} tensor "
                                 f"of shape {tuple(prompt.shape)}")
            ids = prompt.tolist()
        else:
            ids = [int(i) for i in prompt]
        vocab = self.model.config.vocab_size
        if not ids:
            raise ValueError("submit: the prompt is empty; give at least one token (e.g. the BOS token)")
        if min(ids) < 0 or max(ids) >= vocab:
            raise ValueError(f"submit: prompt ids must be in [0, {vocab}), got min {min(ids)}, max {max(ids)}")
        return ids

    # -- driving -----------------------------------------------------------------------------------------------

    @property
    def batch_size(self) -> int:
        """Rows decoding now."""
        return len(self._rows)

    @property
    def pending(self) -> int:
        """Requests queued, not yet prefilled."""
        return len(self._pending)

    @property
    def idle(self) -> bool:
        return not self._rows and not self._pending

    @property
    def running(self) -> bool:
        """Whether a background thread drives the engine."""
        return self._thread is not None and self._thread.is_alive()

    def cache_bytes(self) -> int:
        """Bytes held by the batch's key/value buffers."""
        cache = self._cache
        return 0 if cache is None else cache.nbytes()

    def step(self) -> int:
        """Admit queued requests (prefill each, merge it into the batch), decode one token for every running
        row, drop the finished ones. Returns the rows still running."""
        with self._lock:
            self._owner = threading.get_ident()
            try:
                with torch.no_grad():
                    self._drop_finished()
                    self._admit()
                    if self._rows:
                        self._decode()
                        if self.on_step is not None:
                            self.on_step(len(self._rows))
                    self._drop_finished()
            except BaseException as e:
                self._fail(e)
                raise
            finally:
                self._owner = None
            return len(self._rows)

    def run_until_idle(self) -> int:
        """Step until no request is queued or running; returns the steps taken."""
        steps = 0
        while not self.idle:
            self.step()
            steps += 1
        return steps

    def start(self, executor: concurrent.futures.Executor | None = None) -> Engine:
        """Drive the engine from a background thread (daemon) until `stop`.

        ``executor``: run each step there instead of on the background thread (which then only waits for
        work). A server gives its one compute thread, so that the engine and its other models share one
        OpenMP team (`qkv.serve.openmp`) and their work interleaves step by step."""
        if executor is not None and not isinstance(executor, concurrent.futures.Executor):
            raise TypeError("Engine.start: executor must be a concurrent.futures.Executor, "
                            f"got {type(executor).__name__}")
        if self.running:
            if executor is not self._executor:
                raise RuntimeError("Engine.start: the engine is already running on another executor; stop it first")
            return self
        self._executor = executor
        self._stopping = False
        self._thread = threading.Thread(target=self._loop, name="qkv-engine", daemon=True)
        self._thread.start()
        return self

    def stop(self, timeout: float | None = None) -> None:
        """Stop the background thread after its current step; queued and running requests stay (a later
        `start`, `step` or ``request.result()`` continues them)."""
        with self._cv:
            self._stopping = True
            self._cv.notify_all()
        if self._thread is not None:
            self._thread.join(timeout)
        self._thread = None

    def __enter__(self) -> Engine:
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()

    def _loop(self) -> None:
        while True:
            with self._cv:
                while not self._stopping and self.idle:
                    self._cv.wait()
                if self._stopping:
                    return
            try:
                if self._executor is None:
                    self.step()
                else:
                    try:
                        done = self._executor.submit(self.step)
                    except RuntimeError:  # the executor was shut down: nothing can run the steps any more
                        log.warning("engine: its executor is shut down; the background thread stops")
                        return
                    done.result()
            except Exception:
                log.exception("engine step failed; its requests finished with reason 'error'")

    # -- the batch -------------------------------------------------------------------------------------------

    def _admit(self) -> None:
        """Take the queued requests that fit, prefill them together, and merge them into the batch."""
        reserved = sum(len(r.request.prompt) + r.request.config.max_new_tokens for r in self._rows)
        taken: list[Request] = []
        while len(self._rows) + len(taken) < self.max_batch:
            with self._cv:
                if not self._pending:
                    break
                req = self._pending[0]
                need = len(req.prompt) + req.config.max_new_tokens
                if reserved + need > self.max_tokens and (self._rows or taken):
                    break
                self._pending.popleft()
            reserved += need
            taken.append(req)
        self._inflight = taken
        group = self._prefill(taken) if taken else None
        if group is not None:
            self._merge(*group)
        self._inflight = []

    def _prefill(self, reqs: list[Request]) -> tuple[list[_Row], KVCache, torch.Tensor] | None:
        """Prefill new requests in one left-padded model call (each weight matrix read once for all of them,
        not once per request) and choose their first tokens. Returns the rows still running, their cache
        and their (n, T) 0/1 mask, or None when none is."""
        live = []
        for req in reqs:
            if req._cancel or req.config.max_new_tokens == 0:
                self._release(req, "cancelled" if req._cancel else "length")
            else:
                live.append(req)
        if not live:
            return None
        dev = self.model.device
        T = shape_bucket(max(len(r.prompt) for r in live))  # a few shapes, not one per prompt length (memory)
        ids = torch.zeros(len(live), T, dtype=torch.long, device=dev)
        mask = torch.zeros(len(live), T, dtype=torch.long, device=dev)
        rows = []
        for i, req in enumerate(live):
            cfg, n = req.config, len(req.prompt)
            history = torch.zeros(1, n + cfg.max_new_tokens, dtype=torch.long, device=dev)
            history[0, :n] = torch.tensor(req.prompt, dtype=torch.long)
            ids[i, T - n :], mask[i, T - n :] = history[0, :n], 1
            generator = None
            if cfg.do_sample and cfg.seed is not None:
                generator = torch.Generator(device=dev).manual_seed(cfg.seed)
            row = _Row(req, generator, history, n, frozenset(cfg.stop_ids))
            if cfg.stop:
                from .streaming import TextStream

                row.text = TextStream(self.model.tokenizer, cfg.stop, stop_token_ids=cfg.stop_ids)
            rows.append(row)
        cache = KVCache(self.model.config.n_layers, capacity=T)
        positions = (mask.cumsum(-1) - 1).clamp(min=0)  # each prompt counts from 0 past its padding
        watch = [(i, r.request.attention, n - T, T - n) for i, r in enumerate(rows)
                 if r.request.attention is not None for n in [len(r.request.prompt)]]
        with self._observing(watch):
            logits = self.model(ids, mask, positions, cache=cache, last_only=True).logits[:, -1]
        keep = []
        for i, row in enumerate(rows):
            if self._record(row, int(self._pick(row, logits[i : i + 1], first=True))):
                self._release(row.request)
            else:
                keep.append(i)
        if not keep:
            return None
        if len(keep) < len(rows):
            index = torch.tensor(keep, device=dev)
            cache.select(index)
            mask = mask.index_select(0, index)
        return [rows[i] for i in keep], cache, mask

    def _observing(self, rows):
        """Record the attention of ``rows`` (batch index, recorder, query shift, key shift) during a call."""
        if not rows:
            return contextlib.nullcontext()
        from ..explain.live import observe_rows

        return observe_rows(self.model, rows)

    def _pick(self, row: _Row, logits: torch.Tensor, first: bool) -> torch.Tensor:
        """The next token (a (1,) tensor) from one row of logits (1, V) with the request's own settings."""
        return generation.next_token(logits, row.request.config, row.generator, first=first,
                                     history=row.history[:, : row.n], prompt_len=len(row.request.prompt))

    def _record(self, row: _Row, tok: int) -> bool:
        """Append a chosen token; returns True if the request is finished."""
        req = row.request
        if row.n < row.history.shape[1]:
            row.history[0, row.n] = tok
        row.n += 1
        req._emit(tok)
        if row.text is not None:
            row.text.push(tok)
        reason = None
        if tok in row.stops or (row.text is not None and row.text.stopped):
            reason = "stop"
        elif len(req.tokens) >= req.config.max_new_tokens:
            reason = "length"
        if reason is not None:
            if req.attention is not None and not req._cancel:
                row.ending = reason  # one more step feeds this token: its attention row, then finish
            else:
                req._finish(reason)
        return req.done or req._cancel

    def _merge(self, new_rows: list[_Row], new_cache: KVCache, new_mask: torch.Tensor) -> None:
        """Join newly prefilled rows (their cache and (n, T) mask) to the batch, left-padding the shorter side."""
        rows = self._rows + new_rows
        caches = ([self._cache] if self._cache is not None else []) + [new_cache]
        length = max(c.length for c in caches)
        capacity = length + max(r.remaining for r in rows) + 1  # no buffer growth while decoding these rows
        dev = self.model.device
        mask = torch.zeros(len(rows), capacity, dtype=torch.long, device=dev)
        old = len(self._rows)
        if old:
            L = self._cache.length
            mask[:old, length - L : length] = self._mask[:, :L]
        mask[old:, length - new_cache.length : length] = new_mask
        pos = torch.tensor([[r.n - 1] for r in new_rows], dtype=torch.long, device=dev)
        tok = torch.tensor([[int(r.history[0, r.n - 1])] for r in new_rows], dtype=torch.long, device=dev)
        self._cache = KVCache.merge(caches, capacity=capacity)
        self._mask = mask
        self._pos = pos if not old else torch.cat([self._pos, pos])
        self._tok = tok if not old else torch.cat([self._tok, tok])
        self._rows = rows

    def _decode(self) -> None:
        """One token for every running row, in one model call."""
        cache, L = self._cache, self._cache.length
        if L >= self._mask.shape[1]:  # more columns than merge reserved (a row outlived its estimate)
            self._mask = torch.cat([self._mask, torch.zeros_like(self._mask)], dim=1)
        self._mask[:, L] = 1
        positions = self._pos[:, 0].tolist()
        watch = [(i, r.request.attention, p, L - p) for i, (r, p) in enumerate(zip(self._rows, positions))
                 if r.request.attention is not None]
        with self._observing(watch):
            logits = self.model(self._tok, self._mask[:, : L + 1], self._pos, cache=cache, last_only=True).logits[:, -1]
        picked = torch.cat([self._pick(row, logits[i : i + 1], first=False) for i, row in enumerate(self._rows)])
        self._pos += 1
        self._tok[:, 0] = picked
        for row, tok in zip(self._rows, picked.tolist()):
            if row.ending is not None:  # its last token was just fed for its attention row: done now
                row.request._finish(row.ending)
            else:
                self._record(row, tok)

    def _drop_finished(self) -> None:
        """Remove finished and cancelled rows (freeing their cache rows) and all-padding leading columns."""
        keep = [i for i, r in enumerate(self._rows) if not (r.request.done or r.request._cancel)]
        if len(keep) == len(self._rows):
            return
        kept = set(keep)
        gone = [r.request for i, r in enumerate(self._rows) if i not in kept]
        if not keep:
            self._reset()
        else:
            index = torch.tensor(keep, device=self._mask.device)
            L = self._cache.length
            mask = self._mask.index_select(0, index)
            lead = int(mask[:, :L].any(0).long().argmax())  # first column some kept row uses
            self._cache.trim_left(lead)
            self._cache.select(index)
            self._mask = mask[:, lead:]
            self._pos, self._tok = self._pos.index_select(0, index), self._tok.index_select(0, index)
            self._rows = [self._rows[i] for i in keep]
        for req in gone:
            self._release(req)

    def _release(self, req: Request, reason: str = "cancelled") -> None:
        req._finish(reason)  # no-op when already finished ("stop"/"length")
        req._released.set()

    def _cancel(self, req: Request) -> None:
        if req.done:
            return
        req._cancel = True
        with self._cv:
            if req in self._pending:
                self._pending.remove(req)
                self._release(req)
                return
        if self._owner == threading.get_ident():
            return  # inside this step's callback: the step drops the row before it returns
        while not req._released.wait(0.002):  # a step in another thread frees it at its end, or we do
            if self._lock.acquire(blocking=False):
                try:
                    self._drop_finished()
                finally:
                    self._lock.release()

    def _fail(self, error: BaseException) -> None:
        for req in [r.request for r in self._rows] + self._inflight:
            req._finish("error", error)
            req._released.set()
        self._inflight = []
        self._reset()
