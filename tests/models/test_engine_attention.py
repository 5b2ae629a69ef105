"""Attention recorded by the continuous-batching engine equals `qkv.explain.capture` of one pass over the
same token ids, whatever the batch around the request (left padding, arrivals, finishing rows)."""

import pytest
import torch
from chat_helpers import tiny_model

from qkv.explain import capture
from qkv.models.engine import Engine


def _reference(model, ids, **spec):
    with torch.no_grad(), capture(model, **spec) as cap:
        model.text_pass(torch.tensor([ids]))
    return cap.maps


def _check(model, req, spec, dense):
    ids = req.prompt + req.tokens
    ref = _reference(model, ids, **spec)
    rec = req.attention
    assert rec.length == len(ids)
    got = rec.layer_entries()
    assert [e["layer"] for e in got] == [m.layer for m in ref]
    for e, m in zip(got, ref):
        assert e["heads"] == m.heads
        if dense:
            torch.testing.assert_close(torch.tensor(e["weights"]), m.dense, atol=2e-6, rtol=1e-4)
        else:
            torch.testing.assert_close(torch.tensor(e["topk_values"]), m.top_values, atol=2e-6, rtol=1e-4)
            same = torch.tensor(e["topk_indices"]) == m.top_index
            assert same.float().mean() > 0.99  # ties may order differently


@pytest.mark.parametrize("seed,config", [(0, {}), (1, {"positions": "learned"}), (2, {"sliding_window": 5}),
                                         (3, {"n_kv_heads": 2})])
def test_batched_attention_equals_one_pass(seed, config):
    model = tiny_model(seed=seed, n_layers=3, n_heads=4, dim=32, **config)
    g = torch.Generator().manual_seed(seed)
    V = model.config.vocab_size
    engine = Engine(model, max_batch=8)
    specs = [None, {}, {"layers": [-1], "heads": [1, 3]}, {"layers": [0, 2], "topk": 3, "full": False}]
    reqs = []
    for i in range(8):
        n = int(torch.randint(2, 30, (1,), generator=g))
        ids = torch.randint(4, V, (n,), generator=g).tolist()
        spec = specs[i % len(specs)]
        reqs.append((engine.submit(ids, max_new_tokens=int(torch.randint(1, 12, (1,), generator=g)),
                                   eos_token_id=[], attention=spec), spec))
        if i % 3 == 2:  # staggered arrivals: some join a running batch
            engine.step()
    engine.run_until_idle()
    for req, spec in reqs:
        assert req.finish_reason == "length"
        if spec is None:
            assert req.attention is None
            continue
        full = {k: v for k, v in spec.items()}
        _check(model, req, full, dense=full.get("full") is not False)


def test_attention_does_not_change_tokens():
    model = tiny_model(seed=3)
    ids = [5, 9, 12, 40, 41]
    plain = Engine(model).submit(ids, max_new_tokens=10).result()
    e = Engine(model)
    watched = e.submit(ids, max_new_tokens=10, attention={"topk": 2})
    other = e.submit([7, 8], max_new_tokens=4)
    e.run_until_idle()
    assert watched.tokens == plain
    assert other.attention is None and watched.attention.length == len(ids) + len(watched.tokens)


def test_rows_arrive_in_order_while_decoding():
    model = tiny_model(seed=4)
    e = Engine(model)
    req = e.submit([5, 6, 7], max_new_tokens=5, eos_token_id=[], attention={"layers": [-1]})
    seen = []
    while not req.done:
        e.step()
        seen += [pos for pos, _ in req.attention.take()]
    seen += [pos for pos, _ in req.attention.take()]
    assert seen == list(range(3 + 5))
