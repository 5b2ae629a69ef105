"""qkv's native backward against the path it replaces: the native forward with the `chunked` backend's
backward (issue 15: sliding window fwd+bwd >= 1.3x that time).

Run: ``.venv/bin/python benchmarks/native_backward.py`` (2 threads; B=1, 8 heads, D=64, float32; forward and
backward of ``qkv.attention``; the two paths interleaved, median of 5 rounds; the largest relative
difference of their gradients). The replaced path is rebuilt here as it was: `interval_attention`
forward, then `chunked`'s tile backward from the saved output and log-sum-exp.
"""

from __future__ import annotations

import statistics
import time

import torch

import qkv
from qkv.backends import native
from qkv.backends.chunked import run_for


class _ChunkedBackward(torch.autograd.Function):
    """The native forward with chunked's backward (qkv before its native backward)."""

    @staticmethod
    def forward(ctx, q, k, v, call):
        out, lse = native.interval_attention(q, k, v, *call.interval_sets, call.scale)
        ctx.save_for_backward(q, k, v, out, lse)
        ctx.call = call
        return out

    @staticmethod
    def backward(ctx, dout):
        q, k, v, out, lse = ctx.saved_tensors
        raw = lse.masked_fill(torch.isneginf(lse), 0.0)
        dq, dk, dv, _ = run_for(ctx.call).backward(dout, None, q, k, v, None, out, raw, (True, True, True, False))
        return dq, dk, dv, None


def _longformer(T):
    return qkv.masks.sliding_window(128, 128) | qkv.masks.global_tokens([0, 1, 2, 3])


def _block_sparse(T, bs=128):
    n = T // bs
    layout = (torch.rand(n, n, generator=torch.Generator().manual_seed(0)) < 0.1) | torch.eye(n, dtype=torch.bool)
    return qkv.masks.block_sparse(layout & torch.ones(n, n, dtype=torch.bool).tril(), bs)


CASES = [
    ("sliding_window(255)", 16384, lambda T: qkv.masks.sliding_window(255)),
    ("sliding_window(255)", 4096, lambda T: qkv.masks.sliding_window(255)),
    ("causal", 4096, lambda T: qkv.masks.causal() & qkv.masks.padding([T])),  # & padding: not SDPA's is_causal
    ("documents(16) & causal", 16384, lambda T: qkv.masks.document(torch.arange(T) * 16 // T) & qkv.masks.causal()),
    ("longformer(128, 4 global)", 8192, _longformer),
    ("block_sparse(10%, 128)", 8192, _block_sparse),
]


def main(rounds: int = 5) -> None:
    torch.set_num_threads(2)
    assert native.available(), native.status()
    print("| mask | T | native fwd + chunked bwd ms | native fwd + bwd ms | speedup | max rel. grad diff |")
    print("|---|---|---|---|---|---|")
    g = torch.Generator().manual_seed(0)
    for name, T, make in CASES:
        mask = make(T)
        q, k, v = (torch.randn(1, 8, T, 64, generator=g).requires_grad_() for _ in range(3))
        go = torch.randn(1, 8, T, 64, generator=g)
        call = qkv.functional.prepare(q, k, v, mask=mask)

        def before(q=q, k=k, v=v, call=call, go=go):
            _ChunkedBackward.apply(q, k, v, call).backward(go)

        def after(q=q, k=k, v=v, mask=mask, go=go):
            qkv.attention(q, k, v, mask=mask, backend="native").backward(go)

        grads = {}
        for fn in (before, after):
            fn()
            grads[fn] = [t.grad.clone() for t in (q, k, v)]
            for t in (q, k, v):
                t.grad = None
        times = {before: [], after: []}
        for _ in range(rounds):
            for fn in times:
                t0 = time.perf_counter()
                fn()
                times[fn].append(time.perf_counter() - t0)
                for t in (q, k, v):
                    t.grad = None
        a, b = statistics.median(times[before]) * 1e3, statistics.median(times[after]) * 1e3
        diff = max(float((x - y).abs().max() / y.abs().max()) for x, y in zip(grads[after], grads[before]))
        print(f"| {name} | {T} | {a:.1f} | {b:.1f} | {a / b:.2f}x | {diff:.1e} |", flush=True)


if __name__ == "__main__":
    main()
