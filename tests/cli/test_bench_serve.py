"""`qkv bench serve` on tiny random models: the report has its fields, sane values, and no server outlives it."""

import math

import pytest

pytest.importorskip("uvicorn", reason="the server needs the serve extra: pip install -e '.[serve]'")
pytest.importorskip("httpx", reason="the load generator needs httpx: pip install -e '.[test]'")

from qkv.cli import bench_serve, main  # noqa: E402


@pytest.fixture
def servers(monkeypatch):
    """The server processes the bench starts, to check that each has exited."""
    started = []

    class Tracked(bench_serve.Server):
        def __init__(self, *a, **kw):
            super().__init__(*a, **kw)
            started.append(self.proc)

    monkeypatch.setattr(bench_serve, "Server", Tracked)
    return started


def test_quick_tiny_report(servers):
    result = bench_serve.run(quick=True, tiny=True, soak_seconds=3)
    emb = result["embeddings"]
    assert {(r["per_request"], r["clients"]) for r in emb if r["impl"] == "qkv serve"} == \
        {(k, c) for k in (1, 8) for c in (1, 4, 16)}
    for r in emb:
        assert r["per_s"] > 0
        if r["impl"] != "in-process model.embed (batch 32)":
            assert 0 < r["p50_ms"] <= r["p99_ms"] and r["vs_inproc"] > 0
    assert all(r["ratio"] > 0 for r in result["attention"])
    for r in result["chat"]:
        assert r["ttft_ms"] > 0 and r["stream_tok_s"] > 0 and r["aggregate_tok_s"] > 0
        assert 1 <= r["min_tokens"] <= r["max_tokens"]
    soak = result["soak"]
    assert soak["unintended_5xx"] == 0 and soak["lost"] == 0, soak["lost_examples"]
    assert soak["health_at_end"] == 200 and soak["requests"] > 0
    status = soak["status"]
    assert status.get("200", 0) > 0 and status.get("400", 0) > 0 and status.get("413", 0) > 0
    assert math.isfinite(soak["rss_growth_pct"]) and soak["rss_start_mb"] > 0
    table = bench_serve.format_table(result, markdown=True)
    assert "| qkv serve | 8 | 16 |" in table and "lost (target 0)" in table
    assert len(servers) == 5 and all(p.poll() is not None for p in servers)


def test_only_chooses_a_part(servers, capsys):
    assert main(["bench", "serve", "--only", "nothing"]) != 0
    assert "choose embeddings, chat or soak" in capsys.readouterr().err
    assert servers == []
