"""Headless Chromium (Debian's, driven by Playwright) for tests of the HTML pages."""

import contextlib
import shutil

import pytest

ARGS = ["--no-sandbox", "--disable-gpu", "--disable-background-networking", "--disable-component-update",
        "--disable-sync", "--no-first-run", "--disable-quic"]


@contextlib.contextmanager
def page(viewport=(1400, 900)):
    """A fresh page; ``page.errors`` collects console errors, page errors and dialogs (alert() etc.)."""
    sync = pytest.importorskip("playwright.sync_api", reason="browser tests need playwright: pip install -e '.[test]'")
    exe = shutil.which("chromium") or shutil.which("chromium-browser")
    if exe is None:
        pytest.skip("browser tests need Chromium: apt-get install chromium")
    with sync.sync_playwright() as p:
        browser = p.chromium.launch(executable_path=exe, args=ARGS)
        try:
            pg = browser.new_page(viewport={"width": viewport[0], "height": viewport[1]})
            pg.errors = []
            pg.dialogs = []
            pg.on("console", lambda m: pg.errors.append(m.text) if m.type == "error" else None)
            pg.on("pageerror", lambda e: pg.errors.append(str(e)))
            pg.on("dialog", lambda d: (pg.dialogs.append(d.message), d.dismiss()))
            yield pg
        finally:
            browser.close()
