"""Linear layers on CPU: F.linear (BLAS) vs oneDNN vs the split matrix-vector path of `qkv.nn.Linear`.

Times, in one process, the projections of the shapes the text models use:
single-token decoding steps (GPT-2's 48 layer matrices in sequence, its output
head) and prefill / encoder products. Ratios are against F.linear.

    python benchmarks/linear.py
"""

import time

import torch
import torch.nn.functional as F

from qkv.nn.linear import _split_matvec, fast_linear


def median_ms(f, n=15):
    f()
    ts = []
    for _ in range(n):
        t = time.perf_counter()
        f()
        ts.append(time.perf_counter() - t)
    return sorted(ts)[n // 2] * 1e3


def main():
    torch.manual_seed(0)
    rows = [("case", "F.linear ms", "oneDNN ms", "split ms", "best vs F.linear")]
    shapes = [(768, 2304), (768, 768), (768, 3072), (3072, 768)] * 12
    ws = [torch.randn(o, i) for i, o in shapes]
    bs = [torch.randn(o) for i, o in shapes]
    xs = {768: torch.randn(1, 768), 3072: torch.randn(1, 3072)}

    def layers(f):
        return lambda: [f(xs[i], w, b) for (i, o), w, b in zip(shapes, ws, bs)]

    cases = [("GPT-2 48 layer matrices, 1 token", layers(F.linear), layers(fast_linear), layers(_split_matvec))]
    head, x1 = torch.randn(50257, 768), torch.randn(1, 768)
    cases.append(("GPT-2 output head 50257x768, 1 token", lambda: F.linear(x1, head), lambda: fast_linear(x1, head, None),
                  lambda: _split_matvec(x1, head, None)))
    for m, k, n in [(1600, 384, 1152), (1600, 1536, 384), (2048, 768, 2304), (8192, 768, 3072)]:
        x, w, b = torch.randn(m, k), torch.randn(n, k), torch.randn(n)
        cases.append((f"({m}, {k}) x ({k}, {n})", lambda x=x, w=w, b=b: F.linear(x, w, b),
                       lambda x=x, w=w, b=b: fast_linear(x, w, b), None))
    for name, base, onednn, split in cases:
        tb, to = median_ms(base), median_ms(onednn)
        ts = median_ms(split) if split else float("nan")
        best = min(to, ts) if split else to
        rows.append((name, f"{tb:.2f}", f"{to:.2f}", f"{ts:.2f}" if split else "-", f"{tb / best:.2f}x"))
    print("| " + " | ".join(rows[0]) + " |\n|" + "---|" * len(rows[0]))
    for r in rows[1:]:
        print("| " + " | ".join(r) + " |")


if __name__ == "__main__":
    main()
