"""``GET /``, the web page: its routes over plain HTTP (types, CSP, fixed file names), then the page in
headless Chromium: it loads with no console errors and no request off the server, an embedding shows
its tokens and the hovered token's attention equals the API's, a chat reply streams in with its
attention rows, crafted text is shown and never run, and an API key typed in the page is used."""

from __future__ import annotations

from urllib.parse import urlsplit

import httpx
import pytest
from browser import page as browser_page
from chat_helpers import tiny_model

CRAFTED = ["<img src=x onerror=alert(1)>", "</script><script>alert(1)</script>"]


@pytest.fixture(scope="module")
def lm():
    return tiny_model(seed=3)


@pytest.fixture
def live(serve, tiny_encoder, lm):
    return serve({"enc": tiny_encoder, "chat": lm})


@pytest.fixture
def page(live):
    """The page of ``live`` in Chromium, with ``page.requests``: every URL it asked for."""
    with browser_page() as pg:
        pg.requests = []
        pg.on("request", lambda r: pg.requests.append(r.url))
        yield pg


def open_page(pg, url: str):
    pg.goto(url + "/")
    pg.wait_for_function("() => document.querySelectorAll('#model option').length > 0")


def run(pg, model: str, task: str, text: str, **fields):
    pg.select_option("#model", model)
    pg.select_option("#task", task)
    for selector, value in fields.items():
        pg.fill(f"#{selector.replace('_', '-')}", str(value))
    pg.fill("#text", text)
    pg.click("#run")
    pg.wait_for_function("() => document.getElementById('status').textContent === '' && "
                         "!document.getElementById('run').disabled")


def token_texts(pg) -> list[str]:
    return pg.eval_on_selector_all("#tokens .tok", "spans => spans.map(s => s.textContent)")


def weights(pg) -> list[float | None]:
    return pg.eval_on_selector_all(
        "#tokens .tok", "spans => spans.map(s => s.dataset.weight === undefined ? null : Number(s.dataset.weight))")


def embed_attention(url: str, text: str, headers=None) -> dict:
    body = {"model": "enc", "input": text, "qkv": {"attention": {"layers": [-1], "topk": 8}}}
    r = httpx.post(url + "/v1/embeddings", json=body, headers=headers, timeout=30)
    r.raise_for_status()
    return r.json()["data"][0]["qkv"]["attention"]


def assert_clean(pg, origin: str):
    assert pg.errors == [] and pg.dialogs == [], (pg.errors, pg.dialogs, pg.browser_version)
    outside = [u for u in pg.requests if urlsplit(u)[:2] != urlsplit(origin)[:2]]
    assert outside == [], outside


# --- plain HTTP -----------------------------------------------------------------------------------

def test_routes_types_and_csp(live):
    r = httpx.get(live.url + "/")
    assert r.status_code == 200 and r.headers["content-type"].startswith("text/html")
    csp = r.headers["content-security-policy"]
    assert "default-src 'none'" in csp and "script-src 'self'" in csp and "unsafe-inline" not in csp
    assert "connect-src 'self'" in csp and r.headers["x-content-type-options"] == "nosniff"
    assert '<script src="/static/page.js"' in r.text and "<script>" not in r.text  # no inline script
    for path, kind in (("/static/page.js", "text/javascript"), ("/static/page.css", "text/css"),
                       ("/static/favicon.svg", "image/svg+xml")):
        r = httpx.get(live.url + path)
        assert r.status_code == 200 and r.headers["content-type"].startswith(kind), path
        assert r.headers["content-security-policy"] == csp
    assert httpx.head(live.url + "/").status_code == 200
    for path in ("/static/index.html", "/static/page.py", "/static/../page.py", "/static/%2e%2e/page.py",
                 "/static/", "/static/page.js/x", "/index.html", "/page.js"):
        r = httpx.get(live.url + path)
        assert r.status_code == 404, path
        assert "error" in r.json()


# --- in the browser -------------------------------------------------------------------------------

def test_embedding_tokens_and_hovered_attention(live, page):
    open_page(page, live.url)
    assert page.eval_on_selector_all("#model option", "os => os.map(o => o.value)") == ["enc", "chat"]
    assert page.eval_on_selector_all("#task option", "os => os.map(o => o.value)") == ["embeddings"]
    text = "the sky is blue and the grass is green"
    run(page, "enc", "embeddings", text)
    want = embed_attention(live.url, text)
    assert token_texts(page) == want["texts"]
    assert "dimension 32" in page.text_content("#summary")
    layer = want["layers"][-1]
    assert page.input_value("#layer") == str(layer["layer"])
    for q in (0, 3, len(want["texts"]) - 1):
        page.hover(f"#tokens .tok[data-pos='{q}']")
        mean = [sum(h[q][k] for h in layer["weights"]) / len(layer["heads"]) for k in range(len(want["texts"]))]
        assert weights(page) == pytest.approx(mean, rel=1e-6, abs=1e-9)
    page.select_option("#head", "1")  # one head: its row exactly
    assert weights(page) == pytest.approx(layer["weights"][1][q], rel=1e-6, abs=1e-9)
    page.click("#tokens .tok[data-pos='2']")  # pinned: hovering elsewhere changes nothing
    pinned = weights(page)
    page.hover("#tokens .tok[data-pos='0']")
    assert weights(page) == pinned == pytest.approx(layer["weights"][1][2], rel=1e-6, abs=1e-9)
    assert_clean(page, live.url)


def test_chat_reply_streams_with_attention(live, page, lm):
    open_page(page, live.url)
    page.select_option("#model", "chat")
    assert page.eval_on_selector_all("#task option", "os => os.map(o => o.value)") == ["completions", "chat"]
    page.evaluate("""() => { window.replyLengths = [];  // the reply's length at each change: it grows
        new MutationObserver(() => replyLengths.push(document.getElementById('reply').textContent.length))
            .observe(document.getElementById('reply'), {childList: true, subtree: true, characterData: true}); }""")
    run(page, "chat", "chat", "hello there", max_tokens=8)
    reply = page.text_content("#reply")
    lengths = page.evaluate("replyLengths")
    assert reply and len(lengths) > 1 and lengths == sorted(lengths), lengths
    prompt = lm.tokenizer.apply_chat_template([{"role": "user", "content": "hello there"}], add_generation_prompt=True)
    texts = token_texts(page)
    n_prompt = page.eval_on_selector_all("#tokens .tok.prompt", "s => s.length")
    assert n_prompt == len(prompt) and len(prompt) < len(texts) <= len(prompt) + 8
    assert "".join(texts[:n_prompt]).replace("↵", "\n") == lm.tokenizer.decode(prompt, skip_special_tokens=False)
    # the newest row is shown as it arrives: where the last token read looked, over the keys before it
    w = weights(page)
    last = len(texts) - 1
    assert page.get_attribute(f"#tokens .tok[data-pos='{last}']", "class") == "tok focus"
    assert sum(w) == pytest.approx(1.0, abs=1e-5) and all(x is not None for x in w)
    page.hover("#tokens .tok[data-pos='1']")  # a prompt row: causal, so only keys 0 and 1
    w = weights(page)
    assert w[0] + w[1] == pytest.approx(1.0, abs=1e-5) and not any(w[2:])
    assert_clean(page, live.url)


def test_crafted_text_is_shown_never_run(live, page):
    open_page(page, live.url)
    for text in CRAFTED:
        run(page, "enc", "embeddings", text)
        assert "".join(token_texts(page)) == text  # every character shown as text
        run(page, "chat", "chat", text, max_tokens=4)
        assert text in "".join(token_texts(page))  # the prompt's tokens, as text
    counts = page.evaluate("""() => ({img: document.querySelectorAll('img').length,
        scripts: document.scripts.length, inTokens: document.querySelectorAll('#tokens *:not(.tok)').length})""")
    assert counts == {"img": 0, "scripts": 1, "inTokens": 0}
    # even HTML put in the page by script would not run: the CSP refuses inline script
    page.evaluate("""() => { const d = document.createElement('div');
        d.innerHTML = '<img src="data:," onerror=alert(1)>'; document.body.append(d);
        const s = document.createElement('script'); s.textContent = 'alert(2)'; document.body.append(s); }""")
    page.wait_for_timeout(200)
    assert page.dialogs == []
    assert page.errors and all("Content Security Policy" in e for e in page.errors), [e[:300] for e in page.errors]


def test_api_key_typed_in_the_page(serve, tiny_encoder):
    live = serve({"enc": tiny_encoder}, api_key="sk-page")
    r = httpx.get(live.url + "/")  # the page's own files hold no secret: they load before a key is typed
    assert r.status_code == 200, "app._Auth must let page.PUBLIC_PATHS through without a key"
    assert httpx.get(live.url + "/v1/models").status_code == 401
    with browser_page() as pg:
        pg.goto(live.url + "/")
        pg.wait_for_selector("#error:not([hidden])")
        assert "missing or wrong API key" in pg.text_content("#error")
        assert pg.eval_on_selector_all("#model option", "os => os.length") == 0
        pg.fill("#key", "sk-wrong")
        pg.click("#key-form button")
        pg.wait_for_function("() => document.getElementById('error').textContent.includes('401')")
        pg.fill("#key", "sk-page")
        pg.click("#key-form button")
        pg.wait_for_function("() => document.querySelectorAll('#model option').length > 0")
        assert pg.is_hidden("#error")
        run(pg, "enc", "embeddings", "hello there")
        want = embed_attention(live.url, "hello there", headers={"Authorization": "Bearer sk-page"})
        assert token_texts(pg) == want["texts"]
        assert pg.evaluate("sessionStorage.getItem('qkv-key')") == "sk-page"
        # the only console errors are the browser's notes of the refused requests
        assert pg.errors and all("status of 401" in e for e in pg.errors), pg.errors
        assert pg.dialogs == []
