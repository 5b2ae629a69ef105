"""The backend registry: a name, a function, and what it supports.

A backend is ``fn(q, k, v, *, mask, score_mod, bias, scale, q_offset,
dropout_p, return_weights, return_lse) -> (out, weights | None, lse | None)``.
It receives validated, normalised arguments: ``mask`` is a `qkv.masks.Mask`
or None (already bound to the call), ``bias`` is 4-D or None, ``scale`` a
float, ``q_offset`` an int. It is only called for what its capabilities say
it supports. Registered with ``takes_call=True`` it receives the validated
`Call` itself instead, with the call's query positions and tile plan, computed
once and shared by every pass over the call (the built-in backends do this).
"""

from __future__ import annotations

from collections.abc import Callable
import weakref
from dataclasses import dataclass, field, fields, replace
from functools import cached_property

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
    rows: torch.Tensor | None = None  # weights of selected rows only: their indices (q holds just those rows)

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
        return {f.name: getattr(self, f.name) for f in fields(self) if f.name not in ("q", "k", "v", "rows")}

    def replace(self, **changes) -> Call:
        return replace(self, **changes)

    @cached_property
    def q_pos(self) -> torch.Tensor:
        """Absolute positions of the query rows, (Tq,) int64 on q's device."""
        if self.rows is not None:
            return self.rows + self.q_offset
        return torch.arange(self.q.shape[2], device=self.q.device) + self.q_offset

    @cached_property
    def plan(self):
        """The tile plan of the call's mask (`qkv.backends.chunked.plan`), built once per call and kept
        across calls for cacheable masks (keyed weakly on the mask object)."""
        from .chunked.plan import plan_for

        B, Hq, Hkv, Tq, Tk, D, Dv = self.shape
        key = ("rows", self.q_offset, Tq) if self.rows is None else None  # selected rows: not worth keeping
        return plan_for(self.mask, self.q_pos, Tk, B, Hq, cache=plan_cache(self.mask), cache_key=key)

    @cached_property
    def intervals(self) -> tuple[torch.Tensor, torch.Tensor] | None:
        """Per-row visible key bounds ``(lo, hi)`` (B', Tq) of the mask (all keys without one), or None."""
        if self.mask is None:
            lo = torch.zeros(1, self.q.shape[2], dtype=torch.int64, device=self.q.device)
            return lo, lo + self.k.shape[2] - 1
        return self.mask.intervals(self.q_pos)

    @cached_property
    def interval_sets(self) -> tuple[torch.Tensor, torch.Tensor] | None:
        """Per-row visible keys as unions of intervals ``(lo, hi)`` (B', H', Tq, R) (`Mask.interval_sets`), or None."""
        if self.intervals is not None:
            lo, hi = self.intervals
            return lo[:, None, :, None], hi[:, None, :, None]
        return self.mask.interval_sets(self.q_pos)


_PLANS: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()  # mask -> {key: plan}, for cacheable masks


def plan_cache(mask) -> dict | None:
    """The plan cache of ``mask`` (None for masks whose answers may change between calls)."""
    if mask is None or not mask.cacheable:
        return None
    try:
        return _PLANS.setdefault(mask, {})
    except TypeError:  # a mask type that cannot be weakly referenced: no caching
        return None


@dataclass
class Backend:
    name: str
    fn: Callable
    declared: Capabilities
    check: Callable[[Call], str | None] | None = field(default=None, repr=False)
    takes_call: bool = False
    probe: Callable[[], tuple[bool, str]] | None = field(default=None, repr=False)  # availability, asked once

    @property
    def caps(self) -> Capabilities:
        """The declared capabilities, with availability settled on first use (`probe`, e.g. a kernel build)."""
        if self.probe is not None:
            ok, why = self.probe()
            self.declared, self.probe = replace(self.declared, available=ok, reason=why), None
        return self.declared

    def run(self, call: Call):
        """``(out, weights | None, lse | None)`` for a validated call."""
        if self.takes_call:
            return self.fn(call)
        return self.fn(call.q, call.k, call.v, **call.kwargs())

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


def register(name: str, fn: Callable, *, check: Callable[[Call], str | None] | None = None,
             takes_call: bool = False, **capabilities) -> None:
    """Add (or replace) a backend. ``capabilities`` are fields of `Capabilities`,
    with or without a ``supports_`` prefix: ``register("mine", fn, supports_weights=True)``.

    ``check(call) -> str | None`` may refuse calls the flags cannot describe,
    returning the reason. ``takes_call``: ``fn(call)`` receives the validated `Call`.
    ``available`` may be a function ``() -> (bool, reason)``, asked on first use.
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
    probe = capabilities.pop("available") if callable(capabilities.get("available")) else None
    caps = Capabilities(**capabilities)
    _REGISTRY[name] = Backend(name, fn, caps, check, takes_call, probe)


def unregister(name: str) -> None:
    """Remove a backend added with `register` (unknown names raise, listing the known ones)."""
    get(name)
    del _REGISTRY[name]


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
