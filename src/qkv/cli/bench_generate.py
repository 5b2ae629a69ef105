"""`qkv bench generate`: the continuous-batching engine against one-request-at-a-time ``generate``.

GPT-2 124M (``CausalLM(CausalLMConfig())``, random weights, fp32), greedy, no stop token:

- Throughput: 16 concurrent requests (prompts of 24-39 tokens) of 64 new tokens each through one
  `qkv.models.engine.Engine` (synchronous driver) vs the same requests run one after another with
  ``model.generate``; aggregate tokens/s of each and their ratio; the check counts requests whose
  tokens are identical. ``--quick`` times the sequential side on 4 of the 16 requests (tokens/s of
  a sequential run does not depend on how many requests it runs).
- Latency: 1, 4 and 16 requests submitted at once to an engine driven by its background thread:
  median time to first token (submit -> first token) and median time per later token.
- Turn 2 of a conversation: prefill 50 new tokens after a 1,000-token history kept in the KV cache
  vs prefilling all 1,050 tokens from scratch (a GPT-2 shape with 2,048 learned positions).

Ratios come from interleaved runs (medians), as in the other suites.
"""

from __future__ import annotations

import statistics
from collections.abc import Callable

import torch

import qkv
from qkv.models import CausalLM, CausalLMConfig
from qkv.models.engine import Engine
from qkv.nn import KVCache

from .bench import _render, interleaved

NEW = 64


def _model(**overrides) -> CausalLM:
    torch.manual_seed(0)
    return CausalLM(CausalLMConfig(**overrides)).eval()


def _prompts(n: int = 16, vocab: int = 50257) -> list[list[int]]:
    g = torch.Generator().manual_seed(1)
    return [torch.randint(0, vocab, (24 + i % 16,), generator=g).tolist() for i in range(n)]


def bench_throughput(model, repeat: int, quick: bool) -> dict:
    prompts = _prompts(16)
    seq_prompts = prompts[:4] if quick else prompts
    engine = Engine(model, max_batch=16)
    out: dict = {}

    def batched():
        reqs = [engine.submit(p, max_new_tokens=NEW, eos_token_id=[]) for p in prompts]
        engine.run_until_idle()
        out["batched"] = [r.tokens for r in reqs]

    def sequential():
        out["sequential"] = [model.generate(torch.tensor([p]), max_new_tokens=NEW, eos_token_id=[])[0, len(p):]
                             .tolist() for p in seq_prompts]

    batched(), sequential()  # warm-up, and the tokens to compare
    same = sum(a == b for a, b in zip(out["batched"], out["sequential"]))
    tq, tb = interleaved(batched, sequential, repeat)
    qkv_rate, seq_rate = len(prompts) * NEW / tq, len(seq_prompts) * NEW / tb
    return {"case": f"GPT-2 124M: {len(prompts)} concurrent requests x {NEW} tokens", "baseline":
            f"generate, one request after another ({len(seq_prompts)} timed)", "qkv_s": tq, "baseline_s": tb,
            "qkv_per_s": qkv_rate, "baseline_per_s": seq_rate, "speedup": qkv_rate / seq_rate, "unit": "tokens/s",
            "check": f"identical tokens: {same}/{len(seq_prompts)}"}


def bench_latency(model, repeat: int, new: int) -> list[dict]:
    prompts = _prompts(16)
    rows = []
    with Engine(model, max_batch=16) as engine:
        engine.submit(prompts[0], max_new_tokens=4, eos_token_id=[]).result()  # warm-up
        for n in (1, 4, 16):
            ttft, per_token = [], []
            for _ in range(repeat):
                reqs = [engine.submit(p, max_new_tokens=new, eos_token_id=[]) for p in prompts[:n]]
                for r in reqs:
                    r.result()
                ttft.append(statistics.median(r.first_token_time - r.submitted for r in reqs))
                per_token.append(statistics.median((r.finished_time - r.first_token_time) / (len(r.tokens) - 1)
                                                   for r in reqs))
            rows.append({"concurrent": n, "new_tokens": new, "ttft_s": statistics.median(ttft),
                         "per_token_s": statistics.median(per_token)})
    return rows


def bench_turn2(repeat: int, history: int = 1000, new: int = 50) -> dict:
    model = _model(max_positions=2048)
    ids = torch.randint(0, 50257, (1, history + new), generator=torch.Generator().manual_seed(2))
    n_layers = model.config.n_layers
    cache = KVCache(n_layers, capacity=history + new)
    with torch.no_grad():
        model(ids[:, :history], cache=cache, last_only=True)
        ref = model(ids, cache=KVCache(n_layers, capacity=history + new), last_only=True).logits

    def cached():
        cache.length = history  # rewind to the kept history (what a chat session does between turns)
        with torch.no_grad():
            return model(ids[:, history:], cache=cache, last_only=True).logits

    def scratch():
        with torch.no_grad():
            return model(ids, cache=KVCache(n_layers, capacity=history + new), last_only=True).logits

    diff = float((cached() - ref).abs().max())
    scratch()
    tq, tb = interleaved(cached, scratch, repeat)
    return {"case": f"turn-2 prefill: {new} new tokens after a cached {history}-token history",
            "baseline": f"prefill all {history + new} tokens", "qkv_s": tq, "baseline_s": tb,
            "ratio": tq / tb, "check": f"max logit difference {diff:.1e}"}


def run(quick: bool = False, repeat: int | None = None, progress: Callable[[str], None] | None = None) -> dict:
    """Run the suite; returns {"speed": [...], "latency": [...], "turn2": {...}, "env": {...}}."""
    say = progress or (lambda s: None)
    repeat = repeat or 3
    model = _model()
    say("continuous batching vs sequential generate")
    speed = [bench_throughput(model, repeat, quick)]
    say("latency at 1, 4 and 16 concurrent requests")
    latency = bench_latency(model, 1 if quick else repeat, 32 if quick else NEW)
    say("turn-2 prefill with a cached history")
    turn2 = bench_turn2(repeat if quick else max(repeat, 5))
    env = {"torch": torch.__version__, "threads": torch.get_num_threads(), "qkv": qkv.__version__, "quick": quick,
           "repeat": repeat}
    return {"speed": speed, "latency": latency, "turn2": turn2, "env": env}


def format_table(result: dict, markdown: bool = False) -> str:
    from .bench import rate_table

    lat = [("concurrent requests", "new tokens each", "time to first token ms", "per-token latency ms")]
    for r in result["latency"]:
        lat.append((str(r["concurrent"]), str(r["new_tokens"]), f"{r['ttft_s'] * 1e3:.1f}",
                    f"{r['per_token_s'] * 1e3:.1f}"))
    t = result["turn2"]
    turn = [("case", "baseline", "baseline ms", "qkv ms", "ratio (target <= 0.2)", "check"),
            (t["case"], t["baseline"], f"{t['baseline_s'] * 1e3:.1f}", f"{t['qkv_s'] * 1e3:.1f}",
             f"{t['ratio']:.3f}", t["check"])]
    return "\n\n".join([rate_table(result, markdown), _render(lat, markdown), _render(turn, markdown)])


def main(argv=None) -> int:
    import argparse
    import json
    import sys

    p = argparse.ArgumentParser(prog="python -m qkv.cli.bench_generate", description=__doc__.splitlines()[0])
    p.add_argument("--quick", action="store_true")
    p.add_argument("--repeat", type=int, default=None)
    p.add_argument("--markdown", action="store_true")
    p.add_argument("--json", action="store_true")
    a = p.parse_args(argv)
    say = None if a.json else (lambda s: print(f"  {s} ...", file=sys.stderr, flush=True))
    result = run(quick=a.quick, repeat=a.repeat, progress=say)
    print(json.dumps(result, indent=2) if a.json else format_table(result, markdown=a.markdown))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
