"""A live server in-process: uvicorn on 127.0.0.1 and a free port, in a thread, shut down after the test."""

from __future__ import annotations

import contextlib
import socket
import threading
import time

import pytest

pytest.importorskip("starlette", reason="the server needs the serve extra: pip install -e '.[serve]'")
uvicorn = pytest.importorskip("uvicorn", reason="the server needs the serve extra: pip install -e '.[serve]'")
openai = pytest.importorskip("openai", reason="the client tests need the test extra: pip install -e '.[test]'")


class Live:
    def __init__(self, app, port: int, api_key: str | None):
        self.app, self.port, self.api_key = app, port, api_key
        self.url = f"http://127.0.0.1:{port}"

    def client(self, **kw):
        kw.setdefault("api_key", self.api_key or "none")
        kw.setdefault("max_retries", 0)
        kw.setdefault("timeout", 30)
        return openai.OpenAI(base_url=self.url + "/v1", **kw)

    def engine(self, name: str):
        return self.app.state.served[name].engine


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextlib.contextmanager
def live_server(models: dict, **options):
    from qkv.serve import create_app

    app = create_app(models, **options)
    port = _free_port()
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning",
                                           timeout_graceful_shutdown=5))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 20
    while not server.started:
        if not thread.is_alive() or time.monotonic() > deadline:
            raise RuntimeError("the test server did not start")
        time.sleep(0.01)
    try:
        yield Live(app, port, options.get("api_key"))
    finally:
        server.should_exit = True
        thread.join(15)


@pytest.fixture
def serve():
    """``serve(models, **create_app options)``: a live server, stopped when the test ends."""
    stack = contextlib.ExitStack()
    with stack:
        yield lambda models, **kw: stack.enter_context(live_server(models, **kw))


@pytest.fixture
def tiny_encoder():
    """A random 2-layer sentence encoder with the tiny byte-level BPE tokenizer."""
    import torch
    from chat_helpers import tiny_tokenizer

    from qkv.models import TextEncoder, TextEncoderConfig

    tok = tiny_tokenizer(None)
    torch.manual_seed(0)
    cfg = TextEncoderConfig(vocab_size=tok.vocab_size, dim=32, n_layers=2, n_heads=2, ffn_dim=64, max_positions=64,
                            max_length=64, pad_token_id=tok.pad_id)
    model = TextEncoder(cfg).init_weights().eval()
    model.tokenizer = tok
    return model
