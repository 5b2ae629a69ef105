"""Errors in OpenAI's shape with the matching status, as the openai client raises them; the API key;
the bounded queue (429 with Retry-After); a disconnect mid-stream frees the request's slot."""

from __future__ import annotations

import json
import time

import httpx
import openai
import pytest
from chat_helpers import tiny_model

MSGS = [{"role": "user", "content": "hello there"}]


@pytest.fixture(scope="module")
def lm():
    return tiny_model(seed=1)


@pytest.fixture(scope="module")
def endless():
    """A model that never stops by itself (no stop token) and has room for long replies."""
    return tiny_model(seed=2, eos_token_id=None, max_positions=4096)


def _error(r: httpx.Response, status: int, param=None) -> dict:
    assert r.status_code == status, r.text
    err = r.json()["error"]
    assert set(err) == {"message", "type", "param", "code"} and err["message"]
    if param is not None:
        assert err["param"] == param, err
    return err


def test_openai_client_exceptions(serve, lm):
    live = serve({"tiny": lm}, max_tokens_limit=64, max_input_tokens=40)
    client = live.client()
    with pytest.raises(openai.NotFoundError) as e:
        client.chat.completions.create(model="gpt-4", messages=MSGS)
    assert e.value.body["param"] == "model" and "tiny" in e.value.message
    with pytest.raises(openai.BadRequestError) as e:
        client.chat.completions.create(model="tiny", messages=MSGS, temperature=3)
    assert e.value.body["param"] == "temperature"
    with pytest.raises(openai.BadRequestError) as e:
        client.completions.create(model="tiny", prompt="hi", max_tokens=65)
    assert e.value.body["param"] == "max_tokens"
    with pytest.raises(openai.BadRequestError) as e:
        client.completions.create(model="tiny", prompt="hello there " * 30)
    assert e.value.body["code"] == "context_length_exceeded"
    with pytest.raises(openai.BadRequestError) as e:
        client.chat.completions.create(model="tiny", messages=[{"role": "wizard", "content": "x"}])
    assert e.value.body["param"] == "messages[0].role"
    with pytest.raises(openai.BadRequestError) as e:
        client.embeddings.create(model="tiny", input="x")
    assert e.value.body["param"] == "model"


def test_bad_bodies(serve, lm):
    live = serve({"tiny": lm}, max_body_bytes=2000)
    url = live.url + "/v1/completions"
    _error(httpx.post(url, content=b"{not json", headers={"content-type": "application/json"}), 400)
    _error(httpx.post(url, json=[1, 2]), 400)
    _error(httpx.post(url, json={"model": "tiny", "prompt": "x" * 5000}), 413)
    for field, value in (("n", 0), ("top_p", 0), ("seed", -1), ("stop", ["a"] * 5), ("stream", "yes"),
                         ("presence_penalty", 9), ("logprobs", 3), ("echo", True), ("prompt", None),
                         ("max_tokens", 0), ("temperature", "hot")):
        _error(httpx.post(url, json={"model": "tiny", "prompt": "hello", field: value}), 400, param=field)
    _error(httpx.get(live.url + "/v1/nothing"), 404)
    _error(httpx.get(url), 405)
    assert httpx.get(live.url + "/v1/models/tiny").json()["id"] == "tiny"
    _error(httpx.get(live.url + "/v1/models/other"), 404)


def test_api_key(serve, lm):
    live = serve({"tiny": lm}, api_key="sk-right")
    assert httpx.get(live.url + "/health").json() == {"status": "ok"}  # no key needed
    err = _error(httpx.get(live.url + "/v1/models"), 401)
    assert err["type"] == "authentication_error"
    _error(httpx.get(live.url + "/v1/models", headers={"Authorization": "Bearer sk-wrong"}), 401)
    with pytest.raises(openai.AuthenticationError):
        live.client(api_key="sk-wrong").completions.create(model="tiny", prompt="hi", max_tokens=2)
    with pytest.raises(openai.AuthenticationError):
        live.client(api_key="sk-wrong").models.list()
    assert [m.id for m in live.client().models.list()] == ["tiny"]
    assert live.client().completions.create(model="tiny", prompt="hi", max_tokens=2).usage.completion_tokens == 2


def _wait(cond, timeout=10.0):
    deadline = time.monotonic() + timeout
    while not cond():
        if time.monotonic() > deadline:
            return False
        time.sleep(0.01)
    return True


def _events(r: httpx.Response):
    """The stream's events as they come. Keep the iterator: dropping it closes the connection."""
    return (json.loads(line[6:]) for line in r.iter_lines() if line.startswith("data: {"))


def _recording(engine) -> list:
    """The engine's requests, recorded as they are submitted."""
    seen, submit = [], engine.submit

    def record(*args, **kw):
        seen.append(submit(*args, **kw))
        return seen[-1]

    engine.submit = record
    return seen


def test_overload_gives_429_with_retry_after(serve, endless):
    live = serve({"long": endless}, max_queue=1, max_batch=1)
    engine = live.engine("long")
    seen = _recording(engine)
    body = {"model": "long", "prompt": "hello", "max_tokens": 4000, "temperature": 0, "stream": True}
    with (httpx.Client(base_url=live.url, timeout=30) as c1, httpx.Client(base_url=live.url, timeout=30) as c2,
          c1.stream("POST", "/v1/completions", json=body) as r1, c2.stream("POST", "/v1/completions", json=body) as r2):
        events = _events(r1)
        next(events)
        assert _wait(lambda: engine.batch_size == 1 and engine.pending == 1)  # one decoding, one waiting
        with pytest.raises(openai.RateLimitError) as e:
            live.client().completions.create(model="long", prompt="hi", max_tokens=4)
        assert e.value.response.headers["Retry-After"] == "1"
        assert e.value.body["code"] == "queue_full"
        next(events)
        assert r2.status_code == 200 and engine.pending == 1
    # both clients went away: the running one and the waiting one are cancelled, their slots freed
    assert _wait(lambda: engine.batch_size == 0 and engine.pending == 0)
    assert [r.finish_reason for r in seen] == ["cancelled", "cancelled"]
    assert 0 < len(seen[0].tokens) < 4000 and seen[1].tokens == []
    assert live.client().completions.create(model="long", prompt="hi", max_tokens=3).usage.completion_tokens == 3


def test_disconnect_mid_stream_cancels_the_request(serve, endless):
    live = serve({"long": endless})
    engine = live.engine("long")
    seen = _recording(engine)
    for route, body in (("/v1/completions", {"prompt": "hello"}), ("/v1/chat/completions", {"messages": MSGS})):
        body = {**body, "model": "long", "max_tokens": 4000, "temperature": 0, "stream": True}
        with httpx.Client(base_url=live.url, timeout=30) as client, client.stream("POST", route, json=body) as r:
            events = _events(r)
            for _ in range(3):
                next(events)
            assert engine.batch_size == 1
        assert _wait(lambda: engine.batch_size == 0 and engine.pending == 0, timeout=5)
        assert seen[-1].finish_reason == "cancelled" and len(seen[-1].tokens) < 4000
    # a non-streamed request whose client gives up is cancelled too
    with pytest.raises(httpx.ReadTimeout):
        httpx.post(live.url + "/v1/completions", json={**body, "stream": False, "prompt": "x"}, timeout=0.5)
    assert _wait(lambda: engine.batch_size == 0 and engine.pending == 0, timeout=5)
    assert seen[-1].finish_reason == "cancelled" and len(seen) == 3
    r = httpx.post(live.url + "/v1/completions", json={"model": "long", "prompt": "hi", "max_tokens": 3})
    assert r.json()["usage"]["completion_tokens"] == 3


def test_each_model_serves_its_kind(serve, lm, tiny_encoder):
    plain = tiny_model(template=None, seed=1)
    live = serve({"chat": lm, "plain": plain, "enc": tiny_encoder})
    client = live.client()
    assert sorted(m.id for m in client.models.list()) == ["chat", "enc", "plain"]
    assert client.completions.create(model="plain", prompt="hello", max_tokens=5, temperature=0).choices[0].text == \
        plain.generate("hello", max_new_tokens=5)
    with pytest.raises(openai.BadRequestError, match="chat template"):
        client.chat.completions.create(model="plain", messages=MSGS)
    with pytest.raises(openai.BadRequestError, match="TextEncoder"):
        client.completions.create(model="enc", prompt="hello")
    _error(httpx.post(live.url + "/v1/completions", json={"prompt": "hi"}), 400, param="model")  # which one?
    one = serve({"enc": tiny_encoder})  # a single model needs no name
    assert len(httpx.post(one.url + "/v1/embeddings", json={"input": "hi"}).json()["data"]) == 1
    from qkv.models import VisionTransformer, ViTConfig
    from qkv.serve import create_app

    with pytest.raises(ValueError, match="VisionTransformer"):
        create_app({"vit": VisionTransformer(ViTConfig(image_size=16, patch_size=8, dim=16, n_layers=1,
                                                       n_heads=2, ffn_dim=32))})


def test_a_failing_model_gives_500_and_the_server_keeps_serving(serve):
    broken = tiny_model(seed=4)
    live = serve({"broken": broken})

    def fail(*args, **kw):
        raise RuntimeError("out of memory (simulated)")

    broken.forward = fail
    with pytest.raises(openai.InternalServerError, match="simulated"):
        live.client().completions.create(model="broken", prompt="hello", max_tokens=4)
    with httpx.stream("POST", live.url + "/v1/completions", json={"model": "broken", "prompt": "hello",
                                                                   "stream": True}) as r:
        events = list(_events(r))
    assert r.status_code == 200 and "simulated" in events[-1]["error"]["message"]
    del broken.forward  # healthy again: the engine recovered from the failed steps
    r = live.client().completions.create(model="broken", prompt="hello", max_tokens=4, temperature=0)
    assert r.choices[0].text == broken.generate("hello", max_new_tokens=4)
