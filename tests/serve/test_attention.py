"""Attention on request (``"qkv": {"attention": {...}}``): embeddings, completions and chat return the
exact attention of what they computed, equal to `qkv.explain` on the same input; asking costs
nothing to those who do not ask; bad options are refused by name."""

from __future__ import annotations

import json

import httpx
import pytest
import torch
from chat_helpers import tiny_model

import qkv

SPECS = [{}, {"layers": [-1], "topk": 8}, {"layers": [0], "heads": [1]}, {"topk": 3, "full": False},
         {"layers": -1, "heads": 0, "full": True}]


def _layers_equal(got: list[dict], ref: list[dict]):
    assert [(e["layer"], e["heads"]) for e in got] == [(e["layer"], e["heads"]) for e in ref]
    for g, r in zip(got, ref):
        assert set(g) == set(r)
        for key in ("weights", "topk_values"):
            if key in r:
                torch.testing.assert_close(torch.tensor(g[key]), torch.tensor(r[key]), atol=3e-6, rtol=1e-4)
        if "topk_indices" in r:
            same = torch.tensor(g["topk_indices"]) == torch.tensor(r["topk_indices"])
            assert same.float().mean() > 0.98  # exact ties may order differently


@pytest.fixture(scope="module")
def lm():
    return tiny_model(seed=5, n_layers=2, n_heads=2)


@pytest.mark.parametrize("spec", SPECS)
def test_embeddings_attention_equals_explain(serve, tiny_encoder, spec):
    live = serve({"enc": tiny_encoder})
    texts = ["the sky is blue and the grass is green", "hello <b>there</b>"]
    r = httpx.post(live.url + "/v1/embeddings", json={"model": "enc", "input": texts, "qkv": {"attention": spec}})
    assert r.status_code == 200, r.text
    for item, text in zip(r.json()["data"], texts):
        att = item["qkv"]["attention"]
        opts = {k: v for k, v in spec.items() if k != "full"}
        opts = {k: (v if isinstance(v, list) or k == "topk" else [v]) for k, v in opts.items()}
        ex = qkv.explain.explain_text(tiny_encoder, text, full=spec.get("full"), **opts)
        ref = ex.to_dict(include_rollout=False)
        assert att["tokens"] == ref["tokens"] and att["n_heads"] == ref["n_heads"]
        assert len(att["texts"]) == len(att["tokens"])
        _layers_equal(att["layers"], ref["layers"])
        vec = torch.tensor(item["embedding"])
        assert torch.nn.functional.cosine_similarity(vec, tiny_encoder.embed(text), dim=0) > 0.99999


def test_embeddings_without_attention_have_no_field(serve, tiny_encoder):
    live = serve({"enc": tiny_encoder})
    r = live.client().embeddings.create(model="enc", input="hello there")
    assert "qkv" not in r.data[0].model_dump()


def _reference(model, ids, spec):
    ex_spec = {k: (v if isinstance(v, list) or k in ("topk", "full") else [v]) for k, v in spec.items()}
    with torch.no_grad(), qkv.explain.capture(model, **ex_spec) as cap:
        model.text_pass(torch.tensor([ids]))
    tokens = [model.tokenizer.tok.id_to_token(i) for i in ids]
    ex = qkv.explain.Explanation("text", tokens, cap.maps, n_heads=model.config.n_heads)
    return ex.to_dict(include_rollout=False)


@pytest.mark.parametrize("spec", SPECS[:4])
def test_completion_attention_equals_one_pass(serve, lm, spec):
    live = serve({"tiny": lm})
    body = {"model": "tiny", "prompt": ["hello there", "tell me a story about a cat"], "max_tokens": 6,
            "temperature": 0, "qkv": {"attention": spec}}
    r = httpx.post(live.url + "/v1/completions", json=body, timeout=30)
    assert r.status_code == 200, r.text
    for choice, prompt in zip(r.json()["choices"], body["prompt"]):
        att = choice["qkv"]["attention"]
        p = lm.tokenizer.encode(prompt)
        assert att["prompt_tokens"] == len(p)
        gen = lm.generate(prompt, max_new_tokens=6)
        assert choice["text"] == gen
        ids = p + [lm.tokenizer.tok.token_to_id(t) for t in att["tokens"][len(p):]]
        assert len(ids) == len(p) + 6
        ref = _reference(lm, ids, spec)
        assert att["tokens"] == ref["tokens"]
        _layers_equal(att["layers"], ref["layers"])


def _events(live, body):
    with httpx.stream("POST", live.url + "/v1/chat/completions", json=body, timeout=30) as r:
        assert r.status_code == 200
        lines = [ln for ln in r.iter_lines() if ln.startswith("data: ")]
    assert lines[-1] == "data: [DONE]"
    return [json.loads(ln[6:]) for ln in lines[:-1]]


@pytest.mark.parametrize("spec", [{"layers": [-1], "topk": 4}, {"topk": 4, "full": False}])
def test_streamed_rows_equal_the_whole_response(serve, lm, spec):
    live = serve({"tiny": lm})
    msgs = [{"role": "user", "content": "what is the colour of the sky"}]
    body = {"model": "tiny", "messages": msgs, "max_tokens": 8, "temperature": 0, "qkv": {"attention": spec}}
    whole = httpx.post(live.url + "/v1/chat/completions", json=body, timeout=30).json()
    att = whole["choices"][0]["qkv"]["attention"]
    events = _events(live, {**body, "stream": True})
    text = "".join(e["choices"][0]["delta"].get("content") or "" for e in events if e["choices"])
    assert text == whole["choices"][0]["message"]["content"] == lm.chat(msgs, max_new_tokens=8)
    rows = [row for e in events if e["choices"] and "qkv" in e["choices"][0]
            for row in e["choices"][0]["qkv"]["attention"]["rows"]]
    assert [row["position"] for row in rows] == list(range(len(att["tokens"])))
    assert [row["token"] for row in rows] == att["tokens"]
    assert [row["prompt"] for row in rows] == [i < att["prompt_tokens"] for i in range(len(rows))]
    layer = att["layers"][0]
    for row in rows:  # each streamed row is the whole response's row at its position
        entry = row["layers"][0]
        i = row["position"]
        if "weights" in layer:
            torch.testing.assert_close(torch.tensor(entry["weights"]),
                                       torch.tensor(layer["weights"])[:, i, : i + 1])
        else:
            k = len(entry["topk_values"][0])
            torch.testing.assert_close(torch.tensor(entry["topk_values"]),
                                       torch.tensor(layer["topk_values"])[:, i, :k])
    # rows come as tokens do: the prompt's at once, then one per generated token
    first = next(j for j, e in enumerate(events) if e["choices"] and "qkv" in e["choices"][0])
    assert len(events[first]["choices"][0]["qkv"]["attention"]["rows"]) == att["prompt_tokens"]


@pytest.mark.parametrize("bad,param", [({"qkv": 3}, "qkv"), ({"qkv": {"attn": {}}}, "qkv"),
                                       ({"qkv": {"attention": {"layers": [7]}}}, "qkv.attention.layers"),
                                       ({"qkv": {"attention": {"heads": ["a"]}}}, "qkv.attention.heads"),
                                       ({"qkv": {"attention": {"topk": 0}}}, "qkv.attention.topk"),
                                       ({"qkv": {"attention": {"full": "yes"}}}, "qkv.attention.full"),
                                       ({"qkv": {"attention": {"rollout": True}}}, "qkv.attention")])
def test_bad_attention_options_are_refused_by_name(serve, tiny_encoder, lm, bad, param):
    live = serve({"enc": tiny_encoder, "tiny": lm})
    for path, body in (("/v1/embeddings", {"model": "enc", "input": "hi"}),
                       ("/v1/completions", {"model": "tiny", "prompt": "hi", "max_tokens": 2})):
        r = httpx.post(live.url + path, json={**body, **bad})
        assert r.status_code == 400, r.text
        assert r.json()["error"]["param"] == param
