"""/v1/completions and /v1/chat/completions through the openai client: greedy results equal
``model.generate`` / ``model.chat``, streams join to the whole text, concurrent clients get what they
get alone."""

from __future__ import annotations

import json
import time
from concurrent.futures import ThreadPoolExecutor

import httpx
import pytest
from chat_helpers import tiny_model

PROMPTS = ["hello there", "the sky is", "tell me a story about", "i am fine"]
CHATS = [[{"role": "user", "content": "what is the colour of the sky"}],
         [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "hello there"},
          {"role": "assistant", "content": "i am fine"}, {"role": "user", "content": "tell me a story"}]]


@pytest.fixture(scope="module")
def lm():
    return tiny_model(seed=3)


@pytest.fixture
def live(serve, lm):
    return serve({"tiny": lm}, api_key="sk-test")


def test_completions_equal_generate(live, lm):
    client = live.client()
    for p in PROMPTS:
        r = client.completions.create(model="tiny", prompt=p, max_tokens=12, temperature=0)
        assert r.choices[0].text == lm.generate(p, max_new_tokens=12)
        assert r.choices[0].finish_reason == "length" and r.object == "text_completion"
        n = len(lm.tokenizer.encode(p))
        assert (r.usage.prompt_tokens, r.usage.completion_tokens, r.usage.total_tokens) == (n, 12, n + 12)
    batch = client.completions.create(model="tiny", prompt=PROMPTS, max_tokens=8, temperature=0)
    assert [c.index for c in batch.choices] == list(range(len(PROMPTS)))
    assert [c.text for c in batch.choices] == lm.generate(PROMPTS, max_new_tokens=8)
    default = client.completions.create(model="tiny", prompt=PROMPTS[0], temperature=0)  # OpenAI's 16 tokens
    assert default.choices[0].text == lm.generate(PROMPTS[0], max_new_tokens=16)


def test_chat_equals_model_chat(live, lm):
    client = live.client()
    for msgs in CHATS:
        r = client.chat.completions.create(model="tiny", messages=msgs, max_tokens=20, temperature=0)
        assert r.choices[0].message.content == lm.chat(msgs, max_new_tokens=20)
        assert r.choices[0].message.role == "assistant" and r.object == "chat.completion"
        ids = lm.tokenizer.apply_chat_template(msgs, add_generation_prompt=True)
        assert r.usage.prompt_tokens == len(ids)
    # chat stops where CausalLM.chat stops: the config's stop tokens plus the tokenizer's end token
    prompt = live.app.state.served["tiny"].chat_prompt(CHATS[0], {})
    assert lm.tokenizer.eos_id in prompt.options["eos_token_id"]
    assert prompt.ids == lm.tokenizer.encode(lm.tokenizer.apply_chat_template(
        CHATS[0], add_generation_prompt=True, tokenize=False), add_special_tokens=False)


def test_stop_strings_and_penalties_equal_generate(live, lm):
    client = live.client()
    full = lm.generate("hello there", max_new_tokens=20)
    stop = full[2:5]
    want = lm.generate("hello there", max_new_tokens=20, stop=[stop])
    assert len(want) < len(full)
    r = client.completions.create(model="tiny", prompt="hello there", max_tokens=20, temperature=0, stop=stop)
    assert r.choices[0].text == want and r.choices[0].finish_reason == "stop"
    pieces = client.completions.create(model="tiny", prompt="hello there", max_tokens=20, temperature=0,
                                       stop=[stop, "zzz"], stream=True)
    assert "".join(c.choices[0].text for c in pieces) == want
    opts = {"presence_penalty": 1.5, "frequency_penalty": 0.5}
    r = client.completions.create(model="tiny", prompt="hello there", max_tokens=20, temperature=0, **opts)
    assert r.choices[0].text == lm.generate("hello there", max_new_tokens=20, **opts) != full


def test_streams_join_to_the_whole_text(live, lm):
    client = live.client()
    for p in PROMPTS[:2]:
        chunks = list(client.completions.create(model="tiny", prompt=p, max_tokens=14, temperature=0, stream=True))
        assert "".join(c.choices[0].text for c in chunks) == lm.generate(p, max_new_tokens=14)
        assert chunks[-1].choices[0].finish_reason == "length"
        assert all(c.choices[0].finish_reason is None for c in chunks[:-1])
    for msgs in CHATS:
        chunks = list(client.chat.completions.create(model="tiny", messages=msgs, max_tokens=18, temperature=0,
                                                     stream=True))
        assert chunks[0].choices[0].delta.role == "assistant"
        assert "".join(c.choices[0].delta.content or "" for c in chunks) == lm.chat(msgs, max_new_tokens=18)
        assert chunks[-1].choices[0].finish_reason == "length" and chunks[-1].object == "chat.completion.chunk"
    chunks = client.chat.completions.create(model="tiny", messages=CHATS[0], max_completion_tokens=9, temperature=0,
                                            n=2, stream=True)
    texts = ["", ""]
    for c in chunks:  # the two choices' pieces interleave, each with its index
        texts[c.choices[0].index] += c.choices[0].delta.content or ""
    assert texts == [lm.chat(CHATS[0], max_new_tokens=9)] * 2


def test_server_sent_events_are_well_formed(live, lm):
    body = {"model": "tiny", "messages": CHATS[0], "max_tokens": 10, "temperature": 0, "stream": True,
            "stream_options": {"include_usage": True}}
    headers = {"Authorization": "Bearer sk-test"}
    with httpx.stream("POST", live.url + "/v1/chat/completions", json=body, headers=headers, timeout=30) as r:
        assert r.status_code == 200 and r.headers["content-type"].startswith("text/event-stream")
        lines = [line for line in r.iter_lines() if line]
    assert all(line.startswith("data: ") for line in lines)
    assert lines[-1] == "data: [DONE]"
    events = [json.loads(line[6:]) for line in lines[:-1]]
    assert events[-1]["choices"] == [] and events[-1]["usage"]["completion_tokens"] == 10
    assert len({e["id"] for e in events}) == 1


def test_n_choices_and_seeded_sampling(live, lm):
    client = live.client()
    greedy = client.completions.create(model="tiny", prompt="the sky is", max_tokens=8, temperature=0, n=3)
    assert [c.text for c in greedy.choices] == [lm.generate("the sky is", max_new_tokens=8)] * 3
    assert greedy.usage.completion_tokens == 24
    kw = {"model": "tiny", "prompt": "the sky is", "max_tokens": 10, "temperature": 1.5, "seed": 11, "n": 3}
    a, b = client.completions.create(**kw), client.completions.create(**kw)
    assert [c.text for c in a.choices] == [c.text for c in b.choices]
    assert len({c.text for c in a.choices}) > 1  # each choice samples with its own seed
    assert a.choices[0].text == lm.generate("the sky is", max_new_tokens=10, do_sample=True, temperature=1.5,
                                            seed=11)


def test_concurrent_clients_get_what_they_get_alone(live, lm):
    jobs = [("c", p, n) for p, n in zip(PROMPTS * 2, (5, 9, 13, 17, 7, 11, 15, 19), strict=True)]
    jobs[1], jobs[4] = ("chat", 0, 12), ("chat", 1, 16)
    want = [lm.chat(CHATS[p], max_new_tokens=n) if kind == "chat" else lm.generate(p, max_new_tokens=n)
            for kind, p, n in jobs]

    def one(job):
        kind, p, n = job
        client = live.client()
        if kind == "chat":
            stream = client.chat.completions.create(model="tiny", messages=CHATS[p], max_tokens=n, temperature=0,
                                                    stream=True)
            return "".join(c.choices[0].delta.content or "" for c in stream)
        return client.completions.create(model="tiny", prompt=p, max_tokens=n, temperature=0).choices[0].text

    with ThreadPoolExecutor(8) as pool:
        got = list(pool.map(one, jobs))
    assert got == want
    engine = live.engine("tiny")  # the engine drops finished rows at the end of its step: maybe after replying
    deadline = time.monotonic() + 5
    while (engine.batch_size or engine.pending) and time.monotonic() < deadline:
        time.sleep(0.01)
    assert engine.batch_size == 0 and engine.pending == 0
