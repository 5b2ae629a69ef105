"""GET /metrics (Prometheus text) and the batching of concurrent embedding requests."""

from __future__ import annotations

import asyncio
import re
import time
from concurrent.futures import ThreadPoolExecutor

import httpx
import numpy as np
import pytest
from chat_helpers import tiny_model

from qkv.serve.batching import Batcher
from qkv.serve.errors import APIError


def _value(text: str, name: str, **labels) -> float:
    """The sample ``name{labels}`` of a Prometheus text page (0 when absent)."""
    for line in text.splitlines():
        m = re.match(r"([a-zA-Z_:][\w:]*)(\{([^}]*)\})? (\S+)$", line)
        if not m or m.group(1) != name:
            continue
        got = dict(re.findall(r'(\w+)="([^"]*)"', m.group(3) or ""))
        if all(got.get(k) == v for k, v in labels.items()):
            return float(m.group(4))
    return 0.0


def test_metrics_count_requests_tokens_and_batches(serve, tiny_encoder):
    lm = tiny_model(seed=2)
    live = serve({"enc": tiny_encoder, "tiny": lm}, api_key="k")
    client = live.client()
    client.embeddings.create(model="enc", input=["hello there", "the sky"])
    client.completions.create(model="tiny", prompt="hello", max_tokens=5, temperature=0)
    auth = {"Authorization": "Bearer k"}
    r = httpx.post(live.url + "/v1/embeddings", json={"model": "enc", "input": 3}, headers=auth)
    assert r.status_code == 400
    assert httpx.get(live.url + "/metrics").status_code == 401  # the key guards /metrics too
    page = httpx.get(live.url + "/metrics", headers={"Authorization": "Bearer k"})
    assert page.status_code == 200 and page.headers["content-type"].startswith("text/plain")
    text = page.text
    assert _value(text, "qkv_requests_total", route="/v1/embeddings", status="200") == 1
    assert _value(text, "qkv_requests_total", route="/v1/embeddings", status="400") == 1
    assert _value(text, "qkv_requests_total", route="/v1/completions", status="200") == 1
    assert _value(text, "qkv_tokens_total", model="tiny", kind="output") == 5
    assert _value(text, "qkv_tokens_total", model="tiny", kind="input") == len(lm.tokenizer.encode("hello"))
    enc_tokens = sum(len(tiny_encoder.tokenizer.encode(t)) for t in ["hello there", "the sky"])
    assert _value(text, "qkv_tokens_total", model="enc", kind="input") == enc_tokens
    assert _value(text, "qkv_batch_size_sum", model="enc") == 2
    assert _value(text, "qkv_batch_size_count", model="tiny") >= 4  # one decoding step per token after the first
    assert _value(text, "qkv_time_to_first_token_seconds_count", model="tiny") == 1
    assert _value(text, "qkv_request_seconds_count", route="/v1/completions") == 1
    assert "qkv_queue_depth" in text
    httpx.get(live.url + "/no/such/route", headers={"Authorization": "Bearer k"})
    text = httpx.get(live.url + "/metrics", headers={"Authorization": "Bearer k"}).text
    assert _value(text, "qkv_requests_total", route="other", status="404") == 1  # raw paths are not labels


def test_concurrent_embeddings_are_batched_and_equal_alone(serve, tiny_encoder):
    live = serve({"enc": tiny_encoder})
    texts = [f"the sky is blue {'and green ' * (i % 4)}{i}" for i in range(48)]

    def one(t):
        r = httpx.post(live.url + "/v1/embeddings", json={"model": "enc", "input": t}, timeout=30)
        assert r.status_code == 200, r.text
        return r.json()["data"][0]["embedding"]

    with ThreadPoolExecutor(16) as pool:
        got = np.array(list(pool.map(one, texts)))
    ref = tiny_encoder.embed(texts).numpy()
    cos = (got * ref).sum(1) / np.linalg.norm(got, axis=1) / np.linalg.norm(ref, axis=1)
    assert cos.min() > 0.99999
    text = httpx.get(live.url + "/metrics").text
    calls = _value(text, "qkv_batch_size_count", model="enc")
    assert _value(text, "qkv_batch_size_sum", model="enc") == len(texts)
    assert calls < len(texts)  # some requests shared a call


def test_batcher_groups_by_budget_and_refuses_past_its_queue():
    calls = []

    def fn(items):
        calls.append(list(items))
        return [x * 2 for x in items]

    async def main():
        b = Batcher(fn, budget=10, max_items=100, max_wait=0.05, max_pending=8)
        results = await asyncio.gather(*(b.submit([i, i + 100], [2, 2]) for i in range(4)))
        assert results == [[2 * i, 2 * (i + 100)] for i in range(4)]
        assert [len(c) for c in calls] == [4, 4]  # 10 tokens a batch: two requests of 4 tokens each
        big = await b.submit(list(range(6)), [5] * 6)  # larger than the budget: runs alone, whole
        assert big == [2 * i for i in range(6)] and len(calls[-1]) == 6
        with pytest.raises(APIError) as e:
            await asyncio.gather(*(b.submit([i], [1]) for i in range(9)))
        assert e.value.status == 503 and e.value.headers["Retry-After"]

    asyncio.run(main())


def test_batcher_waits_for_the_clients_it_just_answered_and_never_for_a_lone_one():
    sizes = []

    def fn(items):
        sizes.append(len(items))
        time.sleep(0.01)
        return items

    async def client(b, i, rounds):
        for r in range(rounds):
            assert await b.submit([(i, r)], [1]) == [(i, r)]
            await asyncio.sleep(0.002 * (i % 3))  # the clients come back at different times

    async def main():
        b = Batcher(fn, max_wait=0.5)
        await asyncio.gather(*(client(b, i, 6) for i in range(8)))  # 8 closed-loop clients
        assert sum(sizes) == 48 and sizes[-4:] == [8] * 4  # every client back in each batch
        sizes.clear()
        t0 = time.perf_counter()
        await client(b, 0, 5)  # one client: after the first call (which expects 8), nothing waits
        assert sizes == [1] * 5 and time.perf_counter() - t0 < 0.5 + 5 * 0.01 + 0.4

    asyncio.run(main())


def test_batcher_failure_reaches_every_waiting_request():
    def fn(items):
        raise RuntimeError("boom")

    async def main():
        b = Batcher(fn, max_wait=0.01)
        out = await asyncio.gather(b.submit([1], [1]), b.submit([2], [1]), return_exceptions=True)
        assert all(isinstance(x, RuntimeError) for x in out)
        b.fn = lambda items: items  # the worker survives a failed call
        assert await b.submit([3], [1]) == [3]

    asyncio.run(main())


def test_encoder_overload_gives_503_and_the_rest_are_answered(serve, tiny_encoder, monkeypatch):
    embed = tiny_encoder.embed_ids

    def slow(ids, *a, **kw):
        time.sleep(0.05)
        return embed(ids, *a, **kw)

    monkeypatch.setattr(tiny_encoder, "embed_ids", slow)
    live = serve({"enc": tiny_encoder}, max_queue=0)  # encoders queue 64 x max(max_queue, 1) inputs

    def one(i):
        return httpx.post(live.url + "/v1/embeddings", json={"model": "enc", "input": ["hi there"] * 20}, timeout=30)

    with ThreadPoolExecutor(12) as pool:
        replies = list(pool.map(one, range(24)))
    codes = [r.status_code for r in replies]
    assert set(codes) <= {200, 503} and codes.count(503) > 0 and codes.count(200) > 0
    refused = next(r for r in replies if r.status_code == 503)
    assert refused.headers["retry-after"] == "1" and refused.json()["error"]["code"] == "overloaded"
    alone = httpx.post(live.url + "/v1/embeddings", json={"model": "enc", "input": ["hi"] * 100}, timeout=30)
    assert alone.status_code == 200  # into an empty queue any request goes
