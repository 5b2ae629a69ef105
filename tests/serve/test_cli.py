"""`qkv serve` as the README starts it: a model folder, a port, an API key; SIGTERM lets the running
stream finish, then the process exits."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx
import openai
import pytest
from chat_helpers import tiny_folder

import qkv
from qkv.cli import build_parser
from qkv.cli.serve import model_specs


def test_model_specs_and_defaults():
    assert model_specs(["all-MiniLM-L6-v2", "chat=/models/x", "runs/folder/", "/a=b/c"]) == {
        "all-MiniLM-L6-v2": "all-MiniLM-L6-v2", "chat": "/models/x", "folder": "runs/folder/", "c": "/a=b/c"}
    with pytest.raises(ValueError, match="twice"):
        model_specs(["a=x", "a=y"])
    args = build_parser().parse_args(["serve", "--model", "m"])
    assert (args.host, args.port, args.api_key) == ("127.0.0.1", 8000, None)  # this machine only, unless told


def _port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture
def folder():
    """The tiny chat model as a folder, removed afterwards."""
    with tempfile.TemporaryDirectory() as tmp:
        yield tiny_folder(Path(tmp) / "tiny")


def test_serve_command_and_sigterm(folder):
    port = _port()
    env = {**os.environ, "QKV_API_KEY": ""}
    proc = subprocess.Popen([sys.executable, "-m", "qkv.cli", "serve", "--model", f"tiny={folder}", "--port",
                             str(port), "--api-key", "sk-cli", "--log-level", "warning"],
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, env=env)
    try:
        url = f"http://127.0.0.1:{port}"
        deadline = time.monotonic() + 30
        while True:
            try:
                if httpx.get(url + "/health", timeout=1).status_code == 200:
                    break
            except httpx.TransportError:
                pass
            assert proc.poll() is None, proc.stderr.read().decode()
            assert time.monotonic() < deadline, "qkv serve did not start"
            time.sleep(0.1)
        lm = qkv.load(folder)
        client = openai.OpenAI(base_url=url + "/v1", api_key="sk-cli", max_retries=0)
        r = client.completions.create(model="tiny", prompt="hello there", max_tokens=10, temperature=0)
        assert r.choices[0].text == lm.generate("hello there", max_new_tokens=10)
        with pytest.raises(openai.AuthenticationError):
            openai.OpenAI(base_url=url + "/v1", api_key="wrong", max_retries=0).models.list()
        body = {"model": "tiny", "messages": [{"role": "user", "content": "hello"}], "max_tokens": 200,
                "temperature": 0, "stream": True}
        with httpx.stream("POST", url + "/v1/chat/completions", json=body, timeout=30,
                          headers={"Authorization": "Bearer sk-cli"}) as stream:
            lines = stream.iter_lines()
            first = next(line for line in lines if line.startswith("data: "))
            proc.send_signal(signal.SIGTERM)  # graceful: the running stream still finishes
            rest = [line for line in lines if line.startswith("data: ")]
        assert rest[-1] == "data: [DONE]"
        text = "".join(json.loads(x[6:])["choices"][0]["delta"].get("content", "") for x in [first] + rest[:-1])
        assert text == lm.chat(body["messages"], max_new_tokens=200)
        assert proc.wait(timeout=30) in (0, -signal.SIGTERM)  # uvicorn re-raises the signal once shut down
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        proc.stderr.close()


def test_serve_refuses_what_it_cannot_serve():
    r = subprocess.run([sys.executable, "-m", "qkv.cli", "serve", "--model", "/nonexistent/qkv-model", "--port",
                        str(_port())], check=False, capture_output=True, text=True, timeout=60)
    assert r.returncode == 2 and "qkv serve:" in r.stderr
