"""Training configuration: TOML (via tomllib) into dataclasses, with ``--set key=value`` overrides.

Every field is checked when the config is loaded, from a file or from overrides: its type (an int
field refuses floats, strings and booleans; a float field refuses NaN and infinity) and its range
(``RULES`` below, one line per field). Unknown keys, wrong types and impossible values are refused
as `ConfigError` with the field's full name as written in TOML (``train.lr``), the value seen and
the fix.
"""

from __future__ import annotations

import dataclasses
import difflib
import math
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, get_args, get_origin, get_type_hints

try:
    import tomllib
except ModuleNotFoundError:  # Python 3.10
    import tomli as tomllib

TASKS = ("lm", "classify", "seq2seq", "image", "audio", "signal", "listops", "mqar", "chat", "detect", "segment",
         "caption")
TOKENIZERS = ("char", "bpe", "wordpiece")
MAX_LR = 10.0  # AdamW moves every weight by about lr per step: beyond 10 a run only diverges
MAX_COUNT = 2**31 - 1  # steps, batch sizes, intervals: beyond it torch's index arithmetic overflows
MAX_TOKENS = 2**20  # block_size, max_length, vocab_size: a million is already more than any model here uses


class ConfigError(ValueError):
    """A configuration problem, naming the field (e.g. ``train.lr``)."""


@dataclass
class DataConfig:
    dataset: str | None = None  # built-in: shakespeare, fortunes, digits, mnist1d, spoken-words, listops, mqar, scenes
    # the user's data: a text file, CSV/JSONL, a folder of class folders; detect: a COCO JSON file, segment:
    # a folder of images/ and masks/, caption: a JSONL file of image and caption
    path: str | None = None
    tokenizer: str = "char"  # text: "char", "bpe" or "wordpiece" (trained on the training split)
    vocab_size: int = 2048  # bpe / wordpiece
    block_size: int = 256  # lm: tokens per training window
    max_length: int = 256  # classify / seq2seq: tokens per text; chat: tokens per conversation
    chat_template: str | None = None  # chat: a Jinja template file, or a model/tokenizer folder (default ChatML)
    val_fraction: float = 0.1
    test_fraction: float = 0.1
    options: dict = field(default_factory=dict)  # dataset-specific (e.g. listops lengths, mqar pairs)


@dataclass
class OptimConfig:
    steps: int = 1000
    batch_size: int = 32
    lr: float = 1e-3
    min_lr: float | None = None  # cosine floor; default lr / 10
    warmup: int | None = None  # linear warmup steps; None: the first 100 steps, or all of them if fewer
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
    class_balance: float = 0.0  # segment: weight classes by (pixels / class pixels) ** this (0: plain, 0.5: sqrt)

    @property
    def warmup_steps(self) -> int:
        return min(100, self.steps) if self.warmup is None else self.warmup


@dataclass
class TrainConfig:
    task: str = "lm"
    out: str = "runs/qkv"
    seed: int = 0
    data: DataConfig = field(default_factory=DataConfig)
    model: dict = field(default_factory=dict)  # fields of the task's model config
    train: OptimConfig = field(default_factory=OptimConfig)

    def validate(self) -> TrainConfig:
        """Check every field's range and the fields against each other (types were checked on loading)."""
        _check_types(self)
        for name, (ok, rule) in RULES.items():
            table, _, key = name.rpartition(".")
            value = getattr(getattr(self, table) if table else self, key)
            if not ok(value, self):
                raise ConfigError(f"{name}: got {_short(value)}; {rule(self) if callable(rule) else rule}")
        if self.data.dataset is None and self.data.path is None:
            raise ConfigError("data: give data.dataset (a built-in set) or data.path (your files)")
        if Path(self.out).is_file():
            raise ConfigError(f"out: {self.out!r} is a file; give a folder for the run's outputs")
        _check_model_table(self.task, self.model)
        return self

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


def _count(lo: int, hi: int = MAX_COUNT):
    return lambda v, cfg: lo <= v <= hi


def _fraction(v, cfg) -> bool:
    return 0 <= v < 1


def _builtin(v, cfg) -> bool:
    from ..data import BUILTIN

    return v is None or v in BUILTIN


def _cuts_train_rows(cfg) -> bool:
    """Whether the training split is what val and test leave of one table (not for a token stream, a set
    that ships its own test split, or MQAR's fresh training sequences)."""
    fresh = cfg.task == "mqar" and cfg.data.options.get("fresh", True)
    return not (cfg.task == "lm" or fresh or cfg.data.dataset in ("mnist1d", "spoken-words", "scenes"))


def _lr(cfg) -> float:
    return cfg.train.lr


def _test_fraction(v, cfg) -> bool:
    return _fraction(v, cfg) and (not _cuts_train_rows(cfg) or v + cfg.data.val_fraction < 1)


_Test = typing.Callable[[Any, "TrainConfig"], bool]
_Text = str | typing.Callable[["TrainConfig"], str]

# Each field: (test(value, config) -> ok, what is allowed and how to fix it; a function of the config
# where the limit comes from another field). Types, NaN and infinity are refused before these run, so
# every test sees a value of the field's type.
RULES: dict[str, tuple[_Test, _Text]] = {
    "task": (lambda v, cfg: v in TASKS, f"must be one of {', '.join(TASKS)}"),
    "out": (lambda v, cfg: bool(v.strip()), 'must name a folder for the run\'s outputs, e.g. out = "runs/mine"'),
    "seed": (lambda v, cfg: 0 <= v < 2**63, "must be an integer in [0, 2**63), e.g. seed = 0"),
    "data.dataset": (_builtin, ("must be a built-in set (shakespeare, fortunes, digits, mnist1d, spoken-words, "
                                "listops, mqar, reverse, scenes), or leave it out and give data.path")),
    "data.path": (lambda v, cfg: v is None or bool(v.strip()), "must name a file or folder of your data"),
    "data.tokenizer": (lambda v, cfg: v in TOKENIZERS, f"must be one of {', '.join(TOKENIZERS)}"),
    "data.vocab_size": (_count(8, MAX_TOKENS), f"must be in [8, {MAX_TOKENS}]; 2048 to 32000 suits most text"),
    "data.chat_template": (lambda v, cfg: v is None or bool(v.strip()),
                           "must name a Jinja chat template file or a model/tokenizer folder holding one"),
    "data.block_size": (_count(1, MAX_TOKENS), f"must be in [1, {MAX_TOKENS}] tokens per window, e.g. 256"),
    "data.max_length": (_count(2, MAX_TOKENS), (f"must be in [2, {MAX_TOKENS}] (two tokens go to <cls>/<sep> or "
                                                "<eos>), e.g. 256")),
    "data.val_fraction": (_fraction, "must be in [0, 1), e.g. 0.1"),
    "data.test_fraction": (_test_fraction, ("must be in [0, 1), and with data.val_fraction below 1 (the rest is "
                                            "the training split)")),
    "train.steps": (_count(1), "must be >= 1 optimizer steps"),
    "train.batch_size": (_count(1), "must be >= 1"),
    "train.lr": (lambda v, cfg: 0 < v <= MAX_LR, (f"must be in (0, {MAX_LR:g}]; AdamW learning rates are usually "
                                                  "1e-4 to 3e-3")),
    "train.min_lr": (lambda v, cfg: v is None or 0 <= v <= _lr(cfg),
                     lambda cfg: (f"must be in [0, train.lr={_lr(cfg):g}] (the cosine schedule's floor); leave it "
                                  "out for train.lr / 10")),
    "train.warmup": (lambda v, cfg: v is None or 0 <= v <= cfg.train.steps,
                     lambda cfg: (f"must be in [0, train.steps={cfg.train.steps}] warmup steps (a longer warmup "
                                  "never reaches train.lr); lower train.warmup, raise train.steps, or leave "
                                  "train.warmup out for min(100, train.steps)")),
    "train.weight_decay": (lambda v, cfg: v >= 0 and v * _lr(cfg) < 1,
                           lambda cfg: (f"must be >= 0 with train.lr * train.weight_decay < 1 (train.lr="
                                        f"{_lr(cfg):g}; AdamW scales every weight by 1 - lr * weight_decay each "
                                        "step); 0.01 to 0.1 is usual")),
    "train.betas": (lambda v, cfg: all(0 <= b < 1 for b in v), "each must be in [0, 1), e.g. [0.9, 0.99]"),
    "train.grad_clip": (lambda v, cfg: v >= 0, ("must be >= 0: the largest gradient norm (0 turns clipping "
                                                "off), e.g. 1.0")),
    "train.accumulate": (_count(1), "must be >= 1 micro-batches per step"),
    "train.eval_every": (_count(1), "must be >= 1 steps between evaluations"),
    "train.eval_batches": (_count(0), "must be >= 0 batches per evaluation (0: the whole split)"),
    "train.save_every": (_count(1), "must be >= 1 steps between checkpoints"),
    "train.log_every": (_count(1), "must be >= 1 steps between log lines"),
    "train.early_stop": (_count(0), "must be >= 0 evaluations without improvement (0: never stop early)"),
    "train.label_smoothing": (_fraction, "must be in [0, 1), e.g. 0.1"),
    "train.class_balance": (lambda v, cfg: 0 <= v <= 1 and (v == 0 or cfg.task == "segment"),
                            lambda cfg: ("must be in [0, 1], and applies to task segment only (the pixel classes); "
                                         f"task is {cfg.task!r}: leave it out" if cfg.task != "segment" else
                                         "must be in [0, 1]: 0 plain cross-entropy, 0.5 rare classes weigh "
                                         "sqrt(their rarity), 1 every class alike")),
}


def _short(value) -> str:
    text = repr(value)
    return text if len(text) <= 60 else text[:57] + "..."


def _describe(hint) -> str:
    origin, args = get_origin(hint), get_args(hint)
    if origin in (typing.Union, types.UnionType):
        return " or ".join(_describe(a) for a in args)
    if origin is tuple:
        return f"a list of {len(args)} numbers"
    if origin is list:
        return f"a list of {_describe(args[0]) if args else 'values'}"
    names = {int: "an integer", float: "a finite number", str: "a string", bool: "true or false",
             dict: "a table", type(None): "left out"}
    return names.get(hint, getattr(hint, "__name__", str(hint)))


def _convert(value: Any, hint, where: str, example: Any = None):
    """``value`` checked against ``hint`` (int, float, str, bool, dict, tuples, lists, unions); ints become
    floats where a float is wanted. NaN and infinity are no float field's setting."""
    origin, args = get_origin(hint), get_args(hint)
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        options = [a for a in args if a is not type(None)]
        for a in options:
            try:
                return _convert(value, a, where, example)
            except ConfigError as e:
                error = e
        if len(options) == 1:  # X | None: X's own message (e.g. the NaN one)
            raise error
        raise ConfigError(f"{where}: expected {_describe(hint)}, got {type(value).__name__} {_short(value)}")
    if origin in (tuple, list):
        wanted = len(args) if origin is tuple else None
        if not isinstance(value, (list, tuple)) or (wanted is not None and len(value) != wanted):
            raise ConfigError(f"{where}: expected {_describe(hint)}, got {_short(value)}")
        items = args if origin is tuple else (args[0] if args else Any,) * len(value)
        converted = [_convert(v, a, where) for v, a in zip(value, items)]
        return tuple(converted) if origin is tuple else converted
    if hint is float and isinstance(value, int) and not isinstance(value, bool):
        value = float(value)
    wrong = not isinstance(value, hint) if hint in (int, float, str, bool, dict) else False
    if wrong or (hint is int and isinstance(value, bool)):
        kind = "table" if isinstance(value, dict) else type(value).__name__
        raise ConfigError(f"{where}: expected {_describe(hint)} ({hint.__name__}), got {kind} {_short(value)}"
                          + _example(where, example))
    if hint is float and not math.isfinite(value):
        raise ConfigError(f"{where}: got {value}; expected a finite number (NaN and infinity are not settings)"
                          + _example(where, example))
    return value


def _example(where: str, example: Any) -> str:
    return "" if example is None or isinstance(example, dict) else f"; e.g. {where} = {_short(example)}"


def _default(f: dataclasses.Field):
    return None if f.default is dataclasses.MISSING else f.default


def _check_types(cfg: TrainConfig) -> None:
    """Fields set from Python (not through `load_config`) get the same type checks."""
    for table, obj in (("", cfg), ("data.", cfg.data), ("train.", cfg.train)):
        hints = get_type_hints(type(obj))
        for f in dataclasses.fields(obj):
            if not dataclasses.is_dataclass(hints[f.name]):
                setattr(obj, f.name, _convert(getattr(obj, f.name), hints[f.name], f"{table}{f.name}", _default(f)))


def _check_model_table(task: str, table: dict) -> None:
    """The ``[model]`` fields the task's model config knows, type-checked against it now (its ranges are
    checked when the model is built: they depend on what the data fixes, e.g. the vocabulary)."""
    from .tasks import CONFIG_CLASS

    try:
        hints = get_type_hints(CONFIG_CLASS[task])
    except NameError:  # an annotation that does not resolve: the model config checks itself when built
        return
    for key, value in table.items():
        if key in hints:  # an unknown key is named, with the known ones, when the model is built
            table[key] = _convert(value, hints[key], f"model.{key}")
        if key.endswith("dropout") and isinstance(table[key], float) and not 0 <= table[key] < 1:
            raise ConfigError(f"model.{key}: got {table[key]}; must be in [0, 1), e.g. 0.1")


def _fill(cls, values: dict, where: str):
    hints = get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls)}
    names = list(fields)
    kwargs = {}
    for key, value in values.items():
        if key not in names:
            close = difflib.get_close_matches(key, names, n=1)
            hint = f" (did you mean {where}{close[0]}?)" if close else f"; known: {names}"
            raise ConfigError(f"{where}{key}: unknown key{hint}")
        sub = hints[key]
        if dataclasses.is_dataclass(sub):
            if not isinstance(value, dict):
                raise ConfigError(f"{where}{key}: expected a table, got {_short(value)}")
            kwargs[key] = _fill(sub, value, f"{where}{key}.")
        else:
            kwargs[key] = _convert(value, sub, f"{where}{key}", _default(fields[key]))
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


def read_toml(path: str | Path) -> dict:
    """The tables of a TOML file; a missing file, a folder, unreadable bytes or bad TOML is a `ConfigError`
    naming the file and the fix."""
    p = Path(path)
    if p.is_dir():
        found = sorted(q.name for q in p.glob("*.toml"))[:3]
        inside = f" (it holds {', '.join(found)})" if found else ""
        raise ConfigError(f"config file {str(p)!r} is a folder{inside}; give the path of a TOML file, "
                          "e.g. qkv train configs/shakespeare.toml")
    if not p.exists():
        raise ConfigError(f"config file {str(p)!r} does not exist; give the path of a TOML file, "
                          "e.g. qkv train configs/shakespeare.toml")
    try:
        text = p.read_bytes().decode("utf-8")
    except UnicodeDecodeError as e:
        raise ConfigError(f"config file {str(p)!r} is not UTF-8 text (byte {e.start}); save it as UTF-8") from None
    except OSError as e:
        raise ConfigError(f"config file {str(p)!r} cannot be read ({e.strerror}); check its permissions") from None
    try:
        return tomllib.loads(text)
    except tomllib.TOMLDecodeError as e:
        raise ConfigError(f"{p}: not valid TOML: {e}; see https://toml.io for the syntax") from None


def load_config(path: str | Path | None = None, overrides: list[str] = (), base: dict | None = None) -> TrainConfig:
    """Read a TOML file (or start from ``base``), apply ``key=value`` overrides, validate every field."""
    raw: dict = dict(base or {})
    if path is not None:
        raw = read_toml(path)
    for text in overrides:
        keys, value = parse_override(text)
        node = raw
        for k in keys[:-1]:
            node = node.setdefault(k, {})
            if not isinstance(node, dict):
                raise ConfigError(f"--set {text!r}: {k!r} is not a table")
        node[keys[-1]] = value
    return _fill(TrainConfig, raw, "").validate()
