"""`KeyMap`: build a target state dict from a source one with explicit key maps and strict accounting."""

from __future__ import annotations

import difflib
import re
from collections.abc import Mapping, Sequence

import torch


class ConversionError(ValueError):
    """A checkpoint does not match what the converter expects: names the keys involved."""


class KeyMap:
    """Every source key must be used (or explicitly ignored); every lookup must exist.

    >>> km = KeyMap({"a.weight": w})
    >>> km.copy("b.weight", "a.weight")
    >>> km.result()   # raises ConversionError if a source key was left over
    """

    def __init__(self, source: Mapping[str, torch.Tensor], prefix: str = ""):
        self.source = source
        self.prefix = prefix
        self.used: set[str] = set()
        self.ignored: list[re.Pattern] = []
        self.out: dict[str, torch.Tensor] = {}

    def key(self, name: str) -> str:
        return self.prefix + name

    def has(self, name: str) -> bool:
        return self.key(name) in self.source

    def get(self, name: str) -> torch.Tensor:
        key = self.key(name)
        if key not in self.source:
            close = difflib.get_close_matches(key, list(self.source), n=3)
            raise ConversionError(f"checkpoint has no key {key!r}" + (f"; close: {close}" if close else ""))
        self.used.add(key)
        return self.source[key]

    def put(self, target: str, value: torch.Tensor) -> None:
        if target in self.out:
            raise ConversionError(f"target key {target!r} written twice")
        self.out[target] = value

    def copy(self, target: str, name: str, transpose: bool = False) -> None:
        t = self.get(name)
        self.put(target, t.t().contiguous() if transpose else t)

    def cat(self, target: str, names: Sequence[str], dim: int = 0, transpose: bool = False) -> None:
        parts = [self.get(n) for n in names]
        if transpose:
            parts = [p.t() for p in parts]
        self.put(target, torch.cat(parts, dim=dim).contiguous())

    def copy_optional(self, target: str, name: str, transpose: bool = False) -> bool:
        if not self.has(name):
            return False
        self.copy(target, name, transpose)
        return True

    def ignore(self, *patterns: str) -> None:
        """Source keys matching these regular expressions may go unused (buffers, tied duplicates)."""
        self.ignored += [re.compile(p) for p in patterns]

    def result(self) -> dict[str, torch.Tensor]:
        left = sorted(k for k in self.source if k not in self.used and not any(p.fullmatch(k) for p in self.ignored))
        if left:
            more = f" (+{len(left) - 10} more)" if len(left) > 10 else ""
            raise ConversionError(f"checkpoint keys not used by the conversion: {left[:10]}{more}")
        return self.out


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
