"""Giving the memory torch frees back to the system while the server runs.

Batches of ever-changing shapes (packed rows, decoding batches that grow and shrink, bursts) free
and allocate large buffers all the time, and glibc keeps much of what is freed in its heaps: a soaked
server's resident memory grew by a third while the live tensors and Python objects stayed the same
(one ``malloc_trim`` gave back most of the growth). `Trimmer` calls ``malloc_trim(0)`` on a worker
thread every ``interval`` seconds while requests arrive (an idle server is trimmed once). Where the C
library is not glibc it does nothing.
"""

from __future__ import annotations

import asyncio
import contextlib
import ctypes
import ctypes.util
from collections.abc import Callable


def _malloc_trim() -> Callable[[int], int] | None:
    name = ctypes.util.find_library("c")
    if name is None:
        return None
    try:
        fn = ctypes.CDLL(name).malloc_trim
    except (OSError, AttributeError):  # not glibc (musl, macOS)
        return None
    fn.argtypes, fn.restype = [ctypes.c_size_t], ctypes.c_int
    return fn


class Trimmer:
    """``await start()`` runs the loop as a task; ``await stop()`` ends it. ``activity()`` is a number that
    grows with the work done (requests answered): no trim while it has not changed."""

    def __init__(self, activity: Callable[[], float], interval: float = 2.0):
        self.activity, self.interval = activity, interval
        self.trim = _malloc_trim()
        self.calls = 0
        self._task: asyncio.Task | None = None

    def start(self) -> None:
        if self.trim is not None and self.interval > 0 and self._task is None:
            self._task = asyncio.get_running_loop().create_task(self._run(), name="qkv-malloc-trim")

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
            self._task = None

    async def _run(self) -> None:
        seen = self.activity()
        while True:
            await asyncio.sleep(self.interval)
            now = self.activity()
            if now != seen:
                seen = now
                await asyncio.to_thread(self.trim, 0)
                self.calls += 1
