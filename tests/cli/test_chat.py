"""`qkv chat`: piped multi-turn input, /reset, /exit, --explain, --json, and refusals that name the fix."""

from __future__ import annotations

import io
import json

import pytest
from chat_helpers import CHATML, tiny_folder

import qkv
from qkv.cli import main
from qkv.explain.tokens import terminal_safe
from qkv.models.conversation import Conversation


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    return tiny_folder(tmp_path_factory.mktemp("chat") / "model")


def _chat(monkeypatch, capsys, lines: str, *argv):
    monkeypatch.setattr("sys.stdin", io.StringIO(lines))
    code = main(["chat", *argv])
    out = capsys.readouterr()
    return code, out.out, out.err


def test_piped_turns_reset_and_exit(folder, monkeypatch, capsys):
    conv = Conversation(qkv.load(folder), system="be brief", max_new_tokens=8)
    first, second = conv.reply("hello there"), conv.reply("tell me a story")
    code, out, err = _chat(monkeypatch, capsys, "hello there\ntell me a story\n/reset\nhello there\n/exit\nnever\n",
                           "--model", str(folder), "--system", "be brief", "--max-new-tokens", "8")
    assert code == 0, err
    # /reset: the same first reply again; /exit: nothing after; controls in replies shown as stand-ins
    assert out == "".join(terminal_safe(r) + "\n" for r in (first, second, first))
    assert "(conversation cleared)" in err


def test_json_reports_the_cache_reuse(folder, monkeypatch, capsys):
    code, out, err = _chat(monkeypatch, capsys, "hello there\ntell me a story\n", "--model", str(folder),
                           "--max-new-tokens", "6", "--json")
    assert code == 0, err
    rows = [json.loads(line) for line in out.splitlines()]
    assert [r["user"] for r in rows] == ["hello there", "tell me a story"]
    assert rows[0]["reused_tokens"] == 0 and rows[0]["prefilled_tokens"] == rows[0]["prompt_tokens"]
    assert rows[1]["reused_tokens"] >= rows[0]["prompt_tokens"]  # turn 2 reuses the whole first prompt
    assert rows[1]["prefilled_tokens"] == rows[1]["prompt_tokens"] - rows[1]["reused_tokens"]


def test_explain_lists_earlier_tokens(folder, monkeypatch, capsys):
    code, out, err = _chat(monkeypatch, capsys, "hello there\n", "--model", str(folder), "--max-new-tokens", "6",
                           "--explain", "4")
    assert code == 0, err
    lines = out.splitlines()
    at = next(i for i, l in enumerate(lines) if l.startswith("attended to most"))
    rows = lines[at + 1:]
    assert len(rows) == 4
    conv = Conversation(qkv.load(folder), max_new_tokens=6)
    conv.reply("hello there")
    want = conv.attention_of_last_reply(top=4)
    for row, a in zip(rows, want):
        assert row.strip().startswith(f"{a.score:.4f}") and row.endswith(f"(position {a.position})")
    assert "\n" not in "".join(rows) and all(r.isprintable() for r in rows)  # newline tokens shown as ⏎


def test_context_full_is_reported_and_too_long_refused(folder, monkeypatch, capsys):
    lines = "".join(f"{t}\n" for t in ["hello there", "how are you", "tell me a story", "what is the sky"])
    code, out, err = _chat(monkeypatch, capsys, lines + "the sky is blue and green " * 20 + "\nthank you\n",
                           "--model", str(folder), "--max-new-tokens", "6", "--max-context", "64")
    assert code == 2  # one message refused, the conversation went on
    assert "context full: dropped the oldest" in err
    assert "the message is" in err and "64-token context" in err
    assert len(out.splitlines()) == 5


def test_refusals_name_the_fix(tmp_path, monkeypatch, capsys):
    bare = tiny_folder(tmp_path / "bare", template=None)
    code, out, err = _chat(monkeypatch, capsys, "hi\n", "--model", str(bare))
    assert code == 2 and "no chat template" in err and "--template FILE" in err
    (tmp_path / "chatml.jinja").write_text(CHATML)
    code, out, err = _chat(monkeypatch, capsys, "hello there\n", "--model", str(bare), "--template",
                           str(tmp_path / "chatml.jinja"), "--max-new-tokens", "4")
    assert code == 0 and len(out.splitlines()) == 1, err
    (bare / "tokenizer.json").unlink()
    code, out, err = _chat(monkeypatch, capsys, "hi\n", "--model", str(bare))
    assert code == 2 and "no tokenizer" in err
    code, out, err = _chat(monkeypatch, capsys, "hi\n", "--model", str(bare), "--max-new-tokens", "0")
    assert code == 2 and "--max-new-tokens" in err
