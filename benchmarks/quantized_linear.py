"""int8 linear layers (`qkv.nn.quantized.Int8Linear`) against float32 and bfloat16 `qkv.nn.Linear`, per shape.

Run: ``.venv/bin/python benchmarks/quantized_linear.py`` (median ms of 30 calls after 3 warm-ups, no
autograd; relative error of each int8 mode to float32). Shapes: GPT-2 decoding steps (one row), a
decoding batch of 16, and MiniLM / Whisper-encoder products.
"""

from __future__ import annotations

import statistics
import time

import torch

from qkv.nn import Linear
from qkv.nn.quantized import Int8Linear

SHAPES = [(1, 768, 2304), (1, 768, 3072), (1, 3072, 768), (1, 768, 50257), (16, 768, 3072), (512, 384, 1536),
          (1500, 384, 1536)]


def ms(fn, n: int = 30) -> float:
    for _ in range(3):
        fn()
    times = []
    for _ in range(n):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times) * 1e3


def main() -> None:
    torch.manual_seed(0)
    print("rows x in -> out: float32 | int8 dynamic | int8 weight-only (fp32 in) | (bf16 in) | bfloat16 ms;"
          " relative error dynamic, weight-only")
    for rows, k, n in SHAPES:
        lin = Linear(k, n).eval()
        x = torch.randn(rows, k)
        dyn = Int8Linear.from_linear(lin, activations="dynamic")
        wo = Int8Linear.from_linear(lin, activations="none")
        lin16 = Linear(k, n).eval().bfloat16()
        x16 = x.bfloat16()
        with torch.no_grad():
            ref = lin(x)
            t = [ms(lambda m=m, a=a: m(a)) for m, a in ((lin, x), (dyn, x), (wo, x), (wo, x16), (lin16, x16))]
            err = [((m(x) - ref).norm() / ref.norm()).item() for m in (dyn, wo)]
        print(f"{rows} x {k} -> {n}: " + " | ".join(f"{v:.3f}" for v in t) + f"; {err[0]:.4f}, {err[1]:.4f}")


if __name__ == "__main__":
    main()
