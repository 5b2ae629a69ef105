"""`qkv bench engines`: a missing engine skips its rows with the reason; the table reports the rest."""

import builtins

from qkv.cli import bench_engines


def test_missing_engine_skips_its_rows_with_the_reason(monkeypatch):
    real = builtins.__import__

    def no_ct2(name, *a, **k):
        if name.startswith("ctranslate2"):
            raise ImportError("No module named 'ctranslate2'")
        return real(name, *a, **k)

    monkeypatch.setattr(builtins, "__import__", no_ct2)
    result = bench_engines.run(quick=True, only="gpt2")
    assert [r["case"] for r in result["rows"]] == ["gpt2"]
    assert "skipped" in result["rows"][0]["check"] and "ctranslate2" in result["rows"][0]["check"]
    assert bench_engines.format_table(result) == "gpt2: skipped: No module named 'ctranslate2'"


def test_table_has_a_row_per_precision():
    rows = [{"case": f"GPT-2 {p}", "baseline": f"CTranslate2 {p}", "baseline_per_s": 50.0, "qkv_per_s": 55.0,
             "speedup": 1.1, "unit": "tokens/s", "check": "tokens = qkv fp32: 10/10"} for p in ("float32", "int8")]
    table = bench_engines.format_table({"rows": rows}, markdown=True)
    assert table.count("\n") == 3 and "1.10x" in table and "CTranslate2 int8" in table
