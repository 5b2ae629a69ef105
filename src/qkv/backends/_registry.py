"""The backend registry: a name, a function, and what it supports.

A backend is ``fn(q, k, v, *, mask, score_mod, bias, scale, q_offset,
dropout_p, return_weights, return_lse) -> (out, weights | None, lse | None)``.
It receives validated, normalised arguments: ``mask`` is a `qkv.masks.Mask`
or None (already bound to the call), ``bias`` is 4-D or None, ``scale`` a
float, ``q_offset`` an int. It is only called for what its capabilities say
it supports.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field, fields, replace

import torch

ALL_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


@dataclass(frozen=True)
class Capabilities:
    """What a backend can do. Booleans default to the conservative answer."""

    masks: bool = True  # accepts any qkv.masks.Mask
    score_mod: bool = False
    bias: bool = False
    dropout: bool = False
    weights: bool = False  # can return the attention probabilities
    lse: bool = False  # can return the log-sum-exp
    backward: bool = False  # differentiable in q, k, v, bias
    gqa: bool = True  # Hq a multiple of Hkv
    head_dims_differ: bool = True  # D != Dv
    dtypes: tuple[torch.dtype, ...] = ALL_DTYPES
    devices: tuple[str, ...] | None = None  # device types served; None: any
    available: bool = True  # usable with this torch build
    reason: str = ""  # why not, when unavailable
    notes: str = ""


@dataclass(frozen=True)
class Call:
    """One validated attention call."""

    q: torch.Tensor
    k: torch.Tensor
    v: torch.Tensor
    mask: object = None
    score_mod: Callable | None = None
    bias: torch.Tensor | None = None
    scale: float = 1.0
    q_offset: int = 0
    dropout_p: float = 0.0
    return_weights: bool = False
    return_lse: bool = False

    @property
    def shape(self) -> tuple[int, int, int, int, int, int, int]:
        """(B, Hq, Hkv, Tq, Tk, D, Dv)."""
        B, Hq, Tq, D = self.q.shape
        return B, Hq, self.k.shape[1], Tq, self.k.shape[2], D, self.v.shape[-1]

    @property
    def needs_grad(self) -> bool:
        ts = (self.q, self.k, self.v, self.bias)
        return torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in ts)

    def kwargs(self) -> dict:
        return {f.name: getattr(self, f.name) for f in fields(self) if f.name not in ("q", "k", "v")}

    def replace(self, **changes) -> Call:
        return replace(self, **changes)


@dataclass
class Backend:
    name: str
    fn: Callable
    caps: Capabilities
    check: Callable[[Call], str | None] | None = field(default=None, repr=False)

    def missing(self, call: Call) -> list[str]:
        """What this backend lacks for `call`; empty when it can serve it."""
        c = self.caps
        if not c.available:
            return [f"availability ({c.reason})"]
        B, Hq, Hkv, Tq, Tk, D, Dv = call.shape
        wants = [
            (call.mask is not None and not c.masks, "masks"),
            (call.score_mod is not None and not c.score_mod, "score_mod"),
            (call.bias is not None and not c.bias, "bias"),
            (call.dropout_p > 0 and not c.dropout, "dropout_p > 0"),
            (call.return_weights and not c.weights, "return_weights=True"),
            (call.return_lse and not c.lse, "return_lse=True"),
            (call.needs_grad and not c.backward, "backward (inputs require grad)"),
            (Hq != Hkv and not c.gqa, "grouped-query heads"),
            (D != Dv and not c.head_dims_differ, "D != Dv"),
            (call.q.dtype not in c.dtypes, f"dtype {call.q.dtype}"),
            (c.devices is not None and call.q.device.type not in c.devices, f"device {call.q.device.type}"),
        ]
        out = [what for bad, what in wants if bad]
        if not out and self.check is not None:
            extra = self.check(call)
            if extra:
                out.append(extra)
        return out


_REGISTRY: dict[str, Backend] = {}


def register(name: str, fn: Callable, *, check: Callable[[Call], str | None] | None = None, **capabilities) -> None:
    """Add (or replace) a backend. ``capabilities`` are fields of `Capabilities`,
    with or without a ``supports_`` prefix: ``register("mine", fn, supports_weights=True)``.

    ``check(call) -> str | None`` may refuse calls the flags cannot describe,
    returning the reason.
    """
    if not isinstance(name, str) or not name or name == "auto":
        raise ValueError(f"backend name must be a non-empty string other than 'auto', got {name!r}")
    if not callable(fn):
        raise TypeError(f"backend {name!r}: fn must be callable, got {type(fn).__name__}")
    capabilities = {k.removeprefix("supports_"): v for k, v in capabilities.items()}
    known = {f.name for f in fields(Capabilities)}
    unknown = sorted(set(capabilities) - known)
    if unknown:
        raise TypeError(f"backend {name!r}: unknown capabilities {unknown}; known: {sorted(known)}")
    caps = Capabilities(**capabilities)
    _REGISTRY[name] = Backend(name, fn, caps, check)


def get(name: str) -> Backend:
    try:
        return _REGISTRY[name]
    except KeyError:
        raise ValueError(
            f"unknown backend {name!r}; choose one of {['auto', *sorted(_REGISTRY)]} "
            "(qkv.backends.available() lists what each supports)"
        ) from None


def available() -> dict[str, Capabilities]:
    """Every registered backend with its capabilities (``available=False`` and a reason when unusable here)."""
    return {name: b.caps for name, b in sorted(_REGISTRY.items())}


def names() -> list[str]:
    return sorted(_REGISTRY)
