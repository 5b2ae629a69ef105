"""Dynamic batching for one-shot models (encoders, classifiers): concurrent requests share one call.

A `Batcher` owns one worker task per model. Requests queue their items; the worker takes
what is waiting and runs ``fn(items)`` once for all of them on the process's one compute thread,
shared by every model (`qkv.serve.openmp`: torch's OpenMP team is per calling thread, and libgomp
stops spin-waiting once it manages more threads than there are cores). While that
call runs, new requests queue up, so under load every call is full and nobody waits for a
timer (the batching of text-embeddings-inference and Triton's dynamic batcher). One wait is
added: when fewer requests are waiting than the last batch held, the worker waits up to
``max_wait`` seconds for that many (below the token ``budget``), because the clients it just
answered are usually sending their next requests; without it, closed-loop clients settle into
alternating batches of one and of all the rest. With one client nothing waits. A request
that would take the queue beyond ``max_pending`` items is refused with 503 and
``Retry-After`` (into an empty queue any request goes).
"""

from __future__ import annotations

import asyncio
import collections
import copy
import dataclasses
import threading
import time
from collections.abc import Callable, Sequence

from .errors import APIError
from .openmp import compute_thread


@dataclasses.dataclass(eq=False)
class _Job:
    items: list
    costs: list[int]
    future: asyncio.Future


class Batcher:
    """Group concurrent calls of ``fn(items) -> results`` (one result per item, in order).

    ``cost(item)`` is an item's size in tokens; a batch holds at most ``budget`` tokens and
    ``max_items`` items (a request larger than that runs alone, whole). ``lock`` (a
    ``threading.Lock``) is held around every call, so other users of the same model (the
    attention path) never run beside it. ``on_batch(items, tokens, seconds)`` is called after
    each call (metrics).
    """

    def __init__(self, fn: Callable[[list], Sequence], *, budget: int = 16384, max_items: int = 256,
                 max_wait: float = 0.002, max_pending: int = 4096, lock: threading.Lock | None = None,
                 on_batch: Callable[[int, int, float], None] | None = None, name: str = "model"):
        self.fn, self.budget, self.max_items, self.max_wait = fn, budget, max_items, max_wait
        self.max_pending, self.name, self.on_batch = max_pending, name, on_batch
        self.lock = lock or threading.Lock()
        self.thread = compute_thread()  # shared by every model: one OpenMP team (`qkv.serve.openmp`)
        self._queue: collections.deque[_Job] = collections.deque()
        self._pending = 0  # items queued, not yet taken
        self._wake: asyncio.Event | None = None
        self._task: asyncio.Task | None = None
        self._expect = 1  # requests in the last batch

    async def run(self, fn: Callable, *args):
        """``fn(*args)`` on this model's compute thread under its lock (the attention path, uploads)."""
        def locked():
            with self.lock:
                return fn(*args)
        return await asyncio.get_running_loop().run_in_executor(self.thread, locked)

    @property
    def pending(self) -> int:
        """Items waiting for a batch."""
        return self._pending

    async def submit(self, items: list, costs: list[int]) -> list:
        """Run ``items`` (with their token ``costs``) in the next batch; returns their results."""
        if not items:
            return []
        if self._pending and self._pending + len(items) > self.max_pending:  # alone, any size runs
            raise APIError(503, f"{self.name} is overloaded: {self._pending} inputs are waiting (at most "
                           f"{self.max_pending}); retry shortly", code="overloaded", headers={"Retry-After": "1"})
        loop = asyncio.get_running_loop()
        self._ensure_worker(loop)
        job = _Job(list(items), list(costs), loop.create_future())
        self._queue.append(job)
        self._pending += len(items)
        self._wake.set()
        return await job.future

    def _ensure_worker(self, loop) -> None:
        if self._task is None or self._task.done() or self._task.get_loop() is not loop:
            self._wake = asyncio.Event()
            self._task = loop.create_task(self._work(), name=f"qkv-batcher-{self.name}")

    def _take(self, jobs: list[_Job]) -> bool:
        """Move whole requests from the front of the queue into ``jobs`` while they fit the budget (the
        first always does); returns whether the batch is full."""
        items = sum(len(j.items) for j in jobs)
        tokens = sum(sum(j.costs) for j in jobs)
        while self._queue:
            job = self._queue[0]
            if job.future.cancelled():  # its client went away before the batch ran
                self._queue.popleft()
                self._pending -= len(job.items)
                continue
            n, t = len(job.items), sum(job.costs)
            if jobs and (items + n > self.max_items or tokens + t > self.budget):
                return True
            self._queue.popleft()
            self._pending -= n
            jobs.append(job)
            items, tokens = items + n, tokens + t
        return items >= self.max_items or tokens >= self.budget

    async def _work(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            if not self._queue:
                self._wake.clear()
                await self._wake.wait()
            jobs: list[_Job] = []
            full = self._take(jobs)
            if jobs and not full and self.max_wait > 0 and len(jobs) < self._expect:
                # the clients the last batch answered are likely sending their next requests: wait a
                # moment for them rather than run a batch of one while they queue behind it
                deadline = time.perf_counter() + self.max_wait
                while not full and len(jobs) < self._expect and (left := deadline - time.perf_counter()) > 0:
                    self._wake.clear()
                    try:
                        await asyncio.wait_for(self._wake.wait(), left)
                    except asyncio.TimeoutError:
                        break
                    full = self._take(jobs)
            if not jobs:
                continue
            self._expect = len(jobs)
            items = [x for j in jobs for x in j.items]
            start = time.perf_counter()
            try:
                results = await loop.run_in_executor(self.thread, self._call, items)
            except Exception as e:  # noqa: BLE001 -- each waiting request gets the failure
                for j in jobs:
                    if not j.future.done():
                        j.future.set_exception(e)
                continue
            if self.on_batch is not None:
                self.on_batch(len(items), sum(sum(j.costs) for j in jobs), time.perf_counter() - start)
            i = 0
            for j in jobs:
                part = results[i : i + len(j.items)]
                i += len(j.items)
                if not j.future.done():
                    j.future.set_result(part)

    def _call(self, items: list) -> Sequence:
        with self.lock:
            out = self.fn(items)
        if len(out) != len(items):
            raise RuntimeError(f"batched call returned {len(out)} results for {len(items)} inputs")
        return out


class TokenCounter:
    """Tokenizes texts without waiting for a running batch: on a copy of the tokenizer (the model's own
    one toggles truncation while it encodes batches), or under ``lock`` if it cannot be copied. Calling
    it gives token counts; `encodings` gives the tokens themselves (ids and type ids), so a batch can
    run on them without tokenizing again."""

    def __init__(self, tokenizer, lock: threading.Lock):
        self.tokenizer, self.lock = tokenizer, lock
        try:
            self.copy = copy.deepcopy(tokenizer)
        except Exception:  # noqa: BLE001 -- an uncopyable tokenizer: count under the model's lock
            self.copy = None

    INLINE_CHARS = 20_000  # up to this much text is tokenized on the event loop (microseconds), more on a thread

    async def encodings(self, texts: list[str]) -> list[tuple[list[int], list[int]]]:
        """``(ids, type_ids)`` of each text, special tokens included; small inputs without a thread hop."""
        if self.copy is not None and sum(map(len, texts)) <= self.INLINE_CHARS:
            return self.encode(texts)
        return await asyncio.to_thread(self.encode, texts)

    def __call__(self, texts: list[str]) -> list[int]:
        return [len(ids) for ids, _ in self.encode(texts)]

    def encode(self, texts: list[str]) -> list[tuple[list[int], list[int]]]:
        if self.copy is not None:
            return [self.copy.encode_with_types(t) for t in texts]
        with self.lock:
            return [self.tokenizer.encode_with_types(t) for t in texts]
