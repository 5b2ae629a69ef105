"""The soak of `qkv bench serve`: mixed traffic against a live server (embeddings, completions,
streaming chats, malformed JSON, oversized bodies, bad fields, clients leaving mid-stream, bursts past
the queue) for a while; responses by status, unintended 5xx, lost requests, server RSS growth after a
warm-up of the same traffic (a quarter of the soak: the allocator and oneDNN's kernels for the shapes
it brings settle; both readings 3 s after the traffic stops), its peak during the soak, ``/health``
at the end."""

from __future__ import annotations

import asyncio
import random
import threading
import time
from collections import Counter

from .bench_serve import Server, _chat_body, sentences


class _Soak:
    """Mixed traffic; every request ends in a status (or "disconnected" when the client leaves on
    purpose) or, if no response ever came, in ``lost``."""

    def __init__(self, url: str, max_tokens: int, seed: int = 0):
        self.url, self.max_tokens, self.rng = url, max_tokens, random.Random(seed)
        self.status: Counter = Counter()
        self.by_kind: Counter = Counter()
        self.unintended: list[str] = []
        self.lost: list[str] = []

    def _record(self, kind: str, status):
        self.status[status] += 1
        self.by_kind[kind] += 1
        if isinstance(status, int) and status >= 500 and not (status == 503 and kind in ("embed", "burst_embed")):
            self.unintended.append(f"{kind}: {status}")

    async def one(self, client, kind: str) -> None:
        i = self.rng.randrange(10**6)
        try:
            if kind in ("embed", "burst_embed"):
                texts = sentences(self.rng.randint(1, 8), seed=i)
                r = await client.post("/v1/embeddings", json={"model": "enc", "input": texts})
            elif kind in ("complete", "burst"):
                r = await client.post("/v1/completions", json={"model": "lm", "prompt": sentences(1, seed=i)[0],
                                                                "max_tokens": self.max_tokens // 2, "temperature": 0})
            elif kind in ("chat", "leave"):
                async with client.stream("POST", "/v1/chat/completions",
                                         json={"model": "lm", **_chat_body(i, self.max_tokens)}) as r:
                    async for line in r.aiter_lines():
                        if kind == "leave" and line.startswith("data: "):
                            return self._record(kind, "disconnected")  # closes the connection mid-stream
            elif kind == "malformed":
                r = await client.post("/v1/embeddings", content=b'{"input": ["unterminated',
                                      headers={"content-type": "application/json"})
            elif kind == "oversized":
                r = await client.post("/v1/embeddings", json={"model": "enc", "input": ["word " * 40000]})
            else:  # bad field
                r = await client.post("/v1/completions", json={"model": "lm", "prompt": "hi", "max_tokens": -3})
            self._record(kind, r.status_code)
        except Exception as e:  # noqa: BLE001 -- any failure to get a response is a lost request
            self.lost.append(f"{kind}: {type(e).__name__}: {e}")

    async def run(self, seconds: float, clients: int = 6) -> None:
        import httpx

        kinds = ["embed"] * 4 + ["complete"] * 2 + ["chat"] * 2 + ["leave", "malformed", "oversized", "bad"]
        deadline = time.monotonic() + seconds
        async with httpx.AsyncClient(base_url=self.url, timeout=120,
                                     limits=httpx.Limits(max_connections=200)) as client:
            async def worker():
                while time.monotonic() < deadline:
                    await self.one(client, self.rng.choice(kinds))

            async def bursts():
                while time.monotonic() < deadline:
                    await asyncio.sleep(min(max(seconds / 4, 1), 10))
                    await asyncio.gather(*(self.one(client, k) for k in ["burst"] * 24 + ["burst_embed"] * 40))
            await asyncio.gather(bursts(), *(worker() for _ in range(clients)))


def _metrics_total(url: str) -> float:
    import httpx

    text = httpx.get(url + "/metrics", timeout=10).text
    own = ('route="/metrics"', 'route="/health"')  # the bench's own probes
    return sum(float(line.rsplit(" ", 1)[1]) for line in text.splitlines()
               if line.startswith("qkv_requests_total{") and not any(o in line for o in own))


SETTLE_S = 3.0  # RSS is read this long after the traffic stops (start and end alike): past the server's
# memory trimmer (every 2 s), so the growth is what the server keeps, not what is in flight


def bench_soak(enc_kind: str, lm_kind: str, seconds: float, quick: bool, say) -> dict:
    import httpx

    max_tokens = 8 if quick else 16
    opts = {"max_queue": 4, "max_body_bytes": 65536}
    warm = max(3.0, seconds / 4)
    with Server({"models": {"enc": enc_kind, "lm": lm_kind}, "options": opts}) as srv:
        say(f"soak warm-up ({warm:.0f} s of the same traffic)")
        asyncio.run(_Soak(srv.url, max_tokens, seed=1).run(warm))
        time.sleep(SETTLE_S)
        rss0, count0 = srv.rss_mb(), _metrics_total(srv.url)
        say(f"soak ({seconds:.0f} s)")
        soak = _Soak(srv.url, max_tokens)
        samples, done = [], threading.Event()

        def sample():  # resident memory every 5 s, to tell a plateau from a climb
            while not done.wait(5.0):
                samples.append(srv.rss_mb())
        watcher = threading.Thread(target=sample, daemon=True)
        watcher.start()
        t0 = time.perf_counter()
        asyncio.run(soak.run(seconds))
        wall = time.perf_counter() - t0
        done.set()
        watcher.join()
        time.sleep(SETTLE_S)  # the last disconnects accounted for, requests finished, freed memory returned
        rss1, count1 = srv.rss_mb(), _metrics_total(srv.url)
        health = httpx.get(srv.url + "/health", timeout=10).status_code
    sent = sum(soak.status.values()) + len(soak.lost)
    return {"seconds": wall, "requests": sent, "status": {str(k): v for k, v in sorted(soak.status.items(), key=str)},
            "kinds": dict(soak.by_kind), "unintended_5xx": len(soak.unintended), "lost": len(soak.lost),
            "lost_examples": soak.lost[:5], "server_counted": count1 - count0, "rss_start_mb": rss0,
            "rss_end_mb": rss1, "rss_max_mb": max(samples + [rss0, rss1]), "rss_growth_pct": 100 * (rss1 - rss0) / rss0,
            "warmup_s": warm, "health_at_end": health}
