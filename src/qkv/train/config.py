"""Training configuration: TOML (via tomllib) into dataclasses, with ``--set key=value`` overrides.

Unknown keys, wrong types and impossible values are refused with the field's
full name, what was given and what is allowed.
"""

from __future__ import annotations

import dataclasses
import difflib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, get_args, get_origin, get_type_hints

try:
    import tomllib
except ModuleNotFoundError:  # Python 3.10
    import tomli as tomllib

TASKS = ("lm", "classify", "seq2seq", "image", "audio", "signal", "listops", "mqar")


class ConfigError(ValueError):
    """A configuration problem, naming the field (e.g. ``train.lr``)."""


@dataclass
class DataConfig:
    dataset: str | None = None  # built-in: shakespeare, fortunes, digits, mnist1d, spoken-words, listops, mqar
    path: str | None = None  # the user's data: a text file, CSV/JSONL, or a folder of class folders
    tokenizer: str = "char"  # text: "char", "bpe" or "wordpiece" (trained on the training split)
    vocab_size: int = 2048  # bpe / wordpiece
    block_size: int = 256  # lm: tokens per training window
    max_length: int = 256  # classify / seq2seq: tokens per text
    val_fraction: float = 0.1
    test_fraction: float = 0.1
    options: dict = field(default_factory=dict)  # dataset-specific (e.g. listops lengths, mqar pairs)


@dataclass
class OptimConfig:
    steps: int = 1000
    batch_size: int = 32
    lr: float = 1e-3
    min_lr: float | None = None  # cosine floor; default lr / 10
    warmup: int = 100
    weight_decay: float = 0.1
    betas: tuple[float, float] = (0.9, 0.99)
    grad_clip: float = 1.0  # 0: off
    accumulate: int = 1  # micro-batches per optimizer step
    bf16: bool = False  # autocast matrix products to bfloat16
    eval_every: int = 250
    eval_batches: int = 20  # batches per evaluation (0: the whole split)
    save_every: int = 500
    log_every: int = 10
    early_stop: int = 0  # stop after this many evaluations without improvement (0: never)
    label_smoothing: float = 0.0


@dataclass
class TrainConfig:
    task: str = "lm"
    out: str = "runs/qkv"
    seed: int = 0
    data: DataConfig = field(default_factory=DataConfig)
    model: dict = field(default_factory=dict)  # fields of the task's model config
    train: OptimConfig = field(default_factory=OptimConfig)

    def validate(self) -> TrainConfig:
        if self.task not in TASKS:
            raise ConfigError(f"task: {self.task!r} is not one of {TASKS}")
        t = self.train
        for name in ("steps", "batch_size", "accumulate", "eval_every", "save_every", "log_every"):
            if getattr(t, name) < 1:
                raise ConfigError(f"train.{name}: must be >= 1, got {getattr(t, name)}")
        if not t.lr > 0:
            raise ConfigError(f"train.lr: must be > 0, got {t.lr}")
        if t.warmup < 0 or t.eval_batches < 0 or t.early_stop < 0:
            raise ConfigError("train.warmup, train.eval_batches and train.early_stop must be >= 0")
        if not 0 <= self.data.val_fraction < 1 or not 0 <= self.data.test_fraction < 1:
            raise ConfigError("data.val_fraction and data.test_fraction must be in [0, 1)")
        if self.data.dataset is None and self.data.path is None:
            raise ConfigError("data: give data.dataset (a built-in set) or data.path (your files)")
        if self.data.tokenizer not in ("char", "bpe", "wordpiece"):
            raise ConfigError(f"data.tokenizer: {self.data.tokenizer!r} is not one of char, bpe, wordpiece")
        return self

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


def _convert(value: Any, hint, where: str):
    """Check ``value`` against a type hint (int, float, str, bool, tuples, Optional) and coerce ints to floats."""
    origin = get_origin(hint)
    args = get_args(hint)
    if origin is tuple:
        if not isinstance(value, (list, tuple)) or len(value) != len(args):
            raise ConfigError(f"{where}: expected a list of {len(args)} numbers, got {value!r}")
        return tuple(_convert(v, a, where) for v, a in zip(value, args))
    if args and type(None) in args:  # X | None
        if value is None:
            return None
        inner = [a for a in args if a is not type(None)]
        return _convert(value, inner[0], where)
    if hint is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if hint is dict:
        if not isinstance(value, dict):
            raise ConfigError(f"{where}: expected a table, got {value!r}")
        return value
    if hint in (int, float, str, bool) and (not isinstance(value, hint) or (hint is int and isinstance(value, bool))):
        raise ConfigError(f"{where}: expected {hint.__name__}, got {type(value).__name__} {value!r}")
    return value


def _fill(cls, values: dict, where: str):
    hints = get_type_hints(cls)
    names = [f.name for f in dataclasses.fields(cls)]
    kwargs = {}
    for key, value in values.items():
        if key not in names:
            close = difflib.get_close_matches(key, names, n=1)
            hint = f" (did you mean {where}{close[0]}?)" if close else f"; known: {names}"
            raise ConfigError(f"{where}{key}: unknown key{hint}")
        sub = hints[key]
        if dataclasses.is_dataclass(sub):
            if not isinstance(value, dict):
                raise ConfigError(f"{where}{key}: expected a table, got {value!r}")
            kwargs[key] = _fill(sub, value, f"{where}{key}.")
        else:
            kwargs[key] = _convert(value, sub, f"{where}{key}")
    return cls(**kwargs)


def parse_override(text: str) -> tuple[list[str], Any]:
    """``"train.lr=3e-4"`` -> (["train", "lr"], 3e-4); the value is read as TOML (strings may be bare)."""
    if "=" not in text:
        raise ConfigError(f"--set {text!r}: expected key=value, e.g. --set train.lr=3e-4")
    key, raw = text.split("=", 1)
    try:
        value = tomllib.loads(f"v = {raw.strip()}")["v"]
    except tomllib.TOMLDecodeError:
        value = raw.strip()
    return key.strip().split("."), value


def load_config(path: str | Path | None = None, overrides: list[str] = (), base: dict | None = None) -> TrainConfig:
    """Read a TOML file (or start from ``base``), apply ``key=value`` overrides, validate."""
    raw: dict = dict(base or {})
    if path is not None:
        p = Path(path)
        if not p.exists():
            raise ConfigError(f"config file {str(p)!r} does not exist")
        try:
            raw = tomllib.loads(p.read_text())
        except tomllib.TOMLDecodeError as e:
            raise ConfigError(f"{p}: not valid TOML: {e}") from None
    for text in overrides:
        keys, value = parse_override(text)
        node = raw
        for k in keys[:-1]:
            node = node.setdefault(k, {})
            if not isinstance(node, dict):
                raise ConfigError(f"--set {text!r}: {k!r} is not a table")
        node[keys[-1]] = value
    return _fill(TrainConfig, raw, "").validate()
