"""The server's memory trimmer (`qkv.serve.memory`): freed heap pages go back while requests arrive."""

from __future__ import annotations

import asyncio
import sys

import pytest

from qkv.serve import create_app
from qkv.serve.memory import Trimmer, _malloc_trim


def test_trims_only_while_requests_arrive():
    work = [0]
    trims = []

    async def main():
        t = Trimmer(lambda: work[0], interval=0.02)
        t.trim = trims.append  # records each call's argument
        t.start()
        await asyncio.sleep(0.1)
        assert trims == []  # idle from the start: nothing to give back
        work[0] += 1
        await asyncio.sleep(0.1)
        assert trims == [0]  # one trim after the work, none while idle again
        work[0] += 5
        await asyncio.sleep(0.1)
        await t.stop()
        assert trims == [0, 0] and t.calls == 2
        work[0] += 1
        await asyncio.sleep(0.05)
        assert trims == [0, 0]  # stopped

    asyncio.run(main())


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc")
def test_glibc_malloc_trim_is_found_and_runs():
    trim = _malloc_trim()
    assert trim is not None and trim(0) in (0, 1)


@pytest.mark.parametrize("bad", [-1, "2", True, float("nan")])
def test_create_app_refuses_a_bad_trim_interval(tiny_encoder, bad):
    with pytest.raises(ValueError, match="trim_interval"):
        create_app({"enc": tiny_encoder}, trim_interval=bad)


def test_batchers_share_one_compute_thread_and_the_loading_thread_pool_is_released():
    import threading

    import torch

    from qkv.serve.batching import Batcher
    from qkv.serve.openmp import release_pool

    where = []

    def fn(items):
        where.append(threading.get_ident())
        return items

    async def main():
        a, b = Batcher(fn, name="a"), Batcher(fn, name="b")
        await asyncio.gather(a.submit([1], [1]), b.submit([2], [1]))
        await a.run(lambda: where.append(threading.get_ident()))
    asyncio.run(main())
    assert len(set(where)) == 1 and where[0] != threading.get_ident()
    torch.ones(256, 256) @ torch.ones(256, 256)  # a parallel region on this thread
    from qkv.serve.openmp import _libgomp

    assert release_pool() is (_libgomp() is not None)  # torch's Linux wheels bring libgomp: True there
    y = torch.ones(512, 512) @ torch.ones(512, 512)  # and torch still computes here after it
    assert float(y[0, 0]) == 512.0
