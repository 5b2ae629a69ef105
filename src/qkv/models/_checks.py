"""Validation shared by the model configs: every field typed and range-checked, and a memory budget
checked from the config alone, before any tensor is allocated.

A config is the one place where a number from a file (``config.json``, a ``qkv train`` table) becomes
a tensor size, so a wrong type or an absurd size is refused here, by name, instead of surfacing as a
``TypeError`` deep inside ``torch`` or as an attempt to allocate terabytes.
"""

from __future__ import annotations

import functools
import math
import numbers
import os
import types
import typing
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import fields

from ..nn.feedforward import GATED

MAX_SIZE = 2**31 - 1  # any one width, length or count: beyond it torch's index arithmetic overflows
MAX_LAYERS = 4096  # deeper stacks are not models anyone trains; building them would take minutes
BYTES_PER_PARAMETER = 4  # models are built in float32


@functools.cache
def _hints(cls) -> dict[str, object]:
    return typing.get_type_hints(cls)


def _is_int(v) -> bool:
    return isinstance(v, numbers.Integral) and not isinstance(v, bool)


def _matches(value, hint) -> bool:
    origin = typing.get_origin(hint)
    if origin in (typing.Union, types.UnionType):
        return any(_matches(value, h) for h in typing.get_args(hint))
    if hint is type(None):
        return value is None
    if origin is list:
        (item,) = typing.get_args(hint)
        return isinstance(value, (list, tuple)) and all(_matches(v, item) for v in value)
    if hint is bool:
        return isinstance(value, bool)
    if hint is int:
        return _is_int(value)
    if hint is float:
        return isinstance(value, numbers.Real) and not isinstance(value, bool) and math.isfinite(value)
    if hint is str:
        return isinstance(value, str)
    return True


def _describe(hint) -> str:
    origin = typing.get_origin(hint)
    if origin in (typing.Union, types.UnionType):
        return " or ".join(_describe(h) for h in typing.get_args(hint))
    if hint is type(None):
        return "None"
    if origin is list:
        return f"a list of {_describe(typing.get_args(hint)[0])}s"
    return {bool: "true/false", int: "an integer", float: "a finite number", str: "a string"}.get(hint, str(hint))


def _short(value) -> str:
    text = repr(value)
    return text if len(text) <= 60 else text[:57] + "..."


def check_types(config) -> None:
    """Every field of the dataclass ``config`` holds a value of its annotated type (ints are not bools,
    floats are finite); TypeError names the field, the value and the type wanted."""
    hints = _hints(type(config))
    for f in fields(config):
        value = getattr(config, f.name)
        if not _matches(value, hints[f.name]):
            raise TypeError(f"{type(config).__name__}: {f.name}={_short(value)} must be {_describe(hints[f.name])}")


def _fail(config, name: str, value, want: str) -> ValueError:
    return ValueError(f"{type(config).__name__}: {name}={_short(value)} must be {want}")


def sizes(config, *names: str, lo: int = 1, hi: int = MAX_SIZE) -> None:
    """Integer fields (or lists of them; None is skipped) in ``[lo, hi]``."""
    for name in names:
        value = getattr(config, name)
        for v in value if isinstance(value, (list, tuple)) else [value]:
            if v is not None and not lo <= v <= hi:
                raise _fail(config, name, value, f"between {lo} and {hi}")


def layers(config, *names: str) -> None:
    sizes(config, *names, lo=1, hi=MAX_LAYERS)


def tokens(config, *names: str) -> None:
    """Token ids (an id, a list of ids, or None): non-negative integers."""
    sizes(config, *names, lo=0)


def fractions(config, *names: str) -> None:
    """Probabilities such as dropout: in [0, 1)."""
    for name in names:
        value = getattr(config, name)
        if not 0.0 <= value < 1.0:
            raise _fail(config, name, value, "in [0, 1)")


def positive(config, *names: str) -> None:
    """Finite numbers > 0 (norm epsilons, scales, rotary bases), or lists of them; None is skipped."""
    for name in names:
        value = getattr(config, name)
        for v in value if isinstance(value, (list, tuple)) else [value]:
            if v is not None and not v > 0:
                raise _fail(config, name, value, "a number > 0" if v is value else "a list of numbers > 0")


def choices(config, **allowed: Sequence) -> None:
    for name, options in allowed.items():
        if getattr(config, name) not in options:
            raise _fail(config, name, getattr(config, name), f"one of {list(options)}")


def heads(config, dim: int, n_heads: int, head_dim: int | None, n_kv_heads: int | None = None) -> None:
    """Head counts that split the width: dim % n_heads unless head_dim is given, n_heads % n_kv_heads."""
    name = type(config).__name__
    if n_kv_heads is not None and n_heads % n_kv_heads:
        raise ValueError(f"{name}: n_heads={n_heads} is not divisible by n_kv_heads={n_kv_heads}; "
                         f"choose a divisor of {n_heads}")
    if head_dim is None and dim % n_heads:
        raise ValueError(f"{name}: dim={dim} is not divisible by n_heads={n_heads}; choose a divisor or set head_dim")


def labels(config) -> None:
    if config.labels is not None and len(config.labels) != config.num_labels:
        raise ValueError(f"{type(config).__name__}: labels has {len(config.labels)} names but "
                         f"num_labels={config.num_labels}; give one name per class")


def block_parameters(dim: int, n_heads: int, head_dim: int, n_kv_heads: int, ffn_dim: int, activation: str,
                     cross: bool = False) -> int:
    """Parameters of one transformer block (biases and norms included approximately)."""
    gated = activation in GATED
    attn = dim * n_heads * head_dim * 2 + dim * n_kv_heads * head_dim * 2 + 4 * dim
    ffn = dim * ffn_dim * (3 if gated else 2) + ffn_dim * 2 + dim
    return attn * (2 if cross else 1) + ffn + 6 * dim


def budget_bytes() -> tuple[int, str]:
    """(bytes, where the number comes from): ``QKV_MAX_MODEL_BYTES`` if set, else the machine's memory."""
    env = os.environ.get("QKV_MAX_MODEL_BYTES")
    if env is not None:
        try:
            value = int(float(env)) if env.strip().lower() not in ("inf", "infinity") else 2**63
        except ValueError:
            raise ValueError(f"QKV_MAX_MODEL_BYTES={env!r} must be a number of bytes, e.g. 8e9") from None
        if value <= 0:
            raise ValueError(f"QKV_MAX_MODEL_BYTES={env!r} must be a positive number of bytes")
        return value, "QKV_MAX_MODEL_BYTES"
    try:
        return os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE"), "this machine's memory"
    except (ValueError, OSError, AttributeError):  # not a POSIX system: no budget but the sizes' own limits
        return 2**63, "no limit known"


def _bytes(n: int) -> str:
    for unit, size in (("PiB", 2**50), ("TiB", 2**40), ("GiB", 2**30), ("MiB", 2**20), ("KiB", 2**10)):
        if n >= size:
            return f"{n / size:,.1f} {unit}"
    return f"{n} bytes"


def budget(config, parameters: int, drivers: Iterable[str]) -> None:
    """Refuse (ValueError naming the fields that drive the size) a model whose parameters, in float32,
    would not fit in the budget: the machine's memory, or ``QKV_MAX_MODEL_BYTES``."""
    need = parameters * BYTES_PER_PARAMETER
    limit, source = budget_bytes()
    if need > limit:
        said = ", ".join(f"{n}={getattr(config, n)}" for n in drivers)
        raise ValueError(f"{type(config).__name__}: {said} give about {parameters:.3g} parameters, "
                         f"{_bytes(need)} in float32, more than the {_bytes(limit)} budget ({source}); choose "
                         "smaller sizes, or set QKV_MAX_MODEL_BYTES to allow more")


def known_fields(cls, values: Mapping, where: str) -> None:
    """``values`` name only fields of the dataclass ``cls`` (ValueError names the first unknown one)."""
    names = {f.name for f in fields(cls)}
    unknown = sorted(set(values) - names)
    if unknown:
        raise ValueError(f"{where}: {unknown[0]!r} is not a field of {cls.__name__}; known: {sorted(names)}")
