"""Errors in OpenAI's shape: ``{"error": {"message", "type", "param", "code"}}`` with the matching status."""

from __future__ import annotations

import json

import numpy as np
from starlette.responses import JSONResponse

try:  # orjson (the serve extra) encodes a float list ~6x faster than json: embeddings are mostly floats
    import orjson
except ImportError:  # pragma: no cover -- the standard library's encoder
    orjson = None


class FastJSON(JSONResponse):
    """`JSONResponse` encoded by orjson when it is installed (same JSON, compact, UTF-8). NumPy arrays
    in ``content`` become lists (float32 ones written at float32's shortest round-trip precision)."""

    def render(self, content) -> bytes:
        if orjson is None:
            return json.dumps(content, ensure_ascii=False, allow_nan=False, separators=(",", ":"),
                              default=_plain).encode("utf-8")
        return orjson.dumps(content, option=orjson.OPT_SERIALIZE_NUMPY)


def _plain(value):
    if isinstance(value, np.ndarray):
        return value.tolist()
    raise TypeError(f"{type(value).__name__} is not JSON serializable")

_TYPES = {400: "invalid_request_error", 401: "authentication_error", 404: "not_found_error",
          405: "invalid_request_error", 413: "invalid_request_error", 429: "rate_limit_error",
          500: "server_error", 503: "server_error"}


class APIError(Exception):
    """A request the server refuses: ``status`` (4xx/5xx), a message that says the fix, the request field
    at fault (``param``) and a short machine-readable ``code``."""

    def __init__(self, status: int, message: str, *, param: str | None = None, code: str | None = None,
                 headers: dict[str, str] | None = None):
        super().__init__(message)
        self.status, self.message, self.param, self.code = status, message, param, code
        self.headers = headers or {}

    def body(self) -> dict:
        return {"error": {"message": self.message, "type": _TYPES.get(self.status, "invalid_request_error"),
                          "param": self.param, "code": self.code}}

    def response(self) -> JSONResponse:
        return JSONResponse(self.body(), status_code=self.status, headers=self.headers)


def bad_field(param: str, message: str) -> APIError:
    """400 naming the request field."""
    return APIError(400, f"{param}: {message}", param=param, code="invalid_value")
