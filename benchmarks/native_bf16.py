"""qkv's native CPU kernel in bfloat16 against its own float32 path (issue 15: >= 1.6x at T = 4096..16384).

Run: ``.venv/bin/python benchmarks/native_bf16.py`` (2 threads; B=1, 8 heads, D=64; forward; the two
dtypes interleaved, median of 5 rounds; error of the bfloat16 output against float64 on the same
bfloat16 inputs, and of float32 on its inputs, as max |difference|).
"""

from __future__ import annotations

import statistics
import time

import torch

import qkv
from qkv.backends import native

CASES = [(4096, "causal"), (4096, "window 1024"), (4096, "full"), (8192, "causal"), (8192, "full"),
         (16384, "causal"), (16384, "window 1024")]


def mask_of(name: str):
    return {"causal": qkv.masks.causal(), "full": None, "window 1024": qkv.masks.sliding_window(1024)}[name]


def main(rounds: int = 5) -> None:
    torch.set_num_threads(2)
    assert torch.bfloat16 in native.dtypes(), f"no bfloat16 kernel here: {native.status()}"
    print("| T | mask | float32 s | bfloat16 s | speedup | max abs error bf16 (fp32) vs float64 |")
    print("|---|---|---|---|---|---|")
    g = torch.Generator().manual_seed(0)
    for T, name in CASES:
        mask = mask_of(name)
        q, k, v = (torch.randn(1, 8, T, 64, generator=g) for _ in range(3))
        qb, kb, vb = (x.bfloat16() for x in (q, k, v))

        def fp32(q=q, k=k, v=v, mask=mask):
            return qkv.attention(q, k, v, mask=mask, backend="native")

        def bf16(q=qb, k=kb, v=vb, mask=mask):
            return qkv.attention(q, k, v, mask=mask, backend="native")

        times = {fp32: [], bf16: []}
        for fn in times:
            fn()
        for _ in range(rounds):
            for fn in times:
                t0 = time.perf_counter()
                fn()
                times[fn].append(time.perf_counter() - t0)
        a, b = statistics.median(times[fp32]), statistics.median(times[bf16])
        err = "-"
        if T <= 4096:
            ref = qkv.attention(qb.double(), kb.double(), vb.double(), mask=mask, backend="chunked")
            ref32 = qkv.attention(q.double(), k.double(), v.double(), mask=mask, backend="chunked")
            err = f"{(bf16().double() - ref).abs().max():.1e} ({(fp32().double() - ref32).abs().max():.1e})"
        print(f"| {T} | {name} | {a:.3f} | {b:.3f} | {a / b:.2f}x | {err} |")


if __name__ == "__main__":
    main()
