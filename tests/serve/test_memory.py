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
