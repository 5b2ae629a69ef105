"""``GET /``: the server's web page, where a person picks a model, types text (or uploads an image or a
clip) and sees the result and where each token looked; generation streams in, each new token's
attention shown as it arrives.

The page is four fixed files in ``static/`` (``index.html``, ``page.js``, ``page.css``,
``favicon.svg``), read once and served from memory: one route per file, so no path from a request is
ever joined to a folder, and any other name is a 404. The page calls the server's own JSON API (same
origin), and loads nothing from anywhere else: its Content-Security-Policy allows scripts, styles,
fetches and images from this origin only (plus ``blob:`` previews of the user's own upload), no
inline script, no frames, no forms posting elsewhere; the script writes every text with
``textContent``, so a model's or a user's ``<script>`` is shown, never run.
"""

from __future__ import annotations

from importlib import resources

from starlette.responses import Response
from starlette.routing import Route

CSP = ("default-src 'none'; script-src 'self'; style-src 'self'; connect-src 'self'; "
       "img-src 'self' blob:; media-src 'self' blob:; base-uri 'none'; form-action 'none'; "
       "frame-ancestors 'none'")
HEADERS = {"Content-Security-Policy": CSP, "X-Content-Type-Options": "nosniff", "Referrer-Policy": "no-referrer",
           "Cache-Control": "no-cache"}
FILES = {  # URL path -> (file in static/, media type)
    "/": ("index.html", "text/html; charset=utf-8"),
    "/static/page.js": ("page.js", "text/javascript; charset=utf-8"),
    "/static/page.css": ("page.css", "text/css; charset=utf-8"),
    "/static/favicon.svg": ("favicon.svg", "image/svg+xml"),
}
PUBLIC_PATHS = frozenset(FILES)  # the page's own files: no secrets, so they load before a key is typed


def _route(path: str, body: bytes, media_type: str) -> Route:
    async def endpoint(request):
        return Response(body, media_type=media_type, headers=HEADERS)

    return Route(path, endpoint, methods=["GET", "HEAD"], name=f"page:{path}")


def routes(ctx) -> list:
    """One route per file of the page (``ctx`` is unused: the page asks ``/v1/models`` what is served)."""
    folder = resources.files(__package__) / "static"
    return [_route(path, (folder / name).read_bytes(), media) for path, (name, media) in FILES.items()]
