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
