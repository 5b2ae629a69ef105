"""One OpenMP team for the server's compute.

libgomp (the OpenMP runtime of torch's Linux CPU wheels) gives every thread that starts a parallel
region its own team of worker threads, and once it manages more threads than the machine has cores
it stops spin-waiting between parallel regions: each of the hundreds of torch ops in a forward pass
then wakes its workers through the kernel. A server that loaded its models on the main thread (one
team) and computes on a worker thread (a second team) ran MiniLM batches about 1.5x slower than the
same calls in a plain script (a packed batch of 16 sentences: 78-99 ms against 54-58 ms, the compute
thread off the CPU a fifth of the time). So the server computes on one shared thread (`compute_thread`):
the batchers' jobs and the generation engines' steps (`Engine.start(executor)`), and it frees the
loading thread's team once the models are built (`release_pool`). With the engine on its own thread the
soak's memory grew +3..12% in 2 minutes; with one team, +6..9% at a higher request rate.
"""

from __future__ import annotations

import concurrent.futures
import ctypes
import threading

_lock = threading.Lock()
_compute: concurrent.futures.ThreadPoolExecutor | None = None


def compute_thread() -> concurrent.futures.ThreadPoolExecutor:
    """The process's one compute thread, shared by every batcher (created on first use)."""
    global _compute
    with _lock:
        if _compute is None:
            _compute = concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix="qkv-compute")
        return _compute


def _libgomp():
    try:
        with open("/proc/self/maps") as f:
            path = next((line.split()[-1] for line in f if "libgomp" in line.rsplit("/", 1)[-1]), None)
    except OSError:  # not Linux
        return None
    if path is None:  # torch built with another OpenMP (or none)
        return None
    try:
        return ctypes.CDLL(path)
    except OSError:
        return None


def release_pool() -> bool:
    """Free the calling thread's OpenMP worker threads (``omp_pause_resource_all(omp_pause_soft)``; the
    next parallel region on this thread starts a new team). True when libgomp did so."""
    lib = _libgomp()
    fn = getattr(lib, "omp_pause_resource_all", None) if lib is not None else None
    if fn is None:
        return False
    fn.argtypes, fn.restype = [ctypes.c_int], ctypes.c_int
    return fn(1) == 0  # 1: omp_pause_soft
