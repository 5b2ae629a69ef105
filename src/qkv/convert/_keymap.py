"""`KeyMap`: build a target state dict from a source one with explicit key maps and strict accounting.

Every converter ends the same way: ``km.result()``, one check that names the source keys the map
looked for and did not find AND the source keys it never used, so a renamed or foreign checkpoint
is described in one message instead of one key at a time.
"""

from __future__ import annotations

import difflib
import re
from collections.abc import Callable, Mapping, Sequence

import torch


class ConversionError(ValueError):
    """A checkpoint does not match what the converter expects: names the keys involved."""


class _Ledger:
    """What all scopes of one conversion share: keys used, ignored, looked for in vain, and the output."""

    def __init__(self):
        self.used: set[str] = set()
        self.ignored: list[re.Pattern] = []
        self.missing: list[str] = []
        self.out: dict[str, torch.Tensor] = {}


def find_prefix(sd: Mapping[str, torch.Tensor], probe: str, candidates: Sequence[str]) -> str:
    """The first of ``candidates`` under which ``probe`` is a key of ``sd`` (``"bert."``, ``"model."``, ...)."""
    for p in candidates:
        if p + probe in sd:
            return p
    raise ConversionError(f"checkpoint has no {probe!r} under any of the prefixes {tuple(candidates)}")


def _more(keys: list[str]) -> str:
    return f"{keys[:10]}" + (f" (+{len(keys) - 10} more)" if len(keys) > 10 else "")


class KeyMap:
    """Every source key must be used (or explicitly ignored); every key looked for must exist.

    >>> km = KeyMap({"a.weight": w})
    >>> km.copy("b.weight", "a.weight")
    >>> km.result()   # raises ConversionError naming missing and left-over source keys

    ``prefix`` is prepended to source names; `scope` and `within` give views that share the
    accounting (the task head outside ``bert.``, one layer of a stack). ``dtype`` casts every tensor read.
    """

    def __init__(self, source: Mapping[str, torch.Tensor], prefix: str = "", *, dtype: torch.dtype | None = None,
                 target_prefix: str = "", _ledger: _Ledger | None = None):
        self.source, self.prefix, self.target_prefix, self.dtype = source, prefix, target_prefix, dtype
        self._ledger = _ledger or _Ledger()

    # the shared accounting, readable as attributes
    used = property(lambda self: self._ledger.used)
    ignored = property(lambda self: self._ledger.ignored)
    out = property(lambda self: self._ledger.out)

    def scope(self, prefix: str) -> KeyMap:
        """The same conversion with source names under ``prefix`` instead (targets unchanged)."""
        return KeyMap(self.source, prefix, dtype=self.dtype, target_prefix=self.target_prefix, _ledger=self._ledger)

    def within(self, source: str, target: str) -> KeyMap:
        """The same conversion one level down: source names under ``prefix + source``, targets under
        ``target`` (one layer: ``km.within("h.3.", "stack.layers.3.")``)."""
        return KeyMap(self.source, self.prefix + source, dtype=self.dtype,
                      target_prefix=self.target_prefix + target, _ledger=self._ledger)

    def key(self, name: str) -> str:
        return self.prefix + name

    def has(self, name: str) -> bool:
        return self.key(name) in self.source

    def _close(self, key: str) -> str:
        close = difflib.get_close_matches(key, list(self.source), n=3)
        return f"; close: {close}" if close else ""

    def get(self, name: str) -> torch.Tensor:
        """The source tensor ``name`` (marked used); a missing one raises at once, with close names."""
        key = self.key(name)
        if key not in self.source:
            raise ConversionError(f"checkpoint has no key {key!r}" + self._close(key))
        return self._take(key)

    def _take(self, key: str) -> torch.Tensor:
        self._ledger.used.add(key)
        t = self.source[key]
        return t.to(self.dtype) if self.dtype is not None else t

    def _find(self, name: str) -> torch.Tensor | None:
        """Like `get`, but a missing key is only recorded (for `result`) and gives None."""
        key = self.key(name)
        if key not in self.source:
            self._ledger.missing.append(key)
            return None
        return self._take(key)

    def put(self, target: str, value: torch.Tensor | None) -> None:
        """Write ``value`` as ``target``; None (a part that was missing) writes nothing."""
        target = self.target_prefix + target
        if target in self._ledger.out:
            raise ConversionError(f"target key {target!r} written twice")
        if value is not None:
            self._ledger.out[target] = value

    def copy(self, target: str, name: str, transpose: bool = False,
             fn: Callable[[torch.Tensor], torch.Tensor] | None = None) -> None:
        """``target`` = source ``name`` (transposed, or passed through ``fn``, if asked)."""
        t = self._find(name)
        if t is not None:
            t = t.t().contiguous() if transpose else t
            t = fn(t) if fn is not None else t
        self.put(target, t)

    def cat(self, target: str, names: Sequence[str | None], dim: int = 0, transpose: bool = False) -> None:
        """``target`` = the source tensors ``names`` concatenated along ``dim`` (fused q/k/v, gate/up).
        A None name is a part the checkpoint does not store: zeros shaped like the other parts
        (Whisper's key projection has no bias)."""
        parts = [None if n is None else self._find(n) for n in names]
        present = [p for n, p in zip(names, parts) if n is not None]
        if any(p is None for p in present):
            return
        parts = [torch.zeros_like(present[0]) if n is None else p for n, p in zip(names, parts)]
        if transpose:
            parts = [p.t() for p in parts]
        self.put(target, torch.cat(parts, dim=dim).contiguous())

    def copy_optional(self, target: str, name: str, transpose: bool = False) -> bool:
        if not self.has(name):
            return False
        self.copy(target, name, transpose)
        return True

    def tie(self, target: str, to: str, duplicate: str | None = None) -> None:
        """``target`` shares the tensor already written as ``to`` (tied embeddings). ``duplicate``: a source
        name a checkpoint may still store for it (see `duplicate`)."""
        tied = self._ledger.out.get(self.target_prefix + to)
        if tied is None:  # ``to`` was missing: already reported by result()
            return
        self.put(target, tied)
        if duplicate is not None:
            self.duplicate(duplicate, to, "the config says the output projection is tied to the embeddings but "
                                          "the checkpoint stores another one; set tie_word_embeddings to false")

    def duplicate(self, name: str, of: str, why: str) -> None:
        """Source ``name``, if stored, is a copy of the tensor written as ``of`` (tied weights a checkpoint
        saved twice): it must hold the same values, or transformers would use them apart; ``why`` says
        what differs. Then it is left unused."""
        tensor = self._ledger.out.get(self.target_prefix + of)
        if tensor is None or not self.has(name):
            return
        stored = self.source[self.key(name)]
        if stored.shape != tensor.shape or not torch.equal(stored.to(tensor.dtype), tensor):
            raise ConversionError(f"checkpoint key {self.key(name)!r} differs from the weights qkv shares it with "
                                  f"({of!r}): {why}")
        self._ledger.used.add(self.key(name))

    def head(self, target: str, name: str, *, tied_to: str, tied: bool) -> None:
        """An output projection: the tensor ``tied_to`` when ``tied``, else its own source ``name``."""
        if tied:
            self.tie(target, tied_to, duplicate=name)
        else:
            self.copy(target, name)

    def ignore(self, *patterns: str) -> None:
        """Source keys matching these regular expressions (full keys) may go unused (buffers, tied duplicates)."""
        self._ledger.ignored += [re.compile(p) for p in patterns]

    def result(self) -> dict[str, torch.Tensor]:
        """The converted state dict; raises ConversionError naming the source keys looked for but missing
        and the source keys left unused, together."""
        led = self._ledger
        left = sorted(k for k in self.source if k not in led.used and not any(p.fullmatch(k) for p in led.ignored))
        problems = []
        if led.missing:
            problems.append(f"checkpoint has no keys {_more(led.missing)}" + self._close(led.missing[0]))
        if left:
            problems.append(f"checkpoint keys not used by the conversion: {_more(left)}")
        if problems:
            raise ConversionError("; ".join(problems))
        return dict(led.out)


def check_complete(target: Mapping[str, torch.Tensor], converted: Mapping[str, torch.Tensor]) -> None:
    """Raise ConversionError naming missing, unexpected and mis-shaped keys of ``converted``."""
    missing = sorted(set(target) - set(converted))
    extra = sorted(set(converted) - set(target))
    shapes = [f"{k}: checkpoint {tuple(converted[k].shape)} vs model {tuple(target[k].shape)}"
              for k in sorted(set(target) & set(converted)) if converted[k].shape != target[k].shape]
    problems = []
    if missing:
        problems.append(f"missing {missing[:10]}")
    if extra:
        problems.append(f"unexpected {extra[:10]}")
    if shapes:
        problems.append(f"shape mismatch {shapes[:10]}")
    if problems:
        raise ConversionError("converted state dict does not fit the model: " + "; ".join(problems))
