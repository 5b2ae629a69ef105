"""Captured attention is the model's own; aggregations equal independent computations."""

import pytest
import torch
from hf_models import pair

import qkv
import qkv.explain as X
from qkv.explain import capture


@pytest.mark.parametrize("name", ["bert", "gpt2", "llama", "t5"])
def test_captured_weights_are_the_models_own(name):
    _, model = pair(name)
    ids = torch.randint(3, 120, (1, 12), generator=torch.Generator().manual_seed(0))
    is_s2s = name == "t5"
    with torch.no_grad():
        if is_s2s:
            own = model.encode(ids, return_weights=True).attentions
        else:
            own = model(ids, return_weights=True).attentions
        with capture(model) as cap:
            model.encode(ids) if is_s2s else model(ids)
    assert len(cap.maps) == len(own)
    for m, w in zip(cap.maps, own):
        torch.testing.assert_close(m.dense, w[0], atol=1e-6, rtol=1e-5)
        torch.testing.assert_close(m.mean, w[0].mean(0), atol=1e-6, rtol=1e-5)
        rows = m.dense.sum(-1)
        assert torch.allclose(rows, torch.ones_like(rows), atol=1e-5)


def test_capture_does_not_change_the_backend_or_outputs():
    _, model = pair("gpt2")
    ids = torch.randint(3, 120, (1, 20))
    with torch.no_grad():
        ref = model(ids).logits
        with capture(model, layers=[-1], heads=[1, 3]) as cap:
            got = model(ids).logits
    assert torch.equal(ref, got) and model.backend == "auto"
    assert len(cap.maps) == 1 and cap.maps[0].layer == model.config.n_layers - 1 and cap.maps[0].heads == [1, 3]
    assert all(m.observer is None for m in model.modules() if hasattr(m, "observer"))


def test_topk_capture_on_long_inputs_equals_topk_of_the_full_matrix():
    torch.manual_seed(0)
    model = qkv.models.CausalLM(qkv.models.CausalLMConfig(
        vocab_size=100, dim=32, n_layers=2, n_heads=4, n_kv_heads=2, ffn_dim=64, positions="rotary", norm="rms",
        activation="swiglu", bias=False)).eval()
    ids = torch.randint(0, 100, (1, 1500))
    with torch.no_grad():
        with capture(model, topk=8) as top:
            model(ids)
        with capture(model, full=True) as full:
            model(ids)
    for t, f in zip(top.maps, full.maps):
        assert t.dense is None and f.dense is not None
        want_v, want_i = f.dense.topk(8, dim=-1)
        torch.testing.assert_close(t.top_values, want_v)
        got = f.dense.gather(-1, t.top_index.clamp(min=0))
        torch.testing.assert_close(torch.where(t.top_index >= 0, got, 0.0), t.top_values)


def test_rollout_equals_an_independent_computation():
    means = [torch.softmax(torch.randn(7, 7), -1) for _ in range(4)]
    want = torch.eye(7)
    for a in means:  # the definition, step by step
        a = 0.5 * a + 0.5 * torch.eye(7)
        a = a / a.sum(-1, keepdim=True)
        want = a @ want
    torch.testing.assert_close(X.rollout(means), want)
    assert torch.allclose(X.rollout(means).sum(-1), torch.ones(7))


def test_head_statistics():
    m = X.AttentionMaps("x", 0, "self", [0, 1], 4, 4)
    m.dense = torch.stack([torch.eye(4), torch.full((4, 4), 0.25)])
    torch.testing.assert_close(X.entropy(m), torch.tensor([0.0, float(torch.log(torch.tensor(4.0)))]))
    torch.testing.assert_close(X.mean_distance(m), torch.tensor([0.0, (0 + 1 + 2 + 3 + 1 + 0 + 1 + 2) * 2 / 16]))


def test_gradient_attention_matches_its_definition():
    _, model = pair("bert-seqcls")
    ids = torch.randint(3, 120, (1, 9), generator=torch.Generator().manual_seed(2))
    rel = X.gradient_attention(model, {"input_ids": ids})
    model.set_backend("eager")
    try:
        out = model(ids, return_weights=True)
        for a in out.attentions:
            a.retain_grad()
        out.logits[0, out.logits[0].argmax()].backward()
    finally:
        model.set_backend("auto")
    want = torch.eye(9)
    for a in out.attentions:
        want = want + (a.grad[0] * a[0]).clamp(min=0).mean(0) @ want
    torch.testing.assert_close(rel, want.detach())
    assert model.backend == "auto"


def test_explanation_views_and_json():
    _, model = pair("gpt2")
    model.tokenizer = None
    ex = X.explain_text(model, "one two three four five six")
    assert ex.tokens == ["one", "two", "three", "four", "five", "six"] and ex.notes
    d = ex.to_dict(layer=1, head=2)
    assert len(d["layers"]) == 1 and d["layers"][0]["heads"] == [2]
    torch.testing.assert_close(torch.tensor(d["layers"][0]["weights"][0]), ex.maps[1].head(2))
    val, idx = ex.view("rollout", k=3)
    assert val.shape == (6, 3) and torch.all(idx[0, 1:] == 0) | torch.all(val[0, 1:] == 0)  # causal: row 0 sees itself
    assert X.find_token(ex, "three") == 2 and X.find_token(ex, -1) == 5
    with pytest.raises(ValueError, match="no token"):
        X.find_token(ex, "seven")
