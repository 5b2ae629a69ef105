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
