"""Text data: tokenizers trained offline (character, BPE, WordPiece) and the user's text, CSV and JSONL files.

Long inputs are handled in bounded pieces, so memory does not depend on how long one line or one
field is:

- Text is cut into pieces of at most `PIECE_CHARS` (64 Ki) characters, before a whitespace character
  near the end of the budget (a run with no whitespace is cut at the budget). Cutting before whitespace
  keeps every word whole, so tokenizers trained and run on the pieces see the words the whole text has.
- A text file for language modelling is read from disk piece by piece and never held whole; its ids
  are encoded `ENCODE_CHARS` (256 Ki characters) at a time and appended to one int64 buffer. Memory
  is 8 bytes per token plus a fixed working set (the pieces in flight, the tokenizer's encodings of
  them and its own state: about 100-150 MiB measured), whatever the line lengths.
- Classification and sequence-to-sequence texts are truncated to ``max_length`` tokens anyway: only the
  first piece of each text is tokenized, in groups of about `ENCODE_CHARS` characters.
- CSV fields and JSONL lines may hold up to `MAX_FIELD_CHARS` (16 Mi) characters; a longer one is
  refused with a `DataError` naming the file and line.
"""

from __future__ import annotations

import csv
import json
import re
from array import array
from collections.abc import Iterable, Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path

import torch
from tokenizers import Regex, decoders, models, normalizers, pre_tokenizers, processors, trainers
from tokenizers import Tokenizer as _Tok

from ..pretrained.tokenizer import Tokenizer
from .core import DataError

SPECIAL = ["<pad>", "<unk>", "<bos>", "<eos>", "<cls>", "<sep>"]
PIECE_CHARS = 64 * 1024  # characters per piece of text handed to a tokenizer
ENCODE_CHARS = 4 * PIECE_CHARS  # characters per encode call: bounds the tokenizer's working set
MAX_FIELD_CHARS = 16 * 1024 * 1024  # the longest CSV field or JSONL line read

_SPACE_BEFORE_WORD = re.compile(r"\s(?=\S)")
_SPACE = re.compile(r"\s")


def _cut(text: str, start: int, budget: int) -> int:
    """Where the piece starting at ``start`` ends: before the last whitespace character (preferably one
    that starts a word) in the last quarter of the budget, else at the budget."""
    end, lo = start + budget, start + budget - budget // 4
    for pattern in (_SPACE_BEFORE_WORD, _SPACE):
        last = None
        for last in pattern.finditer(text, lo, end):
            pass
        if last is not None and last.start() > start:
            return last.start()
    return end


def split_long(text: str, budget: int = PIECE_CHARS) -> Iterator[str]:
    """``text`` as consecutive pieces of at most ``budget`` characters, cut before whitespace where there
    is some near the budget; ``"".join(pieces) == text``."""
    start, n = 0, len(text)
    while n - start > budget:
        end = _cut(text, start, budget)
        yield text[start:end]
        start = end
    if start < n:
        yield text[start:]


def text_pieces(source: str | Path, budget: int = PIECE_CHARS) -> Iterator[str]:
    """Pieces of a text (a ``str``) or of a UTF-8 text file (a ``Path``, read ``budget`` characters at a
    time; undecodable bytes become U+FFFD). At most two pieces are in memory at once."""
    if isinstance(source, str):
        yield from split_long(source, budget)
        return
    with open(source, encoding="utf-8", errors="replace") as f:
        carry = ""
        while block := f.read(budget):
            carry += block
            if len(carry) > budget:
                *done, carry = split_long(carry, budget)
                yield from done
        if carry:
            yield carry


def split_at(pieces: Iterable[str], cut: int, first: bool) -> Iterator[str]:
    """The pieces before character ``cut`` (``first``) or from it on, the piece across it split there."""
    seen = 0
    for piece in pieces:
        lo, seen = seen, seen + len(piece)
        if first and lo < cut:
            yield piece[: cut - lo]
        elif not first and seen > cut:
            yield piece[max(cut - lo, 0) :]


def train_tokenizer(kind: str, texts: Iterable[str], vocab_size: int = 2048, classify: bool = False) -> Tokenizer:
    """A tokenizer trained on ``texts``: "char" (one id per character), "bpe" (byte-level BPE) or
    "wordpiece" (lower-cased, BERT-style). ``classify`` adds <cls> ... <sep> around each text.

    ``texts`` may be any iterable (a generator of pieces of a file is read once); each text is cut
    into pieces of at most `PIECE_CHARS` characters first, so one huge text trains in bounded memory."""
    pieces = (p for t in texts for p in split_long(t))
    if kind == "char":
        chars: set[str] = set()
        for p in pieces:
            chars.update(p)
        vocab = {t: i for i, t in enumerate(SPECIAL)}
        for c in sorted(chars):
            vocab.setdefault(c, len(vocab))
        tok = _Tok(models.WordLevel(vocab, unk_token="<unk>"))
        tok.pre_tokenizer = pre_tokenizers.Split(Regex(r"[\s\S]"), behavior="isolated")  # every character
        tok.decoder = decoders.Fuse()
    elif kind == "bpe":
        tok = _Tok(models.BPE(unk_token="<unk>"))
        tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
        tok.decoder = decoders.ByteLevel()
        tok.train_from_iterator(pieces, trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=SPECIAL,
                                                            initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    elif kind == "wordpiece":
        tok = _Tok(models.WordPiece(unk_token="<unk>"))
        tok.normalizer = normalizers.BertNormalizer(lowercase=True)
        tok.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
        tok.decoder = decoders.WordPiece()
        tok.train_from_iterator(pieces, trainers.WordPieceTrainer(vocab_size=vocab_size, special_tokens=SPECIAL))
    else:
        raise DataError(f"tokenizer {kind!r} is not one of char, bpe, wordpiece")
    if classify:
        cls, sep = tok.token_to_id("<cls>"), tok.token_to_id("<sep>")
        tok.post_processor = processors.TemplateProcessing(single="<cls> $A <sep>", pair="<cls> $A <sep> $B <sep>",
                                                          special_tokens=[("<cls>", cls), ("<sep>", sep)])
    return Tokenizer(tok, pad_token="<pad>", eos_token="<eos>", bos_token="<bos>")


def _groups(texts: Iterable[str], chars: int = ENCODE_CHARS) -> Iterator[list[str]]:
    """Consecutive texts in lists of about ``chars`` characters (at least one text each)."""
    group, size = [], 0
    for t in texts:
        group.append(t)
        size += len(t)
        if size >= chars:
            yield group
            group, size = [], 0
    if group:
        yield group


def encode_stream(tok: Tokenizer, text: str | Iterable[str]) -> torch.Tensor:
    """One long (N,) int64 id tensor for a corpus: a ``str`` or an iterable of pieces (`text_pieces`).

    Pieces are encoded about `ENCODE_CHARS` characters at a time and appended to one buffer, so the
    tokenizer never holds more than that: memory is 8 bytes per token plus that working set."""
    pieces = split_long(text) if isinstance(text, str) else (p for t in text for p in split_long(t))
    ids = array("q")
    for group in _groups(pieces):
        for enc in tok.tok.encode_batch(group, add_special_tokens=False):
            ids.extend(enc.ids)
    if not ids:
        return torch.zeros(0, dtype=torch.long)
    return torch.frombuffer(ids, dtype=torch.long)  # shares the buffer: no second copy of the ids


def encode_texts(tok: Tokenizer, texts: Sequence[str], max_length: int) -> dict[str, torch.Tensor]:
    """Right-padded ids and attention mask (N, T) for texts, truncated to ``max_length`` tokens; T is the
    longest encoding. Only the first `PIECE_CHARS` piece of each text is tokenized (the tokens past
    ``max_length`` are dropped anyway), in groups of about `ENCODE_CHARS` characters."""
    heads = [next(split_long(t), "") for t in texts]
    parts = [tok.encode_batch(group, max_length=max_length) for group in _groups(heads)]
    width = max((p["input_ids"].shape[1] for p in parts), default=0)
    pad = torch.nn.functional.pad
    return {"input_ids": torch.cat([pad(p["input_ids"], (0, width - p["input_ids"].shape[1]), value=tok.pad_id)
                                    for p in parts]) if parts else torch.zeros(0, 0, dtype=torch.long),
            "attention_mask": torch.cat([pad(p["attention_mask"], (0, width - p["attention_mask"].shape[1]))
                                         for p in parts]) if parts else torch.zeros(0, 0, dtype=torch.long)}


@contextmanager
def _csv_field_limit(limit: int):
    """csv's field size limit raised to ``limit`` while reading (it is process-wide; restored after)."""
    old = csv.field_size_limit(limit)
    try:
        yield
    finally:
        csv.field_size_limit(old)


def _jsonl_rows(path: Path, fields: Sequence[str]) -> Iterator[dict]:
    with path.open(encoding="utf-8") as f:
        n = 0
        while line := f.readline(MAX_FIELD_CHARS + 2):  # one line at a time, never more than the limit
            n += 1
            if len(line.rstrip("\r\n")) > MAX_FIELD_CHARS:
                raise DataError(f"{path}:{n}: the line is longer than {MAX_FIELD_CHARS:,} characters, the most "
                                "qkv reads per record; split the text over several records")
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as e:
                raise DataError(f"{path}:{n}: not valid JSON ({e.msg})") from None
            if not isinstance(row, dict):
                raise DataError(f"{path}:{n}: expected an object like {{\"{fields[0]}\": ...}}, "
                                f"got {type(row).__name__}")
            _check_fields(row, fields, path, n)
            yield row


def _csv_rows(path: Path, fields: Sequence[str]) -> Iterator[dict]:
    with path.open(newline="", encoding="utf-8") as f, _csv_field_limit(MAX_FIELD_CHARS):
        reader = csv.DictReader(f, delimiter="\t" if path.suffix.lower() == ".tsv" else ",")
        start = 1
        try:
            missing = [c for c in fields if c not in (reader.fieldnames or [])]
            if missing:
                raise DataError(f"{path}:1: header {reader.fieldnames} lacks column(s) {missing}")
            while True:
                start = reader.line_num + 1  # the record's first line (a quoted field may span lines)
                try:
                    row = next(reader)
                except StopIteration:
                    return
                _check_fields(row, fields, path, start)
                yield row
        except csv.Error as e:
            line = start  # the record's first line: where its (possibly unclosed) quote opened
            if "field larger than field limit" in str(e):
                raise DataError(f"{path}:{line}: a field is longer than {MAX_FIELD_CHARS:,} characters, the most "
                                "qkv reads per field; split the text over several rows (or close an unclosed "
                                "quote)") from None
            raise DataError(f"{path}:{line}: not valid CSV ({e})") from None


def read_records(path: str | Path, fields: Sequence[str]) -> list[dict]:
    """Rows of a CSV (with a header) or JSONL file holding ``fields``; errors name the file and line.

    A CSV field or JSONL line may hold up to `MAX_FIELD_CHARS` characters; files are read row by row."""
    path = Path(path)
    if not path.exists():
        raise DataError(f"{path}: no such file")
    suffix = path.suffix.lower()
    if suffix not in (".jsonl", ".json", ".csv", ".tsv"):
        raise DataError(f"{path}: expected a .csv, .tsv or .jsonl file")
    if path.is_dir():
        raise DataError(f"{path}: is a folder; give a .csv, .tsv or .jsonl file")
    try:
        rows = list(_jsonl_rows(path, fields) if suffix in (".jsonl", ".json") else _csv_rows(path, fields))
    except UnicodeDecodeError as e:
        raise DataError(f"{path}: not UTF-8 text ({e.reason}); save it as UTF-8") from None
    if not rows:
        raise DataError(f"{path}: no records")
    return rows


def _check_fields(row: dict, fields: Sequence[str], path: Path, line: int) -> None:
    for f in fields:
        value = row.get(f)
        if value is None or (isinstance(value, str) and not value.strip()):
            raise DataError(f"{path}:{line}: field {f!r} is missing or empty")
