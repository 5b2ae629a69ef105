"""`qkv bench serve`: the HTTP server (`qkv serve`) under load, on loopback, against the baselines.

The server runs in a child process (uvicorn, 127.0.0.1, torch threads = cores); the clients are an
asyncio load generator in this process (a minimal keep-alive client, `_Conn`: it shares the cores).
Every ratio is measured in one run, interleaved.

- Embeddings (all-MiniLM-L6-v2): 1, 4 and 16 concurrent clients, each request carrying 1 sentence or
  8 sentences; sentences/s and p50/p99 request latency, against (a) ``model.embed`` in process on
  the same sentences (batch 32) and (b) a one-request-at-a-time server as users write it (Starlette +
  sentence-transformers, one lock, each request embedded alone).
- Attention on request: ``"qkv": {"attention": {"layers": [-1], "topk": 8}}`` vs the same plain
  request, one client; ratio of median latencies.
- Chat (GPT-2 124M shape, random weights, byte-level BPE tokenizer padded to GPT-2's 50,257 ids,
  ChatML): streaming ``/v1/chat/completions``, greedy, fixed ``max_tokens`` (random weights almost
  never pick the end token; the completion token counts are reported); time to first token,
  tokens/s per stream and in aggregate at 1 and 16 concurrent streams.
- Soak: mixed traffic (embeddings, completions, streaming chats, malformed JSON, oversized bodies,
  bad fields, clients leaving mid-stream, bursts past the queue) for ``soak_seconds``; responses by
  status, unintended 5xx, lost requests, server RSS growth after warm-up, ``/health`` at the end.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import random
import socket
import statistics
import subprocess
import sys
import time
from collections.abc import Callable

import torch

import qkv

from .bench import _render

WORDS = ("the a cat dog sky model river city attention layer token small large quickly slowly reads writes "
         "under over music paper light green blue server request answer question morning evening train "
         "mountain garden learns finds keeps every some many old new bright quiet").split()
CHATML = ("{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
          "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")
ATTN = {"attention": {"layers": [-1], "topk": 8}}


def sentences(n: int, seed: int = 0) -> list[str]:
    """``n`` sentences of 8-20 words (10-30 tokens), deterministic."""
    rng = random.Random(seed)
    return [" ".join(rng.choice(WORDS) for _ in range(rng.randint(8, 20))).capitalize() + "." for _ in range(n)]


# --- models (built in the server child) ---------------------------------------------------------

def _tokenizer(vocab: int | None, template: str | None):
    """Byte-level BPE trained offline on `sentences`, ChatML specials; padded with unused added
    tokens to ``vocab`` ids (GPT-2's 50,257) so the model keeps GPT-2's embedding and head sizes."""
    from tokenizers import Tokenizer as Tok
    from tokenizers import decoders, models, pre_tokenizers, trainers

    from qkv.models.chat import ChatTemplate
    from qkv.pretrained import Tokenizer

    tok = Tok(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.train_from_iterator(sentences(500), trainers.BpeTrainer(
        vocab_size=400, special_tokens=["<pad>", "<unk>", "<|im_start|>", "<|im_end|>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False))
    if vocab and vocab > tok.get_vocab_size():
        tok.add_tokens([f"<unused{i}>" for i in range(vocab - tok.get_vocab_size())])
    specials = {"pad_token": "<pad>", "eos_token": "<|im_end|>"}
    chat = ChatTemplate(template, special_tokens=specials) if template else None
    return Tokenizer(tok, pad_token="<pad>", eos_token="<|im_end|>", chat_template=chat)


def build_model(kind: str):
    """"minilm" (all-MiniLM-L6-v2), "gpt2" (GPT-2 124M shape, random), "tiny-enc", "tiny-lm" (tests)."""
    from qkv.models import CausalLM, CausalLMConfig, TextEncoder, TextEncoderConfig

    torch.manual_seed(0)
    if kind == "minilm":
        return qkv.load("all-MiniLM-L6-v2")
    if kind == "tiny-enc":
        tok = _tokenizer(None, None)
        cfg = TextEncoderConfig(vocab_size=tok.vocab_size, dim=32, n_layers=2, n_heads=2, ffn_dim=64,
                                max_positions=64, max_length=64, pad_token_id=tok.pad_id)
        model = TextEncoder(cfg).init_weights().eval()
    else:
        tok = _tokenizer(50257 if kind == "gpt2" else None, CHATML)
        small = {} if kind == "gpt2" else {"dim": 32, "n_layers": 2, "n_heads": 2, "ffn_dim": 64, "max_positions": 256}
        cfg = CausalLMConfig(vocab_size=tok.vocab_size, eos_token_id=tok.eos_id, pad_token_id=tok.pad_id, **small)
        model = CausalLM(cfg).init_weights(std=0.02).eval()
    model.tokenizer = tok
    return model


def _serial_app(kind: str):
    """What a user writes without qkv: Starlette + sentence-transformers, one request at a time."""
    import threading

    from starlette.applications import Starlette
    from starlette.responses import JSONResponse
    from starlette.routing import Route

    if kind == "minilm":
        from sentence_transformers import SentenceTransformer

        from qkv.pretrained import resolve
        st = SentenceTransformer(str(resolve("all-MiniLM-L6-v2")), device="cpu")
        encode = lambda texts: st.encode(texts, batch_size=32)  # noqa: E731
    else:  # tests: the tiny qkv encoder, called the same way
        m = build_model(kind)
        encode = lambda texts: m.embed(texts).numpy()  # noqa: E731
    lock = threading.Lock()

    def work(texts):
        with lock:
            return encode(texts)

    async def embeddings(request):
        body = await request.json()
        texts = body["input"] if isinstance(body["input"], list) else [body["input"]]
        import anyio
        vecs = await anyio.to_thread.run_sync(work, texts)
        return JSONResponse({"object": "list", "data": [{"object": "embedding", "index": i, "embedding": v.tolist()}
                                                        for i, v in enumerate(vecs)]})

    async def health(request):
        return JSONResponse({"status": "ok"})

    return Starlette(routes=[Route("/v1/embeddings", embeddings, methods=["POST"]), Route("/health", health)])


def _server_child(spec: dict) -> None:
    import uvicorn

    torch.set_num_threads(spec["threads"])
    if spec.get("serial"):
        app = _serial_app(spec["serial"])
    else:
        from qkv.serve import create_app
        app = create_app({name: build_model(kind) for name, kind in spec["models"].items()}, **spec.get("options", {}))
    uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=spec["port"], log_level="error",
                                  timeout_graceful_shutdown=5)).run()


class Server:
    """A server child process (`_server_child`): ``url``, ``pid``, ``rss_mb()``; stopped on exit."""

    def __init__(self, spec: dict, timeout: float = 300):
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        threads = spec.pop("threads", None) or torch.get_num_threads()
        self.spec = {**spec, "port": port, "threads": threads}
        self.url = f"http://127.0.0.1:{port}"
        env = dict(os.environ, OMP_NUM_THREADS=str(threads), TOKENIZERS_PARALLELISM="false")
        self.proc = subprocess.Popen([sys.executable, "-m", "qkv.cli.bench_serve", "--server", json.dumps(self.spec)],
                                     env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        self.pid = self.proc.pid
        import httpx
        deadline = time.monotonic() + timeout
        while True:
            if self.proc.poll() is not None:
                raise RuntimeError(f"bench server {spec} exited: {self.proc.stderr.read().decode()[-3000:]}")
            with contextlib.suppress(httpx.HTTPError):
                if httpx.get(self.url + "/health", timeout=2).status_code == 200:
                    break
            if time.monotonic() > deadline:
                self.close()
                raise RuntimeError(f"bench server {spec} did not start in {timeout:.0f} s")
            time.sleep(0.2)

    def rss_mb(self) -> float:
        with open(f"/proc/{self.pid}/status") as f:
            return next(float(line.split()[1]) / 1024 for line in f if line.startswith("VmRSS:"))

    def close(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(15)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self.proc.stderr.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


# --- load generation ----------------------------------------------------------------------------

def _pct(xs: list[float], p: float) -> float:
    xs = sorted(xs)
    return xs[min(len(xs) - 1, int(round(p / 100 * (len(xs) - 1))))]


class _Conn:
    """A minimal HTTP/1.1 keep-alive client on asyncio streams: the load generator shares the 2 cores with
    the server, so it must cost little (httpx spends about 1 ms of CPU per request, as much as a small
    batch of MiniLM). Requests are JSON POSTs; responses need a Content-Length (all the routes measured
    here send one)."""

    def __init__(self, url: str):
        host, port = url.removeprefix("http://").rsplit(":", 1)
        self.host, self.port = host, int(port)
        self.reader = self.writer = None

    async def post(self, path: str, body: dict) -> tuple[int, bytes]:
        if self.writer is None:
            self.reader, self.writer = await asyncio.open_connection(self.host, self.port)
        data = json.dumps(body).encode()
        self.writer.write(f"POST {path} HTTP/1.1\r\nHost: {self.host}\r\nContent-Type: application/json\r\n"
                          f"Content-Length: {len(data)}\r\n\r\n".encode() + data)
        head = await self.reader.readuntil(b"\r\n\r\n")
        lines = head.decode("latin-1").split("\r\n")
        status = int(lines[0].split()[1])
        fields = dict(line.split(":", 1) for line in lines[1:] if ":" in line)
        length = next((int(v) for k, v in fields.items() if k.strip().lower() == "content-length"), None)
        if length is None:
            raise RuntimeError(f"POST {path}: the response has no Content-Length ({lines[0]})")
        return status, await self.reader.readexactly(length)

    async def close(self) -> None:
        if self.writer is not None:
            self.writer.close()
            with contextlib.suppress(OSError):
                await self.writer.wait_closed()


async def _embed_load(url: str, texts: list[str], per_request: int, clients: int, extra: dict | None = None) -> dict:
    """Send ``texts`` in requests of ``per_request`` from ``clients`` concurrent connections."""
    bodies = [{"input": texts[i:i + per_request], **({"qkv": extra} if extra else {})}
              for i in range(0, len(texts), per_request)]
    todo, lat = iter(bodies), []

    async def worker():
        conn = _Conn(url)
        try:
            for body in todo:
                t0 = time.perf_counter()
                status, data = await conn.post("/v1/embeddings", body)
                if status != 200:
                    raise RuntimeError(f"/v1/embeddings answered {status}: {data[:300]!r}")
                lat.append(time.perf_counter() - t0)
        finally:
            await conn.close()
    t0 = time.perf_counter()
    await asyncio.gather(*(worker() for _ in range(clients)))
    wall = time.perf_counter() - t0
    return {"per_s": len(texts) / wall, "p50_ms": _pct(lat, 50) * 1e3, "p99_ms": _pct(lat, 99) * 1e3}


def bench_embeddings(enc_kind: str, quick: bool, repeat: int, say) -> list[dict]:
    n = 64 if quick else 256
    texts = sentences(n, seed=1)
    model = build_model(enc_kind)
    rows: dict[tuple, list[dict]] = {}
    with Server({"models": {"enc": enc_kind}}) as srv, Server({"serial": enc_kind}) as ser:
        run = lambda url, k, c: asyncio.run(_embed_load(url, texts, k, c))  # noqa: E731
        for url in (srv.url, ser.url):
            run(url, 8, 4)  # warm-up
        model.embed(texts, batch_size=32)
        cases = ([(k, c, "qkv") for k in (1, 8) for c in (1, 4, 16)]
                 + [(k, c, "serial") for k in (1, 8) for c in (1, 16)])
        for r in range(repeat):
            say(f"embeddings round {r + 1}/{repeat}")
            order = cases + [("all", 0, "inproc")]
            for k, c, impl in order if r % 2 == 0 else order[::-1]:
                if impl == "inproc":
                    t0 = time.perf_counter()
                    model.embed(texts, batch_size=32)
                    res = {"per_s": n / (time.perf_counter() - t0), "p50_ms": float("nan"), "p99_ms": float("nan")}
                else:
                    res = run(srv.url if impl == "qkv" else ser.url, k, c)
                rows.setdefault((k, c, impl), []).append(res)
    med = {key: {f: statistics.median(x[f] for x in v) for f in v[0]} for key, v in rows.items()}
    inproc = med[("all", 0, "inproc")]["per_s"]
    out = [{"impl": "in-process model.embed (batch 32)", "per_request": "all", "clients": 0,
            **med[("all", 0, "inproc")]}]
    for (k, c, impl), m in med.items():
        if impl == "inproc":
            continue
        row = {"impl": "qkv serve" if impl == "qkv" else "one-at-a-time server", "per_request": k, "clients": c, **m,
               "vs_inproc": m["per_s"] / inproc}
        if impl == "qkv" and (k, c, "serial") in med:
            row["vs_serial"] = m["per_s"] / med[(k, c, "serial")]["per_s"]
        out.append(row)
    return out


def bench_attention(enc_kind: str, quick: bool, say) -> list[dict]:
    say("attention on request vs plain")
    rounds = 10 if quick else 40
    out = []
    with Server({"models": {"enc": enc_kind}}) as srv:
        for k in (1, 4):
            texts = sentences(k * rounds, seed=2)
            plain, attn = [], []
            asyncio.run(_embed_load(srv.url, texts[:k], k, 1, ATTN))  # warm-up
            for i in range(rounds):
                chunk = texts[i * k:(i + 1) * k]
                for extra, acc in ((None, plain), (ATTN, attn)) if i % 2 == 0 else ((ATTN, attn), (None, plain)):
                    acc.append(asyncio.run(_embed_load(srv.url, chunk, k, 1, extra))["p50_ms"])
            p, a = statistics.median(plain), statistics.median(attn)
            out.append({"per_request": k, "plain_ms": p, "attention_ms": a, "ratio": a / p})
    return out


async def _chat_stream(client, body: dict) -> dict:
    t0, first, tokens = time.perf_counter(), None, None
    async with client.stream("POST", "/v1/chat/completions", json=body) as r:
        r.raise_for_status()
        async for line in r.aiter_lines():
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            chunk = json.loads(line[6:])
            if chunk.get("usage"):
                tokens = chunk["usage"]["completion_tokens"]
            if first is None and any(c.get("delta", {}).get("content") for c in chunk.get("choices", ())):
                first = time.perf_counter()
    end = time.perf_counter()
    return {"ttft": first - t0, "tokens": tokens, "per_s": (tokens - 1) / (end - first), "end": end}


def _chat_body(i: int, max_tokens: int, stream: bool = True) -> dict:
    return {"messages": [{"role": "user", "content": sentences(1, seed=100 + i)[0]}], "max_tokens": max_tokens,
            "temperature": 0, "stream": stream, **({"stream_options": {"include_usage": True}} if stream else {})}


def bench_chat(lm_kind: str, quick: bool, repeat: int, say) -> list[dict]:
    import httpx

    max_tokens = 16 if quick else 64
    out = []
    with Server({"models": {"lm": lm_kind}}) as srv:
        async def level(n):
            async with httpx.AsyncClient(base_url=srv.url, timeout=300) as client:
                t0 = time.perf_counter()
                res = await asyncio.gather(*(_chat_stream(client, _chat_body(i, max_tokens)) for i in range(n)))
            return res, time.perf_counter() - t0
        asyncio.run(level(2))  # warm-up
        for n in (1, 16):
            say(f"chat, {n} concurrent streams")
            runs = [asyncio.run(level(n)) for _ in range(repeat if n == 1 else max(1, repeat - 1))]
            out.append({"streams": n, "max_tokens": max_tokens,
                        "ttft_ms": statistics.median(statistics.median(x["ttft"] for x in r) for r, _ in runs) * 1e3,
                        "stream_tok_s": statistics.median(statistics.median(x["per_s"] for x in r) for r, _ in runs),
                        "aggregate_tok_s": statistics.median(sum(x["tokens"] for x in r) / w for r, w in runs),
                        "min_tokens": min(x["tokens"] for r, _ in runs for x in r)})
    return out


# --- the suite ----------------------------------------------------------------------------------

def run(quick: bool = False, repeat: int | None = None, soak_seconds: float | None = None, only: str | None = None,
        tiny: bool = False, progress: Callable[[str], None] | None = None) -> dict:
    """Run the suite; returns {"embeddings", "attention", "chat", "soak", "env"} (skipped parts absent).

    ``tiny``: random 2-layer models instead of MiniLM and GPT-2 (the tests)."""
    if only not in (None, "embeddings", "chat", "soak"):
        raise ValueError(f"qkv bench serve: --only {only!r}: choose embeddings, chat or soak")
    say = progress or (lambda s: None)
    repeat = repeat or (1 if quick else 3)
    soak_seconds = soak_seconds if soak_seconds is not None else (5 if quick else 120)
    enc, lm = ("tiny-enc", "tiny-lm") if tiny else ("minilm", "gpt2")
    load0, t0 = os.getloadavg(), time.perf_counter()
    out: dict = {}
    if only in (None, "embeddings"):
        out["embeddings"] = bench_embeddings(enc, quick, repeat, say)
        out["attention"] = bench_attention(enc, quick, say)
    if only in (None, "chat"):
        out["chat"] = bench_chat(lm, quick, repeat, say)
    if only in (None, "soak"):
        from .bench_soak import bench_soak

        out["soak"] = bench_soak(enc, lm, soak_seconds, quick, say)
    out["env"] = {"torch": torch.__version__, "threads": torch.get_num_threads(), "qkv": qkv.__version__,
                  "quick": quick, "repeat": repeat, "models": [enc, lm], "wall_s": time.perf_counter() - t0,
                  "loadavg_start": list(load0), "loadavg_end": list(os.getloadavg())}
    return out


def format_table(result: dict, markdown: bool = False) -> str:
    f = lambda x, d=1: "-" if x != x else f"{x:.{d}f}"  # noqa: E731 -- nan: not measured
    parts = []
    if "embeddings" in result:
        rows = [("server", "sentences / request", "clients", "sentences/s", "p50 ms", "p99 ms", "vs in-process",
                 "vs one-at-a-time")]
        for r in result["embeddings"]:
            rows.append((r["impl"], str(r["per_request"]), str(r["clients"] or "-"), f(r["per_s"]), f(r["p50_ms"]),
                         f(r["p99_ms"]), f"{r['vs_inproc']:.2f}x" if "vs_inproc" in r else "1.00x",
                         f"{r['vs_serial']:.2f}x" if "vs_serial" in r else "-"))
        att = [("sentences / request", "plain p50 ms", "with attention p50 ms", "ratio (target <= 1.3)")]
        att += [(str(r["per_request"]), f(r["plain_ms"]), f(r["attention_ms"]), f"{r['ratio']:.2f}x")
                for r in result["attention"]]
        parts += [_render(rows, markdown), _render(att, markdown)]
    if "chat" in result:
        rows = [("concurrent streams", "max_tokens", "time to first token ms", "tokens/s per stream",
                 "aggregate tokens/s", "fewest tokens in a stream")]
        rows += [(str(r["streams"]), str(r["max_tokens"]), f(r["ttft_ms"]), f(r["stream_tok_s"]),
                  f(r["aggregate_tok_s"]), str(r["min_tokens"])) for r in result["chat"]]
        parts.append(_render(rows, markdown))
    if "soak" in result:
        s = result["soak"]
        rows = [("soak", "value"), ("duration s", f(s["seconds"])), ("requests", str(s["requests"])),
                ("responses by status", ", ".join(f"{k}: {v}" for k, v in s["status"].items())),
                ("unintended 5xx (target 0)", str(s["unintended_5xx"])), ("lost (target 0)", str(s["lost"])),
                ("server-counted (GET /metrics)", f(s["server_counted"], 0)),
                ("warm-up s (same traffic, before the start)", f(s.get("warmup_s", float("nan")), 0)),
                ("server RSS start / peak / end MB",
                 f"{s['rss_start_mb']:.0f} / {s.get('rss_max_mb', float('nan')):.0f} / {s['rss_end_mb']:.0f}"),
                ("RSS growth (target <= 10%)", f"{s['rss_growth_pct']:+.1f}%"),
                ("/health at the end", str(s["health_at_end"]))]
        parts.append(_render(rows, markdown))
    e = result["env"]
    parts.append(f"wall {e['wall_s']:.0f} s; load average {e['loadavg_start'][0]:.2f} at start, "
                 f"{e['loadavg_end'][0]:.2f} at end; {e['threads']} torch threads; torch {e['torch']}")
    return "\n\n".join(parts)


def main(argv=None) -> int:
    import argparse

    if argv is None and len(sys.argv) == 3 and sys.argv[1] == "--server":
        _server_child(json.loads(sys.argv[2]))
        return 0
    p = argparse.ArgumentParser(prog="python -m qkv.cli.bench_serve", description=__doc__.splitlines()[0])
    p.add_argument("--quick", action="store_true")
    p.add_argument("--repeat", type=int, default=None)
    p.add_argument("--soak-seconds", type=float, default=None)
    p.add_argument("--only", choices=["embeddings", "chat", "soak"], default=None)
    p.add_argument("--tiny", action="store_true", help="random 2-layer models (seconds)")
    p.add_argument("--markdown", action="store_true")
    p.add_argument("--json", action="store_true")
    a = p.parse_args(argv)
    say = None if a.json else (lambda s: print(f"  {s} ...", file=sys.stderr, flush=True))
    result = run(quick=a.quick, repeat=a.repeat, soak_seconds=a.soak_seconds, only=a.only, tiny=a.tiny, progress=say)
    print(json.dumps(result, indent=2) if a.json else format_table(result, markdown=a.markdown))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
