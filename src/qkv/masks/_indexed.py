"""Calling FlexAttention-style functions of ``(b, h, q_idx, kv_idx)`` on whole index grids.

qkv evaluates mask and score functions once per tile on broadcast index
tensors: ``b`` (B,1,1,1), ``h`` (1,H,1,1), ``q`` (1,1,Tq,1), ``k`` (1,1,1,Tk).
Functions written for that (``q_pos >= k_pos``) run as they are. FlexAttention
instead calls them under ``torch.vmap``, one scalar index at a time, and many
published ones rely on it: attention-gym's Flamingo mask indexes a table with
``interval[0]``, which on a broadcast grid picks a row of the grid, not the
first bound. `call_indexed` therefore checks a function once, on a small probe
of the real grid, against the ``vmap`` reading that FlexAttention uses; a
function that fails on broadcast grids or disagrees there is evaluated through
nested ``torch.vmap`` from then on (the same result as FlexAttention, at the
speed of vmap's batching rules). The decision is kept per function object.
"""

from __future__ import annotations

import weakref
from collections.abc import Callable

import torch

_BROADCAST, _VMAP = "broadcast", "vmap"
_STYLE: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()  # fn -> how it is evaluated


def _grid_form(args) -> bool:
    """True for index tensors shaped as qkv's broadcast grids (each varying along its own axis at most)."""
    if len(args) != 4 or not all(isinstance(a, torch.Tensor) and a.dim() == 4 for a in args):
        return False
    return all(all(s == 1 for j, s in enumerate(a.shape) if j != axis) for axis, a in enumerate(args))


def _vmapped(fn: Callable, lead: tuple, args: tuple) -> torch.Tensor:
    """``fn(*lead, b, h, q, k)`` through one ``torch.vmap`` per index axis: the (B', H', Tq', Tk') result."""
    mapped = [axis for axis in range(4) if args[axis].shape[axis] > 1]
    call = fn
    for axis in reversed(mapped):  # built inside out: the outermost vmap (b) slices first
        dims = [None] * (len(lead) + 4)
        dims[len(lead) + axis] = 0
        for j, t in enumerate(lead):  # lead tensors (the scores) lose the outer mapped axes before this one
            if t.shape[axis] > 1:
                dims[j] = axis - sum(1 for a in mapped if a < axis)
        call = torch.vmap(call, in_dims=tuple(dims))
    flat = [a.reshape(-1) if a.shape[i] > 1 else a.reshape(()) for i, a in enumerate(args)]
    out = call(*lead, *flat)
    if not isinstance(out, torch.Tensor):
        return out
    shape = [args[i].shape[i] if i in mapped else 1 for i in range(4)]
    return out.reshape(shape) if out.numel() == _numel(shape) else out


def _numel(shape) -> int:
    n = 1
    for s in shape:
        n *= s
    return n


def _probe(args: tuple, lead: tuple) -> tuple[tuple, tuple]:
    """A small sub-grid of the call's real indices (first, last and a middle entry of each axis)."""
    picks = []
    for axis, a in enumerate(args):
        n = a.shape[axis]
        idx = sorted({0, n // 2, n - 1}) if n > 1 else [0]
        picks.append(torch.tensor(idx, device=a.device))
    sub = tuple(a.index_select(axis, picks[axis]) if a.shape[axis] > 1 else a for axis, a in enumerate(args))
    small = []
    for t in lead:
        for axis in range(4):
            if t.shape[axis] > 1:
                t = t.index_select(axis, picks[axis])
        small.append(t)
    return sub, tuple(small)


def _remember(fn, style: str) -> None:
    try:
        _STYLE[fn] = style
    except TypeError:  # not weak-referenceable: decided again next time
        pass


def call_indexed(fn: Callable, *args, lead: tuple = ()) -> torch.Tensor:
    """``fn(*lead, b, h, q, k)`` on broadcast index grids, as FlexAttention's ``vmap`` would compute it.

    ``lead``: tensors passed before the indices (a score mod's scores, (B|1, H|1, Tq|1, Tk|1)).
    Arguments that are not qkv's 4-D index grids (scalars under an outer ``vmap``) go straight through.
    """
    if not _grid_form(args) or any(t.dim() != 4 for t in lead):
        return fn(*lead, *args)
    try:
        style = _STYLE.get(fn)
    except TypeError:
        style = None
    if style == _VMAP:
        return _vmapped(fn, lead, args)
    if style == _BROADCAST:
        return fn(*lead, *args)
    try:
        out = fn(*lead, *args)
        broadcast_error = None
    except Exception as e:  # noqa: BLE001 -- any failure here may just mean "written for scalars"
        out, broadcast_error = None, e
    if broadcast_error is None:
        sub, small = _probe(args, lead)
        try:
            want = _vmapped(fn, small, sub)
            got = fn(*small, *sub)
            agrees = isinstance(got, torch.Tensor) and isinstance(want, torch.Tensor) and \
                got.shape == torch.broadcast_shapes(got.shape, want.shape) == want.shape and \
                bool(torch.equal(got, want) if got.dtype == torch.bool else torch.allclose(got, want, equal_nan=True))
        except Exception:  # noqa: BLE001 -- vmap cannot run it (e.g. .item()): the broadcast reading stands
            agrees = True
        if agrees:
            _remember(fn, _BROADCAST)
            return out
    try:
        out = _vmapped(fn, lead, args)
    except Exception as e:  # noqa: BLE001
        cause = broadcast_error or e
        raise TypeError(
            f"{getattr(fn, '__name__', 'the function')}(b, h, q_idx, kv_idx) failed on qkv's broadcast index "
            f"tensors ({type(cause).__name__}: {cause}) and under torch.vmap over scalar indices "
            f"({type(e).__name__}: {e}); write it with tensor operations (torch.where instead of `if`, "
            "no .item())") from e
    _remember(fn, _VMAP)
    return out
