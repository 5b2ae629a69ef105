"""How a family's ``config.json`` is read: every field is in the family's table (see `_tables`) as

- `Read`: implemented: read, type- and range-checked, mapped onto the qkv config;
- `Only`: accepted only at the listed values (what qkv computes); any other value is refused by name;
- `IGNORED`: harmless for the computation (metadata, training-only settings, generation settings);
- `Alias`: another name transformers accepts for a field (its ``attribute_map``).

A field that is not in the table is refused by name: qkv cannot know that an unknown field leaves the
numbers unchanged, and a loader that guesses gives wrong numbers silently.
"""

from __future__ import annotations

import math
import numbers
from collections.abc import Mapping
from dataclasses import dataclass

from .._keymap import ConversionError

REQUIRED = object()
MAX_INT = 2**31 - 1  # larger counts overflow torch's index arithmetic; the model's budget refuses far less


@dataclass(frozen=True)
class Read:
    """An implemented field. ``kind``: int, float, positive (float > 0), bool, str, token (id >= 0), tokens
    (id or list of ids), ids (list of ids), size (int or [h, w]), floats, strings (lists), labels (id2label),
    dict (checked by the family's builder)."""

    kind: str
    default: object = REQUIRED  # REQUIRED: the file must state it
    lo: float | None = None
    hi: float | None = None
    choices: tuple = ()
    null: bool = False  # JSON null is accepted and read as None


@dataclass(frozen=True)
class Only:
    """Accepted only at ``values`` (absent is fine too); ``fix`` says what to do instead."""

    values: tuple
    fix: str


@dataclass(frozen=True)
class Alias:
    name: str


IGNORED = "ignored"


def count(default=REQUIRED, lo: int = 1, null: bool = False) -> Read:
    return Read("int", default, lo=lo, hi=MAX_INT, null=null)


def positive(default) -> Read:
    """A finite number > 0 (norm epsilons, rotary bases)."""
    return Read("positive", default)


def fraction(default) -> Read:
    """A probability (dropout): in [0, 1]."""
    return Read("float", default, lo=0.0, hi=1.0)


def flag(default: bool) -> Read:
    return Read("bool", default)


def token(default=None) -> Read:
    return Read("token", default, null=True)


def _short(value) -> str:
    text = repr(value)
    return text if len(text) <= 60 else text[:57] + "..."


class Fields:
    """The checked values of one ``config.json``: ``f["hidden_size"]``; `refuse` for builder-side checks."""

    def __init__(self, values: dict, family: str, source: str):
        self.values, self.family, self.source = values, family, source

    def __getitem__(self, name: str):
        return self.values[name]

    def refuse(self, name: str, fix: str) -> ConversionError:
        return ConversionError(f"{self.source} field {name}={_short(self.values.get(name))} is not implemented by "
                               f"qkv's {self.family} loader; {fix}")


class _Bad(Exception):
    """Raised by a kind's checker with what the value must be."""


def _is_int(v) -> bool:
    return isinstance(v, numbers.Integral) and not isinstance(v, bool)


def _is_real(v) -> bool:
    return isinstance(v, numbers.Real) and not isinstance(v, bool) and math.isfinite(v)


def _int(rule: Read, value, lo=None):
    lo = (0 if rule.lo is None else rule.lo) if lo is None else lo
    hi = MAX_INT if rule.hi is None else rule.hi
    if not _is_int(value):
        raise _Bad("an integer")
    if not lo <= value <= hi:
        raise _Bad(f"an integer in [{lo}, {hi}]")
    return int(value)


def _float(rule: Read, value):
    if not _is_real(value):
        raise _Bad("a finite number")
    if rule.kind == "positive" and not value > 0:
        raise _Bad("a number > 0")
    if (rule.lo is not None and value < rule.lo) or (rule.hi is not None and value > rule.hi):
        raise _Bad(f"a number in [{rule.lo}, {rule.hi}]")
    return float(value)


def _each(value, ok, want: str, single: bool = False, sizes: tuple[int, int] = (0, MAX_INT)):
    """A list whose items pass ``ok`` (``single``: or one such item), of a length in ``sizes``."""
    items = value if isinstance(value, list) else [value] if single else None
    if items is None or not sizes[0] <= len(items) <= sizes[1] or not all(ok(v) for v in items):
        raise _Bad(want)
    return list(value) if isinstance(value, list) else value


def _labels(rule: Read, value):
    """id2label: {"0": name, "1": name, ...} -> [name, name, ...]."""
    if not isinstance(value, Mapping) or not all(isinstance(v, str) for v in value.values()):
        raise _Bad('an object of class id -> name, e.g. {"0": "negative", "1": "positive"}')
    try:
        ids = sorted(int(k) for k in value)
    except ValueError:
        raise _Bad("an object whose keys are class ids 0, 1, ...") from None
    if ids != list(range(len(ids))):
        raise _Bad(f"an object with the class ids 0..{len(ids) - 1}, each once")
    return [value[k] for k in sorted(value, key=int)]


def _choice(rule: Read, value):
    if not isinstance(value, str) or (rule.choices and value not in rule.choices):
        raise _Bad(f"one of {list(rule.choices)}" if rule.choices else "a string")
    return value


def _bool(rule: Read, value):
    if not isinstance(value, bool):
        raise _Bad("true or false")
    return value


def _dict(rule: Read, value):
    if not isinstance(value, Mapping):
        raise _Bad("an object ({...})")
    return dict(value)


def _token(v) -> bool:
    return _is_int(v) and 0 <= v <= MAX_INT


_KINDS = {
    "int": _int, "token": lambda r, v: _int(r, v, lo=0), "float": _float, "positive": _float, "str": _choice,
    "bool": _bool, "dict": _dict, "labels": _labels,
    "tokens": lambda r, v: _each(v, _token, "a token id (an integer >= 0) or a list of them", single=True),
    "ids": lambda r, v: _each(v, _token, "a list of token ids (integers >= 0)"),
    "size": lambda r, v: _each(v, lambda x: _is_int(x) and 1 <= x <= MAX_INT,
                               "a positive integer or a list [height, width] of them", single=True, sizes=(1, 2)),
    "floats": lambda r, v: [float(x) for x in _each(v, _is_real, "a non-empty list of finite numbers",
                                                     sizes=(1, MAX_INT))],
    "strings": lambda r, v: _each(v, lambda x: isinstance(x, str), "a list of strings"),
}


def _check(rule: Read, name: str, value, where: str):
    """``value`` as ``rule`` wants it; ConversionError names the field otherwise."""
    if value is None and rule.null:
        return None
    try:
        if value is None:
            raise _Bad("set (not null); remove the field for the default" if rule.default is not REQUIRED
                       else "set")
        return _KINDS[rule.kind](rule, value)
    except _Bad as e:
        raise ConversionError(f"{where} field {name}={_short(value)} is invalid: it must be {e}") from None


def read_fields(cfg, table: Mapping[str, object], family: str, source: str = "config.json",
                strict: bool = True) -> Fields:
    """Check every field of ``cfg`` against ``table``; returns the `Read` values with defaults filled in.
    ``strict=False`` (side files such as preprocessor_config.json) skips fields the table does not name."""
    if not isinstance(cfg, Mapping):
        raise ConversionError(f"{source}: expected a JSON object ({{...}}), found a {type(cfg).__name__}")
    given = dict(cfg)
    for name, value in list(given.items()):
        rule = table.get(name)
        if isinstance(rule, Alias):
            del given[name]
            if rule.name in given and given[rule.name] != value:
                raise ConversionError(f"{source}: fields {name}={_short(value)} and {rule.name}="
                                      f"{_short(given[rule.name])} name the same setting with different values; "
                                      "keep one")
            given[rule.name] = value
    values = {}
    for name, value in given.items():
        rule = table.get(name)
        if rule is None and not strict:
            continue
        if rule is None:
            raise ConversionError(f"{source} field {name}={_short(value)} is not implemented by qkv's {family} "
                                  "loader; qkv does not know whether it changes the computation: remove it if it "
                                  "does not, or load the model with transformers")
        if isinstance(rule, Only):
            if not any(value == v and type(value) is type(v) for v in rule.values):
                raise ConversionError(f"{source} field {name}={_short(value)} is not implemented by qkv's {family} "
                                      f"loader (qkv computes {name}={rule.values[0]!r}); {rule.fix}")
        elif isinstance(rule, Read):
            values[name] = _check(rule, name, value, source)
    for name, rule in table.items():
        if isinstance(rule, Read) and name not in values:
            if rule.default is REQUIRED:
                raise ConversionError(f"{source} has no field {name!r}, which qkv's {family} loader needs; the file "
                                      "may be damaged or from another model type: fetch or save it again")
            values[name] = rule.default
    return Fields(values, family, source)
