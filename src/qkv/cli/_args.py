"""Argument types that check ranges, a parser that reports instead of exiting, and how errors reach users.

Every numeric option is parsed by `integer` or `number`, so ``--batch-size -1``
or ``--temperature nan`` stop at the command line with a message that names the
option, the value and the range. Errors become one line on stderr, or with
``--json`` one JSON object on stdout (``{"error": {...}}``), and exit status 2;
``QKV_DEBUG=1`` shows the traceback of an unexpected one.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from pathlib import Path


class UsageError(ValueError):
    """A command line the parser refused (unknown option, missing value, out-of-range number)."""


class Parser(argparse.ArgumentParser):
    """An ArgumentParser whose errors are raised (and so can be reported as JSON) instead of exiting."""

    def error(self, message):
        e = UsageError(f"{message} (see `{self.prog} --help`)")
        e.usage = self.format_usage()
        raise e


def integer(low: int | None = None, high: int | None = None):
    """An argparse type: an int within [low, high]."""

    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected an integer, got {text!r}") from None
        if (low is not None and value < low) or (high is not None and value > high):
            raise argparse.ArgumentTypeError(f"must be {_range(low, high)}, got {value}")
        return value

    parse.__name__ = "integer"
    return parse


def number(low: float | None = None, high: float | None = None, *, low_open: bool = False):
    """An argparse type: a finite float within [low, high] (``(low, high]`` with ``low_open``)."""

    def parse(text: str) -> float:
        try:
            value = float(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected a number, got {text!r}") from None
        too_low = low is not None and (value <= low if low_open else value < low)
        if not math.isfinite(value) or too_low or (high is not None and value > high):
            raise argparse.ArgumentTypeError(f"must be a finite number {_range(low, high, low_open)}, got {text}")
        return value

    parse.__name__ = "number"
    return parse


def _range(low, high, low_open: bool = False) -> str:
    if low is not None and high is not None:
        return f"in {'(' if low_open else '['}{low}, {high}]"
    if low is not None:
        return f"{'>' if low_open else '>='} {low}"
    return f"<= {high}"


def int_list(text: str) -> list[int]:
    """An argparse type: comma-separated integers (``0,2,-1``)."""
    try:
        return [int(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers such as 0,2,5, got {text!r}") from None


def input_file(path: str, flag: str) -> Path:
    """``path`` as a readable file, or an error that names ``flag`` and says what to give."""
    p = Path(path)
    if p.is_dir():
        raise ValueError(f"{flag} {path}: is a folder; give a file")
    if not p.exists():
        raise FileNotFoundError(f"{flag} {path}: no such file")
    return p


def output_file(path: str | None, flag: str, suffix: str) -> None:
    """Refuse an output path that cannot be written before any work is done."""
    if path is None:
        return
    p = Path(path)
    if p.is_dir():
        raise ValueError(f"{flag} {path}: is a folder; give a file name such as {p / ('page' + suffix)}")
    if not p.parent.is_dir():
        raise FileNotFoundError(f"{flag} {path}: the folder {p.parent} does not exist; create it first")


def report(command: str | None, error: BaseException, as_json: bool, message: str | None = None) -> int:
    """Tell the user what went wrong (one line, or JSON with ``--json``); returns the exit status."""
    message = message or str(error) or type(error).__name__
    if isinstance(error, KeyError):
        message = f"missing entry {error.args[0]!r}" if error.args else "missing entry"
    elif isinstance(error, UnicodeDecodeError):
        message = f"not UTF-8 text ({error.reason} at byte {error.start}); save the file as UTF-8"
    if as_json:
        body = {"error": {"command": command, "type": type(error).__name__, "message": message}}
        print(json.dumps(body))
    else:
        print(f"qkv{' ' + command if command else ''}: {message}", file=sys.stderr)
    return 2


DTYPES = {"float32": "float32", "bfloat16": "bfloat16", "float16": "float16"}


def add_precision(parser: argparse.ArgumentParser) -> None:
    """``--dtype`` and ``--quantize``, for every command that loads a model with ``--model``."""
    g = parser.add_argument_group("precision")
    g.add_argument("--dtype", choices=list(DTYPES), default=None,
                   help="load the weights in this dtype (default: as the checkpoint's loader gives them, float32); "
                        "bfloat16 is faster on CPUs with AVX-512 BF16 (MiniLM embeddings 1.6x, cosine >= 0.999)")
    g.add_argument("--quantize", choices=["int8", "int8-weights"], default=None,
                   help="int8 weights in every linear layer (model.quantize): int8 also quantizes each layer's "
                        "input per token (fastest); int8-weights keeps inputs in float (closer to float32)")


def load_model(args, name):
    """``qkv.load(name)`` with the command's ``--dtype`` and ``--quantize`` (`add_precision`)."""
    import torch

    import qkv

    dtype = getattr(args, "dtype", None)
    model = qkv.load(name, dtype=None if dtype is None else getattr(torch, DTYPES[dtype]))
    how = getattr(args, "quantize", None)
    if how is not None:
        model.quantize("int8", activations="none" if how == "int8-weights" else "dynamic")
    return model
