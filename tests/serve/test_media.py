"""/v1/classify for a text classifier equals in-process ``model.classify``; bad inputs are refused by name."""

from __future__ import annotations

import httpx
import pytest
import torch
from chat_helpers import tiny_tokenizer

from qkv.models import TextEncoder, TextEncoderConfig


@pytest.fixture
def classifier():
    tok = tiny_tokenizer(None)
    torch.manual_seed(1)
    cfg = TextEncoderConfig(vocab_size=tok.vocab_size, dim=32, n_layers=2, n_heads=2, ffn_dim=64, max_positions=64,
                            max_length=64, pad_token_id=tok.pad_id, head="sequence_classification", num_labels=3,
                            labels=["neg", "neu", "pos"])
    model = TextEncoder(cfg).init_weights().eval()
    model.tokenizer = tok
    return model


def test_text_classify_equals_model_classify(serve, classifier):
    live = serve({"cls": classifier})
    texts = ["the sky is blue", "hello there, how are you today?"]
    r = httpx.post(live.url + "/v1/classify", json={"model": "cls", "input": texts}, timeout=30)
    assert r.status_code == 200, r.text
    ref = classifier.classify(texts)
    for item, want in zip(r.json()["data"], ref):
        assert item["label"] == want["label"]
        assert abs(item["score"] - want["score"]) < 1e-5
    models = httpx.get(live.url + "/v1/models").json()["data"]
    assert models[0]["qkv"]["tasks"] == ["classify"]


def test_classify_refuses_bad_input_by_name(serve, classifier):
    live = serve({"cls": classifier})
    r = httpx.post(live.url + "/v1/classify", json={"model": "cls", "input": 3})
    assert r.status_code == 400 and r.json()["error"]["param"] == "input"
    r = httpx.post(live.url + "/v1/classify", json={"model": "cls", "file": "/etc/passwd"})
    assert r.status_code == 400
