"""`qkv train` task "chat": labels on assistant tokens only, bad lines refused by line, a tiny run that learns,
and an output folder `qkv chat` runs on."""

from __future__ import annotations

import io
import json

import pytest
import torch

import qkv
from qkv.cli import main
from qkv.data import IGNORE, DataError, load_data
from qkv.train import fit, load_config
from qkv.train.tasks import build_model, evaluate

FACTS = [("what colour is the sky?", "blue."), ("what colour is grass?", "green."), ("what is two plus two?", "four."),
         ("who says moo?", "a cow."), ("what do cats say?", "meow."), ("what is ice?", "cold water.")]


def _dialogues(path, n: int = 120):
    with open(path, "w", encoding="utf-8") as f:
        for i in range(n):
            q1, a1 = FACTS[i % len(FACTS)]
            q2, a2 = FACTS[(i * 5 + 1) % len(FACTS)]
            msgs = ([{"role": "system", "content": "answer briefly"}] if i % 2 else []) + [
                {"role": "user", "content": q1}, {"role": "assistant", "content": a1},
                {"role": "user", "content": q2}, {"role": "assistant", "content": a2}]
            f.write(json.dumps({"messages": msgs}) + "\n")
    return path


def _config(tmp_path, *extra):
    data = _dialogues(tmp_path / "chat.jsonl")
    return load_config(None, [f"out={tmp_path / 'run'}", "task=chat", f"data.path={data}", "data.tokenizer=bpe", "data.vocab_size=320", "data.max_length=96",
                              "model.dim=48", "model.n_layers=2", "model.n_heads=2", "model.ffn_dim=96",
                              "train.batch_size=16", "train.lr=3e-3", "train.warmup=10", "train.eval_every=1000",
                              "train.save_every=1000", "train.log_every=1000", *extra])


def test_only_assistant_tokens_have_labels(tmp_path):
    cfg = _config(tmp_path)
    data = load_data(cfg.data, "chat", 0)
    tok = data.tokenizer
    assert tok.chat_template is not None and tok.eos_token == "<|im_end|>"
    # dialogue i answers FACTS[i % 6], then FACTS[(5 i + 1) % 6]
    answers = {f"{FACTS[k][1]}<|im_end|>{FACTS[(5 * k + 1) % 6][1]}<|im_end|>" for k in range(6)}
    rows = data.splits["train"]
    for ids, labels in zip(rows["input_ids"], rows["labels"]):
        keep = labels != IGNORE
        labelled = "".join(tok.token_texts(labels[keep].tolist()))
        assert labelled in answers  # the replies and their end-of-turn markers, nothing else
        # labels are the next input token where they are set
        nxt = torch.cat([ids[1:], ids.new_tensor([-1])])
        assert torch.equal(labels[keep][:-1], nxt[keep][:-1])


def test_bad_lines_are_refused_with_file_and_line(tmp_path):
    path = tmp_path / "bad.jsonl"
    good = json.dumps({"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}]})
    for bad, why in [('{"messages": [{"role": "user"}]}', "messages\\[0\\] must be"),
                     ('{"messages": [{"role": "user", "content": "hi"}]}', "no assistant message"),
                     ("[1, 2]", "expected"), ("{not json", "not valid JSON")]:
        path.write_text(f"{good}\n\n{bad}\n")
        cfg = load_config(None, [f"out={tmp_path / 'run'}", "task=chat", f"data.path={path}"])
        with pytest.raises(DataError, match=f"bad.jsonl:3: .*{why}"):
            load_data(cfg.data, "chat", 0)
    cfg = load_config(None, [f"out={tmp_path / 'run'}", "task=chat", f"data.path={path}",
                             f"data.chat_template={tmp_path / 'missing.jinja'}"])
    path.write_text(good + "\n")
    with pytest.raises(DataError, match="data.chat_template"):
        load_data(cfg.data, "chat", 0)


def test_a_tiny_run_learns_and_the_output_chats(tmp_path, monkeypatch, capsys):
    cfg = _config(tmp_path, "train.steps=80")
    data = load_data(cfg.data, "chat", cfg.seed)
    torch.manual_seed(cfg.seed)
    before = evaluate("chat", build_model(cfg, data), data, "val", 16, 0)["loss"]
    result = fit(cfg, progress=False)
    assert result.metrics["loss"] < 0.5 * before, (before, result.metrics)
    out = result.out
    assert (out / "chat_template.jinja").is_file()
    model = qkv.load(out)
    assert model.tokenizer.chat_template is not None
    assert model.config.eos_token_id == model.tokenizer.tok.token_to_id("<|im_end|>")
    monkeypatch.setattr("sys.stdin", io.StringIO("what colour is the sky?\n"))
    assert main(["chat", "--model", str(out), "--max-new-tokens", "16"]) == 0
    reply = capsys.readouterr().out.strip()
    assert reply == "blue."
