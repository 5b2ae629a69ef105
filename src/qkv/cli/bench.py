"""`qkv bench attention`: qkv against the baselines users would otherwise call, measured in one process.

Every speed row is a ratio measured in the same run, with baseline and qkv
calls interleaved (this machine is shared and noisy): ``speedup = baseline
time / qkv time``, so > 1 means qkv is faster. Peak memory is measured in a
fresh child process per (case, implementation), as the peak resident set size.
"""

from __future__ import annotations

import json
import os
import resource
import statistics
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass

import torch
import torch.nn.functional as F

import qkv
from qkv.backends.flex import compiled_flex_attention

H, D = 8, 64  # the targets' configuration: fp32, B=1, H=8, D=64


@dataclass(frozen=True)
class Case:
    name: str
    T: int
    mask: str  # key into MASKS
    baseline: str  # "sdpa" (dense/causal), "sdpa-mask" (same mask as a dense bool tensor), "flex", "none"
    backward: bool
    quick: bool = False
    weights_topk: int = 0  # >0: time qkv.attention_weights(topk=...) instead of attention


def _window(left):
    return qkv.masks.sliding_window(left), lambda b, h, q, k: (q >= k) & (q - k <= left)


def _documents(T, n_docs=16):
    ids = torch.arange(T) * n_docs // T  # equal-length packed documents
    return qkv.masks.document(ids) & qkv.masks.causal(), lambda b, h, q, k: (ids[q] == ids[k]) & (q >= k)


def _longformer(T, left=128, n_global=4):
    g = torch.zeros(T, dtype=torch.bool)
    g[:n_global] = True
    m = qkv.masks.sliding_window(left, left) | qkv.masks.global_tokens(list(range(n_global)))
    return m, lambda b, h, q, k: ((q - k).abs() <= left) | g[q] | g[k]


def _block_sparse(T, bs=128, seed=0):
    n = T // bs
    gen = torch.Generator().manual_seed(seed)
    layout = (torch.rand(n, n, generator=gen) < 0.1) | torch.eye(n, dtype=torch.bool)
    layout &= torch.ones(n, n, dtype=torch.bool).tril()
    return qkv.masks.block_sparse(layout, bs), lambda b, h, q, k: layout[q // bs, k // bs]


MASKS: dict[str, Callable[[int], tuple]] = {
    "none": lambda T: (None, None),
    "causal": lambda T: (qkv.masks.causal(), lambda b, h, q, k: q >= k),
    "window255": lambda T: _window(255),
    "window511": lambda T: _window(511),
    "documents16": _documents,
    "longformer128+4": _longformer,
    "block_sparse10%": _block_sparse,
}

CASES = [
    *[Case(f"dense T={T} {'fwd+bwd' if bw else 'fwd'}", T, "none", "sdpa", bw, quick=T <= 2048)
      for T in (1024, 2048, 4096, 8192) for bw in (False, True)],
    *[Case(f"causal T={T} {'fwd+bwd' if bw else 'fwd'}", T, "causal", "sdpa", bw, quick=T <= 2048)
      for T in (1024, 2048, 4096, 8192) for bw in (False, True)],
    Case("sliding_window(255) T=4096 fwd+bwd", 4096, "window255", "sdpa-mask", True, quick=True),
    Case("sliding_window(255) T=16384 fwd+bwd", 16384, "window255", "sdpa-mask", True),
    Case("sliding_window(255) T=16384 fwd", 16384, "window255", "flex", False),
    Case("documents(16) & causal T=16384 fwd", 16384, "documents16", "flex", False),
    Case("documents(16) & causal T=16384 fwd+bwd", 16384, "documents16", "sdpa-mask", True),
    Case("longformer(128, 4 global) T=16384 fwd", 16384, "longformer128+4", "flex", False),
    Case("longformer(128, 4 global) T=8192 fwd+bwd", 8192, "longformer128+4", "sdpa-mask", True, quick=True),
    Case("block_sparse(10%, 128) T=16384 fwd", 16384, "block_sparse10%", "flex", False),
    Case("block_sparse(10%, 128) T=8192 fwd+bwd", 8192, "block_sparse10%", "sdpa-mask", True),
]

MEMORY_CASES = [
    Case("sliding_window(511) T=65536 fwd+bwd", 65536, "window511", "none", True),
    Case("sliding_window(255) T=16384 fwd+bwd", 16384, "window255", "sdpa-mask", True),
    Case("attention_weights(topk=8) causal T=16384", 16384, "causal", "none", False, weights_topk=8),
    Case("attention_weights(topk=8) causal T=4096", 4096, "causal", "none", False, quick=True, weights_topk=8),
    Case("sliding_window(255) T=16384 fwd+bwd", 16384, "window255", "none", True, quick=True),
]


def _inputs(case: Case, grad: bool):
    g = torch.Generator().manual_seed(0)
    return [torch.randn(1, H, case.T, D, generator=g).requires_grad_(grad) for _ in range(3)]


def make_fn(case: Case, impl: str) -> Callable[[], object]:
    """A no-argument function running `case` with `impl` ("qkv" or the baseline)."""
    grad = case.backward
    q, k, v = _inputs(case, grad)
    mask, mask_mod = MASKS[case.mask](case.T)
    go = torch.randn(1, H, case.T, D) if grad else None

    def run(f):
        if not grad:
            def fwd():
                with torch.no_grad():
                    return f()
            return fwd

        def fwd_bwd():
            out = f()
            out.backward(go)
            for t in (q, k, v):
                t.grad = None
        return fwd_bwd

    if impl == "qkv":
        if case.weights_topk:
            return lambda: qkv.attention_weights(q, k, mask=mask, topk=case.weights_topk)
        return run(lambda: qkv.attention(q, k, v, mask=mask))
    if case.baseline == "sdpa":
        causal = case.mask == "causal"
        return run(lambda: F.scaled_dot_product_attention(q, k, v, is_causal=causal))
    if case.baseline == "sdpa-mask":
        dense = mask.materialize(case.T, case.T)[0, 0].contiguous()
        return run(lambda: F.scaled_dot_product_attention(q, k, v, attn_mask=dense))
    if case.baseline == "flex":
        from torch.nn.attention.flex_attention import create_block_mask

        block_mask = create_block_mask(mask_mod, None, None, case.T, case.T, device="cpu")
        kernel = compiled_flex_attention()
        return run(lambda: kernel(q, k, v, block_mask=block_mask))
    raise ValueError(f"case {case.name!r} has no baseline")


def interleaved(fq: Callable, fb: Callable, repeat: int) -> tuple[float, float]:
    """Median seconds of ``fq`` and ``fb`` run alternately (order swapped every round), so load drift hits both."""
    tq, tb = [], []
    for i in range(repeat):
        for f, acc in ((fb, tb), (fq, tq)) if i % 2 == 0 else ((fq, tq), (fb, tb)):
            t0 = time.perf_counter()
            f()
            acc.append(time.perf_counter() - t0)
    return statistics.median(tq), statistics.median(tb)


def time_pair(case: Case, repeat: int) -> dict:
    """Median seconds of baseline and qkv, interleaved; compile/warm-up runs excluded."""
    fq, fb = make_fn(case, "qkv"), make_fn(case, "baseline")
    fb(), fq()  # warm-up (compiles FlexAttention)
    mq, mb = interleaved(fq, fb, repeat)
    return {"case": case.name, "baseline": case.baseline, "qkv_s": mq, "baseline_s": mb, "speedup": mb / mq}


def peak_rss_mb(case: Case, impl: str) -> float:
    """Peak resident set size of a fresh process that builds the inputs and runs `case` once with `impl`."""
    cmd = [sys.executable, "-m", "qkv.cli.bench", "--child", json.dumps(asdict(case)), impl]
    env = dict(os.environ, OMP_NUM_THREADS=str(torch.get_num_threads()))
    res = subprocess.run(cmd, capture_output=True, text=True, env=env, check=False)
    if res.returncode != 0:
        raise RuntimeError(f"memory probe for {case.name} ({impl}) failed:\n{res.stderr[-2000:]}")
    return json.loads(res.stdout.strip().splitlines()[-1])["peak_rss_mb"]


def _child(case_json: str, impl: str) -> None:
    case = Case(**json.loads(case_json))
    make_fn(case, impl)()
    print(json.dumps({"peak_rss_mb": _peak_rss_kb() / 1024}))


def _peak_rss_kb() -> float:
    """High-water resident set of this process image (VmHWM; ru_maxrss would include the forking parent's)."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return float(line.split()[1])
    except OSError:
        pass
    return float(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss)  # kilobytes on Linux, bytes on macOS


def run(quick: bool = False, repeat: int | None = None, memory: bool = True, only: str | None = None,
        progress: Callable[[str], None] | None = None) -> dict:
    """Run the suite; returns {"speed": [...], "memory": [...], "env": {...}}."""
    repeat = repeat or (3 if quick else 5)
    say = progress or (lambda s: None)
    speed, mem = [], []
    for case in CASES:
        if (quick and not case.quick) or (only and only not in case.name):
            continue
        if case.baseline == "flex" and not qkv.backends.available()["flex"].available:
            continue
        say(f"timing {case.name} vs {case.baseline}")
        speed.append(time_pair(case, repeat if case.T <= 8192 or not case.backward else max(3, repeat - 2)))
    for case in MEMORY_CASES if memory else ():
        if (quick and not case.quick) or (only and only not in case.name):
            continue
        say(f"peak memory {case.name}")
        row = {"case": case.name, "qkv_mb": peak_rss_mb(case, "qkv"), "baseline": case.baseline}
        if case.baseline != "none":
            row["baseline_mb"] = peak_rss_mb(case, "baseline")
        mem.append(row)
    env = {"torch": torch.__version__, "threads": torch.get_num_threads(), "qkv": qkv.__version__,
           "cpu": _cpu_name(), "quick": quick, "repeat": repeat}
    return {"speed": speed, "memory": mem, "env": env}


def _cpu_name() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return "unknown"


def format_table(result: dict, markdown: bool = False) -> str:
    """Render a result as aligned text (or a Markdown table)."""
    rows = [("case", "baseline", "baseline ms", "qkv ms", "speedup")]
    for r in result["speed"]:
        base = {"sdpa": "SDPA", "sdpa-mask": "SDPA + bool mask", "flex": "FlexAttention (compiled)"}[r["baseline"]]
        rows.append((r["case"], base, f"{r['baseline_s'] * 1e3:.1f}", f"{r['qkv_s'] * 1e3:.1f}", f"{r['speedup']:.2f}x"))
    mem = [("case", "qkv peak RSS MB", "baseline peak RSS MB")]
    for r in result["memory"]:
        mem.append((r["case"], f"{r['qkv_mb']:.0f}", f"{r['baseline_mb']:.0f}" if "baseline_mb" in r else "-"))
    return _render(rows, markdown) + "\n\n" + _render(mem, markdown)


def rate_table(result: dict, markdown: bool = False, digits: int = 1) -> str:
    """Rows of throughput against a baseline library (the text and media suites)."""
    rows = [("case", "baseline", "baseline", "qkv", "speedup", "check")]
    for r in result["speed"]:
        rows.append((r["case"], r["baseline"], f"{r['baseline_per_s']:.{digits}f} {r['unit']}",
                     f"{r['qkv_per_s']:.{digits}f} {r['unit']}", f"{r['speedup']:.2f}x", r["check"]))
    return _render(rows, markdown)


def _render(rows, markdown):
    if markdown:
        out = ["| " + " | ".join(rows[0]) + " |", "|" + "|".join("---" for _ in rows[0]) + "|"]
        out += ["| " + " | ".join(r) + " |" for r in rows[1:]]
        return "\n".join(out)
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    return "\n".join("  ".join(c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in enumerate(zip(r, widths)))
                     for r in rows)


if __name__ == "__main__" and len(sys.argv) == 4 and sys.argv[1] == "--child":
    _child(sys.argv[2], sys.argv[3])
