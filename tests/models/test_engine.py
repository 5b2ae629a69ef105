"""Continuous batching: every request gets the tokens it would get alone, whatever joins or leaves the batch."""

import threading

import pytest
import torch

from qkv.models import CausalLM, CausalLMConfig, TextEncoder, TextEncoderConfig, generation
from qkv.models.engine import Engine
from qkv.nn import KVCache

V = 61
FAMILIES = {
    "gpt2": dict(),
    "llama": dict(positions="rotary", norm="rms", activation="swiglu", bias=False, n_kv_heads=2),
    "token_conv": dict(token_conv=3),
}


def tiny(name: str, seed: int = 0) -> CausalLM:
    torch.manual_seed(seed)
    cfg = CausalLMConfig(vocab_size=V, dim=32, n_layers=2, n_heads=4, ffn_dim=64, max_positions=128, **FAMILIES[name])
    # float64 and wide weights: batched and one-at-a-time logits agree to ~1e-15, so no argmax can flip
    return CausalLM(cfg).init_weights(0.3).double().eval()


def prompts(lengths, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(0, V, (n,), generator=g).tolist() for n in lengths]


def alone(model, prompt, **options):
    out = model.generate(torch.tensor([prompt]), **options)
    return out[0, len(prompt):].tolist()


@pytest.mark.parametrize("name", list(FAMILIES))
def test_greedy_requests_arriving_and_leaving_equal_generate_alone(name):
    model = tiny(name)
    ps = prompts([3, 11, 1, 7, 16, 5, 9])
    ref = [alone(model, p, max_new_tokens=12, eos_token_id=[]) for p in ps]
    # request 2 stops at the first token of its greedy continuation that it emits at step >= 3
    eos = ref[2][3]
    ref[2] = ref[2][: ref[2].index(eos) + 1]
    engine = Engine(model, max_batch=4)  # more requests than rows: some wait in the queue
    reqs = {}
    for step in range(40):
        if step in (0, 2, 3, 5):  # arrivals at different steps
            for i in {0: (0, 1), 2: (2,), 3: (3, 4), 5: (5, 6)}[step]:
                reqs[i] = engine.submit(ps[i], max_new_tokens=12 - (i == 4) * 7,
                                        eos_token_id=[eos] if i == 2 else [])
        if step == 6:
            reqs[3].cancel()
        assert engine.batch_size <= 4
        engine.step()
    assert engine.idle and engine.cache_bytes() == 0
    for i, req in reqs.items():
        want = ref[i][:5] if i == 4 else ref[i]
        if i == 3:
            assert req.finish_reason == "cancelled" and req.tokens == want[: len(req.tokens)] and req.tokens
        else:
            assert req.tokens == want, (i, req.tokens, want)
            assert req.finish_reason == ("stop" if i == 2 else "length")


def test_seeded_sampling_is_reproducible_whatever_the_company():
    model = tiny("llama")
    p = prompts([6])[0]
    opts = dict(max_new_tokens=10, do_sample=True, temperature=1.3, top_k=20, top_p=0.95, seed=7, eos_token_id=[])
    want = alone(model, p, **opts)
    engine = Engine(model)
    solo = engine.submit(p, **opts).result()
    crowd = [engine.submit(q, max_new_tokens=6, do_sample=True, seed=s, eos_token_id=[])
             for s, q in enumerate(prompts([2, 9, 4], seed=3))]
    engine.step()
    late = engine.submit(p, **opts)  # joins a batch already decoding
    engine.run_until_idle()
    assert solo == want and late.result() == want
    assert any(len(set(r.tokens)) > 1 for r in crowd)  # the company really sampled


def test_penalties_see_each_requests_own_history():
    model = tiny("llama")
    ps = prompts([5, 10, 3], seed=4)
    opts = [dict(repetition_penalty=1.8), dict(presence_penalty=1.5, frequency_penalty=0.5),
            dict(repetition_penalty=1.3, do_sample=True, seed=3, top_k=10)]
    want = [alone(model, p, max_new_tokens=10, eos_token_id=[], **o) for p, o in zip(ps, opts)]
    engine = Engine(model)
    reqs = [engine.submit(p, max_new_tokens=10, eos_token_id=[], **o) for p, o in zip(ps, opts)]
    engine.run_until_idle()
    assert [r.tokens for r in reqs] == want
    assert want[0] != alone(model, ps[0], max_new_tokens=10, eos_token_id=[])  # the penalty mattered
    with pytest.raises(ValueError, match="beam"):
        engine.submit(ps[0], num_beams=2)


def test_cancel_frees_the_rows_at_once():
    model = tiny("gpt2")
    engine = Engine(model)
    reqs = [engine.submit(p, max_new_tokens=50, eos_token_id=[]) for p in prompts([4, 8, 12, 6])]
    queued = engine.submit([1, 2], max_new_tokens=5)
    for _ in range(3):
        engine.step()
    before = engine.cache_bytes()
    assert engine.batch_size == 5
    reqs[2].cancel()
    assert engine.batch_size == 4 and engine.cache_bytes() < before
    assert reqs[2].finish_reason == "cancelled" and len(reqs[2].tokens) == 4  # prefill + 3 steps
    later = engine.submit([3], max_new_tokens=5)
    later.cancel()  # still queued: never prefilled
    assert later.finish_reason == "cancelled" and later.tokens == [] and engine.pending == 0
    for r in reqs[:2] + reqs[3:] + [queued]:
        r.cancel()
    assert engine.batch_size == 0 and engine.cache_bytes() == 0


def test_cancel_from_the_token_callback_and_streaming():
    model = tiny("llama")
    engine = Engine(model)
    seen = []

    def on_token(req, tok):
        seen.append(tok)
        if len(req.tokens) == 4:
            req.cancel()  # inside the step: the row is dropped before step() returns

    req = engine.submit([5, 6, 7], max_new_tokens=20, eos_token_id=[], on_token=on_token)
    other = engine.submit([9, 9], max_new_tokens=8, eos_token_id=[])
    while req.finish_reason is None:
        engine.step()
    assert engine.batch_size == 1 and req.finish_reason == "cancelled" and seen == req.tokens and len(seen) == 4
    assert list(other) == alone(model, [9, 9], max_new_tokens=8, eos_token_id=[])  # iterating drives the engine
    assert other.poll() == other.tokens and other.poll() == []


def test_background_thread_serves_concurrent_submitters():
    model = tiny("llama")
    ps = prompts([3, 8, 5, 13, 2, 6])
    want = [alone(model, p, max_new_tokens=9, eos_token_id=[]) for p in ps]
    got = [None] * len(ps)
    done = threading.Event()
    with Engine(model, max_batch=3) as engine:
        def client(i):
            req = engine.submit(ps[i], max_new_tokens=9, eos_token_id=[],
                                on_finish=lambda r: done.set() if i == 0 else None)
            got[i] = list(req)  # blocking stream from the background thread

        threads = [threading.Thread(target=client, args=(i,)) for i in range(len(ps))]
        for t in threads:
            t.start()
        for t in threads:
            t.join(30)
        assert engine.running and done.is_set()
    assert not engine.running and got == want


def test_steps_run_on_the_given_executor_interleaved_with_its_other_work():
    import concurrent.futures

    model = tiny("gpt2")
    ps = prompts([5, 2, 9])
    want = [alone(model, p, max_new_tokens=7, eos_token_id=[]) for p in ps]
    pool = concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix="shared")
    try:
        engine = Engine(model, max_batch=2)
        seen = set()
        engine.on_step = lambda rows: seen.add(threading.current_thread().name)
        engine.start(pool)
        reqs = [engine.submit(p, max_new_tokens=7, eos_token_id=[]) for p in ps]
        other = pool.submit(lambda: threading.current_thread().name)  # the pool's own work still runs between steps
        assert [r.result(timeout=30) for r in reqs] == want
        assert other.result(timeout=30).startswith("shared")
        assert seen and all(name.startswith("shared") for name in seen)
        with pytest.raises(RuntimeError, match="another executor"):
            engine.start()
        engine.stop()
        with pytest.raises(TypeError, match="executor"):
            engine.start(object())
    finally:
        pool.shutdown()


def test_async_iteration_from_an_event_loop():
    import asyncio

    model = tiny("gpt2")
    ps = prompts([4, 7, 2])
    want = [alone(model, p, max_new_tokens=8, eos_token_id=[]) for p in ps]

    async def client(engine, p):
        return [tok async for tok in engine.submit(p, max_new_tokens=8, eos_token_id=[])]

    async def main(engine):
        return await asyncio.gather(*(client(engine, p) for p in ps))

    with Engine(model) as engine:
        assert asyncio.run(main(engine)) == want
    with pytest.raises(RuntimeError, match="background thread"):
        asyncio.run(client(engine, ps[0]))


def test_history_is_prompt_plus_generated(monkeypatch):
    seen = []
    original = generation.next_token

    def next_token(logits, cfg, generator, first=False, history=None, prompt_len=None):
        seen.append((first, history[0].tolist()))
        assert prompt_len == 3  # presence / frequency penalties count the generated tokens only
        return original(logits, cfg, generator, first=first)

    monkeypatch.setattr(generation, "next_token", next_token)
    model = tiny("gpt2")
    engine = Engine(model)
    req = engine.submit([4, 5, 6], max_new_tokens=4, eos_token_id=[])
    engine.run_until_idle()
    t = req.tokens
    assert seen == [(True, [4, 5, 6]), (False, [4, 5, 6, *t[:1]]), (False, [4, 5, 6, *t[:2]]),
                    (False, [4, 5, 6, *t[:3]])]


def test_limits_and_errors():
    model = tiny("gpt2")
    engine = Engine(model, max_batch=2, max_tokens=40)
    zero = engine.submit([1], max_new_tokens=0)
    sizes = []
    reqs = [engine.submit(p, max_new_tokens=10, eos_token_id=[], on_token=lambda r, t: sizes.append(engine.batch_size))
            for p in prompts([5, 9, 3, 8])]
    engine.run_until_idle()
    assert zero.finish_reason == "length" and zero.result() == []
    assert max(sizes) <= 2 and all(r.finish_reason == "length" and len(r.tokens) == 10 for r in reqs)
    with pytest.raises(ValueError, match="max_tokens"):
        engine.submit(list(range(35)), max_new_tokens=10)
    with pytest.raises(ValueError, match="learned positions"):
        Engine(model).submit(list(range(50)), max_new_tokens=100)
    with pytest.raises(ValueError, match="empty"):
        engine.submit([])
    with pytest.raises(ValueError, match="prompt ids"):
        engine.submit([V])
    with pytest.raises(TypeError, match="decoder-only"):
        Engine(TextEncoder(TextEncoderConfig(vocab_size=50, dim=16, n_layers=1, n_heads=2, ffn_dim=32)))


def test_kvcache_merge_pad_trim():
    torch.manual_seed(0)
    a, b = KVCache(1, capacity=3), KVCache(1, capacity=5)
    ka, kb = torch.randn(1, 2, 3, 4), torch.randn(2, 2, 5, 4)
    a.append(0, ka, ka + 1), a.advance(3)
    b.append(0, kb, kb + 1), b.advance(5)
    a.state["conv"], b.state["conv"] = torch.zeros(1, 2), torch.ones(2, 2)
    m = KVCache.merge([a, b], capacity=9)
    assert m.length == 5 and m.batch_size == 3 and m.keys[0].shape == (3, 2, 9, 4)
    assert torch.equal(m.keys[0][:1, :, 2:5], ka) and not m.keys[0][0, :, :2].any()
    assert torch.equal(m.values[0][1:, :, :5], kb + 1) and m.state["conv"].tolist() == [[0, 0], [1, 1], [1, 1]]
    m.trim_left(2)
    assert m.length == 3 and torch.equal(m.keys[0][:1, :, :3], ka)
    m.select(torch.tensor([0, 2]))
    assert m.batch_size == 2
    k, _ = m.append(0, torch.full((2, 2, 1, 4), 7.0), torch.zeros(2, 2, 1, 4))
    assert k.shape[2] == 4 and torch.equal(k[:1, :, :3], ka)
    a.pad_left(2)
    assert a.length == 5 and torch.equal(a.keys[0][:, :, 2:5], ka) and not a.keys[0][:, :, :2].any()
    a.length = 3  # truncating by assignment (a chat session rewinding) keeps working
    k, _ = a.append(0, ka[:, :, :1], ka[:, :, :1])
    assert k.shape[2] == 4 and torch.equal(k[:, :, 3], ka[:, :, 0])
