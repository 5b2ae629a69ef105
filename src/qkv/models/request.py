"""`Request`: one prompt submitted to a `qkv.models.engine.Engine`, as its caller sees it: tokens as they
come (blocking, polled, awaited or by callback), the whole result, cancellation."""

from __future__ import annotations

import asyncio
import logging
import threading
import time
from collections.abc import Callable, Iterator
from typing import TYPE_CHECKING

from . import generation
from .generation import GenerationConfig

if TYPE_CHECKING:
    from .engine import Engine

log = logging.getLogger("qkv.models.engine")


class Request:
    """One submitted prompt: stream its tokens as they come, wait for all of them, or cancel it.

    ``tokens`` holds the new token ids so far (the stop token included, as
    ``generate`` returns it); ``finish_reason`` is None while running, then
    "stop", "length", "cancelled" or "error". Iterating blocks for each next
    token; `poll` returns the tokens that arrived since the last poll without
    blocking, and ``on_token(request, token)`` / ``on_finish(request)`` (given to
    `Engine.submit`) are called from the thread that drives the engine (an
    asyncio server hands them over with ``loop.call_soon_threadsafe``).
    """

    def __init__(self, engine: Engine, prompt: list[int], config: GenerationConfig, on_token=None, on_finish=None):
        self.engine = engine
        self.prompt = prompt
        self.config = config
        self.tokens: list[int] = []
        self.finish_reason: str | None = None
        self.error: BaseException | None = None
        self.submitted = time.perf_counter()
        self.first_token_time: float | None = None  # perf_counter() when the first token arrived
        self.finished_time: float | None = None
        self._on_token, self._on_finish = on_token, on_finish
        self._cond = threading.Condition()
        self._polled = 0
        self._futures: list[tuple[asyncio.AbstractEventLoop, asyncio.Future]] = []  # async iterators waiting
        self.attention = None  # a qkv.explain.live.RowRecorder when submitted with attention=...
        self._cancel = False
        self._released = threading.Event()  # set once the request holds no cache rows and is not queued

    @property
    def done(self) -> bool:
        return self.finish_reason is not None

    @property
    def text(self) -> str:
        """The new tokens as text, as ``generate`` returns it: up to the first stop token, before the first
        stop string (needs the model's tokenizer)."""
        from .streaming import cut_at_stop

        tok = self.engine.model._require_tokenizer("Request.text")
        return cut_at_stop(tok.decode(generation.cut(self.tokens, self.config)), self.config.stop)

    def __iter__(self) -> Iterator[int]:
        """Each new token id as it is generated (blocks; drives the engine itself if no thread does)."""
        i = 0
        while True:
            self._wait(lambda: len(self.tokens) > i, None)
            with self._cond:
                if len(self.tokens) <= i:
                    break
                tok = self.tokens[i]
            i += 1
            yield tok
        self._raise()

    async def __aiter__(self):
        """Each new token id as it is generated, awaited (``async for tok in request``); needs the
        engine's background thread (`Engine.start`)."""
        if not self.engine.running and not self.done:
            raise RuntimeError("async iteration needs the engine's background thread: call engine.start() "
                               "or use `with Engine(model) as engine:`")
        loop, i = asyncio.get_running_loop(), 0
        while True:
            with self._cond:
                tok = self.tokens[i] if len(self.tokens) > i else None
                if tok is None and not self.done:
                    fut = loop.create_future()
                    self._futures.append((loop, fut))
            if tok is not None:
                i += 1
                yield tok
            elif self.done:
                break
            else:
                await fut
        self._raise()

    def poll(self) -> list[int]:
        """The tokens generated since the last poll (never blocks)."""
        with self._cond:
            new = self.tokens[self._polled :]
            self._polled += len(new)
            return new

    def result(self, timeout: float | None = None) -> list[int]:
        """All new token ids, once finished (blocks; drives the engine itself if no thread does)."""
        if not self._wait(lambda: False, timeout):
            raise TimeoutError(f"request not finished after {timeout} s ({len(self.tokens)} tokens so far)")
        self._raise()
        return list(self.tokens)

    def cancel(self) -> None:
        """Stop generating; the request's cache rows are freed when this returns (called from an
        ``on_token`` callback: at the end of the current step)."""
        self.engine._cancel(self)

    def _raise(self):
        if self.error is not None:
            raise RuntimeError(f"generation failed: {self.error!r}") from self.error

    def _wait(self, ready: Callable[[], bool], timeout: float | None) -> bool:
        deadline = None if timeout is None else time.monotonic() + timeout
        while True:
            with self._cond:
                if ready() or self.done:
                    return True
                left = None if deadline is None else deadline - time.monotonic()
                if left is not None and left <= 0:
                    return False
                if self.engine.running:
                    self._cond.wait(0.05 if left is None else min(left, 0.05))  # re-check: the thread may stop
                    continue
            self.engine.step()

    def _emit(self, token: int) -> None:
        with self._cond:
            if self.first_token_time is None:
                self.first_token_time = time.perf_counter()
            self.tokens.append(token)
            self._wake()
        if self._on_token is not None:
            _call(self._on_token, self, token)

    def _wake(self) -> None:  # with self._cond held
        self._cond.notify_all()
        for loop, fut in self._futures:
            loop.call_soon_threadsafe(_resolve, fut)
        self._futures = []

    def _finish(self, reason: str, error: BaseException | None = None) -> None:
        with self._cond:
            if self.finish_reason is not None:
                return
            self.finish_reason, self.error = reason, error
            self.finished_time = time.perf_counter()
            self._wake()
        if self._on_finish is not None:
            _call(self._on_finish, self)

    def __repr__(self) -> str:
        return (f"Request(prompt={len(self.prompt)} tokens, {len(self.tokens)} new, "
                f"finish_reason={self.finish_reason!r})")


def _resolve(fut: asyncio.Future) -> None:
    if not fut.done():
        fut.set_result(None)


def _call(fn, *args):
    try:
        fn(*args)
    except Exception:  # a failing callback must not stop the other requests
        log.exception("request callback %r failed", fn)
