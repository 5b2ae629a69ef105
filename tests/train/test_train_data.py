"""qkv.data: the user's files (errors name file and line), tokenizers, and the generated tasks."""

import json

import numpy as np
import pytest
import torch

from qkv.data import DataError, load_data, read_records, train_tokenizer
from qkv.data.synthetic import LISTOPS_TOKENS, listops, mqar
from qkv.train import load_config


def test_csv_and_jsonl_records(tmp_path):
    csv = tmp_path / "d.csv"
    csv.write_text('text,label\n"hello, world",pos\nbad day,neg\n')
    assert read_records(csv, ("text", "label")) == [{"text": "hello, world", "label": "pos"},
                                                    {"text": "bad day", "label": "neg"}]
    jl = tmp_path / "d.jsonl"
    jl.write_text('{"source": "a b", "target": "b a"}\n\n{"source": "c", "target": "c"}\n')
    assert len(read_records(jl, ("source", "target"))) == 2


@pytest.mark.parametrize("name, text, fields, where", [
    ("d.csv", "text,label\nfine,pos\n,neg\n", ("text", "label"), ["d.csv:3", "'text'"]),
    ("d.csv", "words,label\nfine,pos\n", ("text", "label"), ["d.csv:1", "text"]),
    ("d.jsonl", '{"text": "a", "label": 1}\n{"text": "b", "label": 2\n', ("text", "label"), ["d.jsonl:2", "JSON"]),
    ("d.jsonl", '{"text": "a", "label": 1}\n["b", 2]\n', ("text", "label"), ["d.jsonl:2", "object"]),
    ("d.jsonl", '{"source": "a"}\n', ("source", "target"), ["d.jsonl:1", "'target'"]),
    ("d.txt", "text,label\n", ("text", "label"), ["d.txt", ".csv"]),
    ("d.csv", "text,label\n", ("text", "label"), ["d.csv", "no records"]),
])
def test_bad_files_name_file_and_line(tmp_path, name, text, fields, where):
    p = tmp_path / name
    p.write_text(text)
    with pytest.raises(DataError) as e:
        read_records(p, fields)
    for w in where:
        assert w in str(e.value)


def test_bad_image_and_audio_files_are_named(tmp_path):
    from PIL import Image

    for c in ("cat", "dog"):
        (tmp_path / "img" / c).mkdir(parents=True)
        Image.new("RGB", (10, 10), (1, 2, 3)).save(tmp_path / "img" / c / "a.png")
    (tmp_path / "img" / "dog" / "broken.png").write_bytes(b"not a png")
    cfg = load_config(None, ["task=image", f"data.path={tmp_path / 'img'}"])
    with pytest.raises(DataError, match="broken.png"):
        load_data(cfg.data, "image")
    (tmp_path / "one" / "only").mkdir(parents=True)
    cfg = load_config(None, ["task=image", f"data.path={tmp_path / 'one'}"])
    with pytest.raises(DataError, match="at least 2"):
        load_data(cfg.data, "image")


@pytest.mark.parametrize("kind", ["char", "bpe", "wordpiece"])
def test_tokenizers_round_trip(kind):
    texts = ["the quick brown fox jumps over the lazy dog"] * 20 + ["pack my box with five dozen liquor jugs"] * 20
    tok = train_tokenizer(kind, texts, vocab_size=200)
    ids = tok.encode("the lazy fox")
    assert tok.decode(ids).replace(" ", "") == "thelazyfox"
    if kind != "wordpiece":
        assert tok.decode(ids) == "the lazy fox"


def _listops_eval(tokens):
    """An independent evaluator: a stack machine over the token strings."""
    stack = []
    for t in tokens:
        if t.startswith("["):
            stack.append([t])
        elif t == "]":
            op, *args = stack.pop()
            value = {"[MIN": min(args), "[MAX": max(args), "[MED": sorted(args)[len(args) // 2],
                     "[SM": sum(args) % 10}[op]
            if not stack:
                return value
            stack[-1].append(value)
        else:
            stack[-1].append(int(t))
    raise AssertionError("unbalanced expression")


def test_listops_labels_and_lengths():
    d = listops(60, min_len=40, max_len=120, seed=3)
    lengths = d["attention_mask"].sum(1)
    assert int(lengths.min()) >= 40 and int(lengths.max()) <= 120
    for ids, n, label in zip(d["input_ids"], lengths, d["labels"]):
        toks = [LISTOPS_TOKENS[i] for i in ids[1:int(n)].tolist()]
        assert LISTOPS_TOKENS[int(ids[0])] == "<cls>"
        assert _listops_eval(toks) == int(label)
    assert len(set(d["labels"].tolist())) > 3


def test_mqar_queries_recall_their_values():
    d = mqar(20, seq_len=64, pairs=8, vocab_size=256, seed=1)
    for ids, labels in zip(d["input_ids"], d["labels"]):
        pairs = {int(ids[i]): int(ids[i + 1]) for i in range(0, 16, 2)}
        assert len(pairs) == 8 and all(k < 128 <= v for k, v in pairs.items())
        queries = (labels != -100).nonzero().flatten()
        assert len(queries) == 8 and int(queries.min()) >= 16
        for q in queries.tolist():
            assert pairs[int(ids[q])] == int(labels[q])


def test_splits_are_deterministic_and_disjoint():
    cfg = load_config(None, ["task=image", "data.dataset=digits"])
    a, b = load_data(cfg.data, "image", seed=5), load_data(cfg.data, "image", seed=5)
    assert torch.equal(a.splits["train"]["pixel_values"], b.splits["train"]["pixel_values"])
    rows = {tuple(x.flatten().tolist()) for s in ("train", "val", "test") for x in a.splits[s]["pixel_values"]}
    assert sum(a.size(s) for s in ("train", "val", "test")) == 1797
    g1, g2 = torch.Generator().manual_seed(0), torch.Generator().manual_seed(0)
    assert torch.equal(a.sample("train", 8, g1)["labels"], a.sample("train", 8, g2)["labels"])
    assert len(rows) > 1700


# --- long inputs: bounded pieces, long fields ----------------------------------------------------------

def _words(n_chars: int, seed: int = 0) -> str:
    import random

    rng = random.Random(seed)
    vocab = ["alpha", "beta", "gamma", "delta", "epsilon", "zeta", "eta", "theta", "iota", "kappa", "lambda"]
    out, size = [], 0
    while size < n_chars:
        w = rng.choice(vocab) + rng.choice([" ", " ", " ", ", ", ".  ", "\n", "\t"])
        out.append(w)
        size += len(w)
    return "".join(out)[:n_chars]


def test_split_long_cuts_before_whitespace_and_loses_nothing():
    from qkv.data.text import split_long

    text = _words(300_000)
    pieces = list(split_long(text, 1000))
    assert "".join(pieces) == text
    assert all(0 < len(p) <= 1000 for p in pieces)
    assert all(p[0].isspace() for p in pieces[1:])  # each cut falls before whitespace: words stay whole
    blob = "x" * 2500  # no whitespace at all: cut at the budget
    assert [len(p) for p in split_long(blob, 1000)] == [1000, 1000, 500]


def test_file_pieces_equal_text_pieces(tmp_path):
    from qkv.data.text import split_at, text_pieces

    text = _words(200_000) + "caf\u00e9 \U0001f600 end"
    p = tmp_path / "t.txt"
    p.write_text(text, encoding="utf-8")
    from_file = list(text_pieces(p, 4096))
    assert "".join(from_file) == text and max(map(len, from_file)) <= 4096
    cut = 123_457
    assert "".join(split_at(from_file, cut, True)) == text[:cut]
    assert "".join(split_at(from_file, cut, False)) == text[cut:]


@pytest.mark.parametrize("kind", ["char", "bpe", "wordpiece"])
def test_encoding_in_pieces_equals_encoding_whole(kind):
    from qkv.data.text import PIECE_CHARS, encode_stream

    text = _words(3 * PIECE_CHARS + 777)  # several pieces, cut inside a line
    tok = train_tokenizer(kind, [text], vocab_size=300)
    whole = tok.tok.encode(text, add_special_tokens=False).ids
    assert encode_stream(tok, text).tolist() == whole


MEASURE = """
import resource, sys
from qkv.train import load_config
from qkv.data import load_data
cfg = load_config(None, ["task=lm", "data.path=" + sys.argv[1], "data.tokenizer=" + sys.argv[2]])
import tokenizers  # noqa: F401
before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
data = load_data(cfg.data, "lm")
after = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
print(data.size("train") + data.size("val"), (after - before) // 1024)
"""


@pytest.mark.parametrize("kind", ["char", "bpe"])
def test_a_long_single_line_file_encodes_in_bounded_memory(tmp_path, kind):
    """4 MiB on one line: the whole line in the tokenizer at once took 1.4 GB (char) / 0.75 GB (bpe) of
    peak memory; in 64 KiB pieces it takes 8 bytes per token plus a fixed working set."""
    import subprocess
    import sys

    path = tmp_path / "one_line.txt"
    text = _words(4 * 2**20).replace("\n", " ")
    path.write_text(text)
    proc = subprocess.run([sys.executable, "-c", MEASURE, str(path), kind], capture_output=True, text=True,
                          timeout=120, env={**__import__("os").environ, "OMP_NUM_THREADS": "1"})
    assert proc.returncode == 0, proc.stderr[-2000:]
    tokens, grew_mib = map(int, proc.stdout.split())
    if kind == "char":
        assert tokens == len(text)
    ids_mib = tokens * 8 / 2**20
    assert grew_mib < ids_mib + 300, (grew_mib, ids_mib)  # loosely: ~150 MiB measured, 1,443 MiB before


def test_a_long_single_line_file_trains(tmp_path):
    from train_helpers import run

    path = tmp_path / "one_line.txt"
    path.write_text(_words(2**20).replace("\n", " "))
    result, _ = run(tmp_path, "task=lm", f"data.path={path}", "data.block_size=16", "train.steps=3",
                    "train.batch_size=16", "data.val_fraction=0.01")  # the final evaluation reads all of val
    assert result.step == 3 and np.isfinite(result.metrics["loss"])


def test_a_2mb_csv_field_is_read_and_trained_on(tmp_path):
    import csv as _csv

    long_text = _words(2 * 2**20).replace("\n", " ")
    p = tmp_path / "long.csv"
    rows = [("short one great", "pos"), ("short two awful", "neg")] * 10 + [(long_text, "pos")]
    with p.open("w", newline="") as f:
        w = _csv.writer(f)
        w.writerow(["text", "label"])
        w.writerows(rows)
    limit = _csv.field_size_limit()
    got = read_records(p, ("text", "label"))
    assert got[-1]["text"] == long_text and len(got) == 21
    assert _csv.field_size_limit() == limit  # the process-wide limit is restored
    cfg = load_config(None, ["task=classify", f"data.path={p}", "data.max_length=32", "data.vocab_size=200",
                             "data.val_fraction=0", "data.test_fraction=0"])
    data = load_data(cfg.data, "classify")
    assert data.splits["train"]["input_ids"].shape == (21, 32)  # the long text fills max_length


def test_fields_beyond_the_limit_name_file_and_line(tmp_path, monkeypatch):
    import qkv.data.text as text_module

    monkeypatch.setattr(text_module, "MAX_FIELD_CHARS", 1000)
    p = tmp_path / "d.csv"
    p.write_text('text,label\nfine,pos\n"a\nquoted, two-line field",neg\n' + "x" * 1001 + ",pos\nlast,neg\n")
    with pytest.raises(DataError) as e:
        read_records(p, ("text", "label"))
    assert "d.csv:5" in str(e.value) and "1,000 characters" in str(e.value)
    p.write_text('text,label\nfine,pos\n"a\nquoted, two-line field",\nok,neg\n')  # line numbers of records
    with pytest.raises(DataError, match=r"d\.csv:3: field 'label'"):
        read_records(p, ("text", "label"))
    j = tmp_path / "d.jsonl"
    j.write_text('{"text": "a", "label": "x"}\n' + json.dumps({"text": "y" * 2000, "label": "z"}) + "\n")
    with pytest.raises(DataError, match=r"d\.jsonl:2: .*1,000 characters"):
        read_records(j, ("text", "label"))


def test_non_utf8_records_name_the_file(tmp_path):
    p = tmp_path / "latin.csv"
    p.write_bytes("text,label\ncaf\xe9,pos\n".encode("latin-1"))
    with pytest.raises(DataError, match=r"latin\.csv.*UTF-8"):
        read_records(p, ("text", "label"))
