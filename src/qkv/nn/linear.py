"""`Linear`: `torch.nn.Linear` with a faster path for the few-row products of decoding.

One generated token per step makes every projection a matrix-vector product.
On CPU, `F.linear` runs that on one thread with a kernel far below memory
bandwidth; splitting the output rows into one block per thread and calling
`torch.bmm` runs the blocks in parallel. Measured on this project's 2-core
machine (`benchmarks/gemv.py`): GPT-2's 48 layer matrices 18.2 ms -> 7.4 ms,
its 50257 x 768 output head 8.8 ms -> 3.0 ms. Same weights, same layout, same
result up to float summation order.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

_MAX_ROWS = 8  # inputs with at most this many rows take the split path


class Linear(nn.Linear):
    """`nn.Linear` (same parameters and state dict) with a parallel matrix-vector path on CPU."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        rows = x.numel() // x.shape[-1] if x.shape[-1] else 0
        if rows == 0 or rows > _MAX_ROWS or x.device.type != "cpu" or (torch.is_grad_enabled() and self.weight.requires_grad):
            return F.linear(x, self.weight, self.bias)
        return _split_matvec(x, self.weight, self.bias)


def _split_matvec(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    out_features, in_features = weight.shape
    n = torch.get_num_threads()
    block = out_features // n
    if n < 2 or block < 64 or not weight.is_contiguous():
        return F.linear(x, weight, bias)
    xs = x.reshape(-1, in_features)
    head = torch.bmm(weight[: n * block].view(n, block, in_features), xs.t().expand(n, in_features, xs.shape[0]))
    y = head.permute(2, 0, 1).reshape(xs.shape[0], n * block).contiguous()  # (rows, n*block), row-major
    if n * block < out_features:
        y = torch.cat([y, xs @ weight[n * block :].t()], dim=1)
    if bias is not None:
        y = y + bias
    return y.view(*x.shape[:-1], out_features)
