"""`qkv serve`: qkv models behind an OpenAI-compatible HTTP API (Starlette on uvicorn; the ``serve`` extra).

    app = qkv.serve.create_app({"minilm": qkv.load("all-MiniLM-L6-v2"), "chat": qkv.load("path/to/chat")})

Routes: ``GET /health``, ``GET /v1/models``, ``POST /v1/embeddings``, ``POST /v1/completions``,
``POST /v1/chat/completions`` (``stream`` as server-sent events); errors in OpenAI's shape.
"""

from .app import create_app
from .errors import APIError

__all__ = ["APIError", "create_app"]
