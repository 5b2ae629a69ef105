"""Headless Chromium (Debian's, driven by Playwright) for tests of the HTML pages.

Nothing here depends on one Chromium build: the browser is whatever `chromium`
is on PATH, driven through the Chrome DevTools protocol that every build speaks,
and its version is reported in pytest's header and in every failure message.
"""

import contextlib
import functools
import shutil
import subprocess

import pytest

USED = False  # set once a test has opened a page (conftest reports the version at the end)
ARGS = ["--no-sandbox", "--disable-gpu", "--disable-background-networking", "--disable-component-update",
        "--disable-sync", "--no-first-run", "--disable-quic"]


def executable() -> str | None:
    return shutil.which("chromium") or shutil.which("chromium-browser")


@functools.lru_cache(maxsize=1)
def version() -> str:
    """``Chromium 156.0.8078.114 ...`` as the browser reports it, or why there is none."""
    exe = executable()
    if exe is None:
        return "no chromium on PATH (apt-get install chromium)"
    try:
        out = subprocess.run([exe, "--version"], capture_output=True, text=True, timeout=30).stdout.strip()
    except (OSError, subprocess.SubprocessError) as e:
        return f"{exe}: --version failed ({e})"
    return f"{exe}: {out.splitlines()[0] if out else 'unknown version'}"


@contextlib.contextmanager
def page(viewport=(1400, 900)):
    """A fresh page; ``page.errors`` collects console errors, page errors and dialogs (alert() etc.)."""
    sync = pytest.importorskip("playwright.sync_api", reason="browser tests need playwright: pip install -e '.[test]'")
    exe = executable()
    if exe is None:
        pytest.skip("browser tests need Chromium: apt-get install chromium")
    global USED
    USED = True
    with sync.sync_playwright() as p:
        browser = p.chromium.launch(executable_path=exe, args=ARGS)
        try:
            pg = browser.new_page(viewport={"width": viewport[0], "height": viewport[1]})
            pg.set_default_timeout(10_000)
            pg.errors = []
            pg.dialogs = []
            pg.browser_version = f"{version()} (protocol {browser.version})"
            pg.on("console", lambda m: pg.errors.append(m.text) if m.type == "error" else None)
            pg.on("pageerror", lambda e: pg.errors.append(str(e)))
            pg.on("dialog", lambda d: (pg.dialogs.append(d.message), d.dismiss()))
            yield pg
        finally:
            browser.close()
