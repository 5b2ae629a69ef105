"""Text data: tokenizers trained offline (character, BPE, WordPiece) and the user's text, CSV and JSONL files."""

from __future__ import annotations

import csv
import json
from collections.abc import Iterable, Sequence
from pathlib import Path

import torch
from tokenizers import Regex, decoders, models, normalizers, pre_tokenizers, processors, trainers
from tokenizers import Tokenizer as _Tok

from ..pretrained.tokenizer import Tokenizer
from .core import DataError

SPECIAL = ["<pad>", "<unk>", "<bos>", "<eos>", "<cls>", "<sep>"]


def train_tokenizer(kind: str, texts: Iterable[str], vocab_size: int = 2048, classify: bool = False) -> Tokenizer:
    """A tokenizer trained on ``texts``: "char" (one id per character), "bpe" (byte-level BPE) or
    "wordpiece" (lower-cased, BERT-style). ``classify`` adds <cls> ... <sep> around each text."""
    texts = list(texts)
    if kind == "char":
        chars = sorted({c for t in texts for c in t})
        vocab = {t: i for i, t in enumerate(SPECIAL)}
        for c in chars:
            vocab.setdefault(c, len(vocab))
        tok = _Tok(models.WordLevel(vocab, unk_token="<unk>"))
        tok.pre_tokenizer = pre_tokenizers.Split(Regex(r"[\s\S]"), behavior="isolated")  # every character
        tok.decoder = decoders.Fuse()
    elif kind == "bpe":
        tok = _Tok(models.BPE(unk_token="<unk>"))
        tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
        tok.decoder = decoders.ByteLevel()
        tok.train_from_iterator(texts, trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=SPECIAL,
                                                           initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    elif kind == "wordpiece":
        tok = _Tok(models.WordPiece(unk_token="<unk>"))
        tok.normalizer = normalizers.BertNormalizer(lowercase=True)
        tok.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
        tok.decoder = decoders.WordPiece()
        tok.train_from_iterator(texts, trainers.WordPieceTrainer(vocab_size=vocab_size, special_tokens=SPECIAL))
    else:
        raise DataError(f"tokenizer {kind!r} is not one of char, bpe, wordpiece")
    if classify:
        cls, sep = tok.token_to_id("<cls>"), tok.token_to_id("<sep>")
        tok.post_processor = processors.TemplateProcessing(single="<cls> $A <sep>", pair="<cls> $A <sep> $B <sep>",
                                                          special_tokens=[("<cls>", cls), ("<sep>", sep)])
    return Tokenizer(tok, pad_token="<pad>", eos_token="<eos>", bos_token="<bos>")


def encode_stream(tok: Tokenizer, text: str) -> torch.Tensor:
    """One long (N,) id tensor for a corpus, encoded in chunks of lines (fast for megabytes of text)."""
    lines = text.splitlines(keepends=True)
    chunks = ["".join(lines[i : i + 200]) for i in range(0, len(lines), 200)]
    ids: list[int] = []
    for enc in tok.tok.encode_batch(chunks, add_special_tokens=False):
        ids.extend(enc.ids)
    return torch.tensor(ids, dtype=torch.long)


def read_records(path: str | Path, fields: Sequence[str]) -> list[dict]:
    """Rows of a CSV (with a header) or JSONL file holding ``fields``; errors name the file and line."""
    path = Path(path)
    if not path.exists():
        raise DataError(f"{path}: no such file")
    rows = []
    if path.suffix.lower() in (".jsonl", ".json"):
        for n, line in enumerate(path.read_text(encoding="utf-8").splitlines(), start=1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as e:
                raise DataError(f"{path}:{n}: not valid JSON ({e.msg})") from None
            if not isinstance(row, dict):
                raise DataError(f"{path}:{n}: expected an object like {{\"{fields[0]}\": ...}}, got {type(row).__name__}")
            _check_fields(row, fields, path, n)
            rows.append(row)
    elif path.suffix.lower() in (".csv", ".tsv"):
        with path.open(newline="", encoding="utf-8") as f:
            reader = csv.DictReader(f, delimiter="\t" if path.suffix.lower() == ".tsv" else ",")
            missing = [c for c in fields if c not in (reader.fieldnames or [])]
            if missing:
                raise DataError(f"{path}:1: header {reader.fieldnames} lacks column(s) {missing}")
            for n, row in enumerate(reader, start=2):
                _check_fields(row, fields, path, n)
                rows.append(row)
    else:
        raise DataError(f"{path}: expected a .csv, .tsv or .jsonl file")
    if not rows:
        raise DataError(f"{path}: no records")
    return rows


def _check_fields(row: dict, fields: Sequence[str], path: Path, line: int) -> None:
    for f in fields:
        value = row.get(f)
        if value is None or (isinstance(value, str) and not value.strip()):
            raise DataError(f"{path}:{line}: field {f!r} is missing or empty")


def encode_texts(tok: Tokenizer, texts: Sequence[str], max_length: int) -> dict[str, torch.Tensor]:
    """Right-padded ids and attention mask (N, T) for texts, truncated to ``max_length``."""
    enc = tok.encode_batch(list(texts), max_length=max_length)
    return {"input_ids": enc["input_ids"], "attention_mask": enc["attention_mask"]}
