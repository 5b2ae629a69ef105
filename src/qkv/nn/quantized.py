"""int8 linear layers for CPU inference: `Int8Linear` and `quantize` (what ``model.quantize("int8")`` runs).

A weight matrix is stored as int8 with one float32 scale per output row (symmetric, ``scale =
max|w_row| / 127``): a quarter of the memory, and the matrix-vector products of decoding, which read
every weight once per token, read a quarter of the bytes. Two ways to multiply:

- ``activations="dynamic"`` (default): each call also quantizes its input to int8, one symmetric scale
  per row (per token), and multiplies int8 x int8 with int32 accumulation (``torch._int_mm``, oneDNN's
  VNNI kernels on x86). A row's result does not depend on the other rows of the batch, and a token
  with large activations does not coarsen its neighbours' (a scale per call would: MiniLM embeddings
  cosine to float32, min over 400 sentences, 0.989 with one scale per call, 0.996 per row). The
  fastest: 2.5-4x float32 on this project's CPU. A single row (a decoding step) goes through FBGEMM's
  fused quantize-and-multiply (``torch.ops.quantized.linear_dynamic``: one asymmetric uint8 scale for
  the row), about 2.5x faster than the three steps at that size.
- ``activations="none"``: weight-only. The input stays in float and the int8 rows are widened inside
  the kernel (``torch._weight_int8pack_mm``, for inputs of a few rows, i.e. decoding) or the matrix is
  widened once per call (otherwise). Closer to float32 (half the error), but only fast for
  bfloat16/float16 inputs (``model.to(torch.bfloat16).quantize("int8", activations="none")``): PyTorch's
  float32 kernel for it is slower than a float32 matrix product.

Where neither kernel applies (another device, float64, autograd), the layer does the same arithmetic
in the input's dtype (rounded inputs times the dequantized matrix): the same numbers up to summation
order, only slower. A quantized layer is for inference: its int8 matrix has no gradient (the input
does, straight through the rounding).
"""

from __future__ import annotations

import warnings

import torch
import torch.nn.functional as F
from torch import nn

from .linear import fast_linear

ACTIVATIONS = ("dynamic", "none")
_PACK_ROWS = 16  # weight-only: half-precision inputs with at most this many rows (float32: 1) take _weight_int8pack_mm


def quantize_rows(weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(out, in) float weights -> int8 weights and float32 scales per row, symmetric: ``w ~ q * scale``."""
    w = weight.detach().float()
    scale = w.abs().amax(dim=1).clamp_min(1e-12) / 127.0
    q = torch.round(w / scale[:, None]).clamp_(-127, 127).to(torch.int8)
    return q.contiguous(), scale.contiguous()


def _row_scales(x: torch.Tensor) -> torch.Tensor:
    """Symmetric int8 scales of each row of ``x`` (one per vector along the last dim), shape (..., 1)."""
    return x.abs().amax(dim=-1, keepdim=True).clamp_min(1e-12).div_(127.0)


class Int8Linear(nn.Module):
    """A linear layer with int8 weights and per-row scales (see the module docstring).

    ``weight`` (a property) is the dequantized matrix, so code that reads a layer's weight keeps
    working; the stored tensors are the buffers ``qweight`` (int8) and ``scale`` (float32).
    """

    def __init__(self, in_features: int, out_features: int, bias: bool = True, *, activations: str = "dynamic"):
        super().__init__()
        if activations not in ACTIVATIONS:
            raise ValueError(f"Int8Linear: activations={activations!r}; use one of {ACTIVATIONS}")
        self.in_features, self.out_features, self.activations = in_features, out_features, activations
        self.register_buffer("qweight", torch.zeros(out_features, in_features, dtype=torch.int8))
        self.register_buffer("scale", torch.ones(out_features))
        self.register_buffer("bias", torch.zeros(out_features) if bias else None)
        self._packed = None  # FBGEMM's copy for one-row inputs (`_fbgemm`); False: not available

    @classmethod
    def from_linear(cls, linear: nn.Linear, *, activations: str = "dynamic") -> Int8Linear:
        w = linear.weight
        layer = cls(linear.in_features, linear.out_features, linear.bias is not None, activations=activations)
        q, s = quantize_rows(w)
        layer.qweight, layer.scale = q.to(w.device), s.to(w.device)
        if linear.bias is not None:
            layer.bias = linear.bias.detach().float().clone()
        return layer

    @property
    def weight(self) -> torch.Tensor:
        """The dequantized (out, in) float32 matrix."""
        return self.qweight.float() * self.scale[:, None]

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, "
                f"bias={self.bias is not None}, activations={self.activations!r}")

    def _apply(self, fn, recurse=True):
        # module.to(dtype) casts floating buffers: the scales and bias stay float32 (a bfloat16 scale would
        # lose 3 of its 8 significant bits); the input's dtype decides the output's in forward.
        scale, bias = self.scale, self.bias
        super()._apply(fn, recurse)
        dev = self.qweight.device
        self.scale = scale.to(dev, torch.float32)
        self.bias = None if bias is None else bias.to(dev, torch.float32)
        self._packed = None
        return self

    def _fbgemm(self):
        """FBGEMM's prepacked copy of the int8 matrix (None where this torch has no FBGEMM), built on first
        use; `_apply` (``.to``) drops it."""
        if self._packed is False:
            return None
        if self._packed is None:
            try:
                with warnings.catch_warnings():  # quantized tensors are deprecated; the packed op still runs
                    warnings.simplefilter("ignore")
                    zero = torch.zeros(self.out_features, dtype=torch.long)
                    q = torch._make_per_channel_quantized_tensor(self.qweight, self.scale.double(), zero, 0)
                    self._packed = torch.ops.quantized.linear_prepack(q, self.bias)
            except (RuntimeError, AttributeError, NotImplementedError):
                self._packed = False
                return None
        return self._packed

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.shape[-1] != self.in_features:
            raise ValueError(f"Int8Linear: the input has {x.shape[-1]} features; this layer takes {self.in_features}")
        fast = (x.device.type == "cpu" and x.numel() > 0 and x.dtype in (torch.float32, torch.bfloat16, torch.float16)
                and not (torch.is_grad_enabled() and x.requires_grad)
                and (self.activations == "none" or self.in_features > 1))  # torch._int_mm is wrong at K = 1
        if not fast:  # the same arithmetic in x's dtype; the rounding passes gradients straight through
            if self.activations == "dynamic":
                s = _row_scales(x.detach())
                x = x + (torch.round(x.detach() / s) * s - x.detach())
            return F.linear(x, self.weight.to(x.dtype), None if self.bias is None else self.bias.to(x.dtype))
        x2 = x.reshape(-1, self.in_features)
        if self.activations == "dynamic" and x2.shape[0] == 1 and x.dtype == torch.float32:
            packed = self._fbgemm()  # one row (a decoding step): FBGEMM's fused quantize-multiply, ~2.5x faster
            if packed is not None:
                return torch.ops.quantized.linear_dynamic(x2.contiguous(), packed, False).view(
                    *x.shape[:-1], self.out_features)
        if self.activations == "dynamic":
            xf = x2.float()
            s = _row_scales(xf)  # (rows, 1)
            q = torch.div(xf, s).round_().to(torch.int8)  # |x / s| <= 127 by construction
            y = torch._int_mm(q, self.qweight.t()).float().mul_(s).mul_(self.scale)  # int32 (rows, out)
            if self.bias is not None:
                y.add_(self.bias)
            y = y.to(x.dtype)
        elif x2.shape[0] <= (_PACK_ROWS if x.dtype != torch.float32 else 1):
            y = torch._weight_int8pack_mm(x2.contiguous(), self.qweight, self.scale.to(x.dtype))
            if self.bias is not None:
                y = y + self.bias.to(x.dtype)
        else:
            y = fast_linear(x2, self.weight.to(x.dtype), None if self.bias is None else self.bias.to(x.dtype))
        return y.view(*x.shape[:-1], self.out_features)


def quantize(model: nn.Module, mode: str = "int8", *, activations: str = "dynamic",
             skip: tuple[str, ...] = ()) -> nn.Module:
    """Replace every `torch.nn.Linear` of ``model`` (qkv's `Linear` included) by an `Int8Linear`, in place.

    ``mode``: "int8" (the one so far). ``activations``: "dynamic" or "none" (the module docstring).
    ``skip``: module names (as ``named_modules`` gives them) to keep in float, e.g. ``("lm_head",)``.
    A weight tied to an embedding (GPT-2's output layer) gets its own int8 copy; the embedding stays float.
    Returns ``model``.
    """
    if mode != "int8":
        raise ValueError(f"quantize: mode={mode!r} is not supported; use 'int8' (or model.to(torch.bfloat16) "
                         "for bfloat16)")
    if activations not in ACTIVATIONS:
        raise ValueError(f"quantize: activations={activations!r}; use one of {ACTIVATIONS}")
    names = {n for n, _ in model.named_modules()}
    unknown = [s for s in skip if s not in names]
    if unknown:
        raise ValueError(f"quantize: skip names {unknown} are not modules of this model "
                         "(see model.named_modules())")
    targets = [(n, m) for n, m in model.named_modules()
               if isinstance(m, nn.Linear) and n not in skip and not any(n.startswith(s + ".") for s in skip)]
    if not targets:
        raise ValueError(f"quantize: {type(model).__name__} has no linear layers left to quantize")
    for name, m in targets:
        parent_name, _, attr = name.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        setattr(parent, attr, Int8Linear.from_linear(m, activations=activations))
    return model
