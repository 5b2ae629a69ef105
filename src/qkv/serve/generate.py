"""Completions and chat on `qkv.models.engine.Engine`: prompts to token ids, choices submitted to the
running batch, their tokens decoded incrementally (`qkv.models.streaming.TextStream`).

One `Generator` per causal model holds its engine (a background thread). The server holds no model
logic: a chat prompt is the tokenizer's ``apply_chat_template`` with the generation prompt, stopped at
the checkpoint's stop tokens and the tokenizer's end token, as `CausalLM.chat` does, so greedy replies
equal ``model.chat`` and greedy completions equal ``model.generate``.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import json
import logging

import torch

from ..models.engine import Engine
from ..models.generation import prepare
from ..models.streaming import TextStream
from . import openai_shapes as shapes
from .attention import token_texts
from .errors import APIError, bad_field
from .openmp import compute_thread

log = logging.getLogger(__name__)


@dataclasses.dataclass
class Prompt:
    ids: list[int]
    options: dict  # GenerationConfig options every choice shares (stop tokens, stop strings, sampling)


class Generator:
    """A causal model behind an engine: ``prompt`` / ``chat_prompt`` build the ids, `submit` queues the
    choices (refusing with 429 when more than ``max_queue`` requests wait), `pieces` streams their text."""

    def __init__(self, name: str, model, *, max_queue: int, max_batch: int = 16, metrics=None):
        self.name, self.model, self.max_queue, self.metrics = name, model, max_queue, metrics
        self.tokenizer = model.tokenizer
        self.engine = Engine(model, max_batch=max_batch)
        self.context = getattr(model.config, "max_positions", None)

    @property
    def chats(self) -> bool:
        return getattr(self.tokenizer, "chat_template", None) is not None

    @property
    def tasks(self) -> tuple[str, ...]:
        return ("completions", "chat") if self.chats else ("completions",)

    def start(self) -> None:
        self.engine.start(compute_thread())  # one OpenMP team with the batchers (`qkv.serve.openmp`)

    def stop(self) -> None:
        self.engine.stop(timeout=10)

    def prompt(self, text: str, options: dict) -> Prompt:
        """A completion prompt, tokenized as ``model.generate(text)`` tokenizes it."""
        return Prompt(self.tokenizer.encode(text), dict(options))

    def chat_prompt(self, messages: list[dict], options: dict) -> Prompt:
        """The conversation through the chat template (special tokens not added twice), stopping where
        `CausalLM.chat` stops: the checkpoint's stop tokens plus the tokenizer's end token."""
        if not self.chats:
            raise bad_field("model", f"{self.name} has no chat template; use /v1/completions")
        try:
            ids = self.tokenizer.apply_chat_template(messages, add_generation_prompt=True)
        except Exception as e:  # noqa: BLE001 -- a template raises what it likes on a conversation it refuses
            raise bad_field("messages", f"the chat template refused them: {e}") from None
        _, _, _, _, base = prepare(self.model, torch.tensor([ids or [0]]), None, "left")
        stops = list(base.stop_ids)
        eos = self.tokenizer.eos_id
        if eos is not None and eos not in stops:
            stops.append(eos)
        return Prompt(ids, {**options, "eos_token_id": stops or None})

    def check_length(self, prompt: Prompt, max_tokens: int | None, *, limit: int, max_input: int,
                     param: str, default: int | None) -> int:
        """The new-token budget: ``max_tokens`` or ``default`` (None: what the context leaves, up to
        ``limit``), refused with 400 when the prompt or prompt + budget does not fit."""
        n = len(prompt.ids)
        if n == 0:
            raise bad_field(param, "is empty after tokenization; send some text")
        if n > max_input:
            raise APIError(400, f"{param}: {n} tokens is more than this server accepts ({max_input}); "
                           "shorten it", param=param, code="context_length_exceeded")
        room = limit if self.context is None else min(limit, self.context - n)
        if room < 1:
            raise APIError(400, f"{param}: {n} tokens leaves no room to generate in the model's context of "
                           f"{self.context} tokens; shorten it", param=param, code="context_length_exceeded")
        if max_tokens is None:
            return room if default is None else min(default, room)
        if self.context is not None and n + max_tokens > self.context:
            raise APIError(400, f"max_tokens: prompt ({n}) + max_tokens ({max_tokens}) = {n + max_tokens} exceeds "
                           f"the model's context of {self.context} tokens; lower max_tokens to at most {room}",
                           param="max_tokens", code="context_length_exceeded")
        return max_tokens

    def submit(self, prompts: list[Prompt], n: int, max_new_tokens: int, attention: dict | None = None) -> list:
        """Queue ``n`` choices per prompt. Past the rows the running batch has free, at most ``max_queue``
        requests may wait: beyond that, 429 with Retry-After (400 for a request that can never fit)."""
        count, engine = len(prompts) * n, self.engine
        if count > self.max_queue + engine.max_batch:
            raise APIError(400, f"{len(prompts)} prompt(s) x n={n} is {count} sequences; this server takes at most "
                           f"{self.max_queue + engine.max_batch} at once; send fewer", param="n",
                           code="too_many_sequences")
        waiting = engine.pending + count - max(0, engine.max_batch - engine.batch_size)
        if waiting > self.max_queue:
            raise APIError(429, f"{self.name} is busy: {engine.pending} requests are waiting and the queue holds "
                           f"{self.max_queue}; retry shortly", code="queue_full", headers={"Retry-After": "1"})
        reqs = []
        try:
            for p in prompts:
                for i in range(n):
                    opts = dict(p.options, max_new_tokens=max_new_tokens)
                    if opts.get("seed") is not None and opts.get("do_sample"):
                        opts["seed"] = (opts["seed"] + i) % 2**63  # n seeded samples that differ
                    reqs.append(self.engine.submit(p.ids, attention=attention, on_finish=self._finished, **opts))
        except ValueError as e:  # a field the config checks refuse (the checks above catch most)
            cancel(reqs)
            raise APIError(400, str(e), code="invalid_value") from None
        except BaseException:
            cancel(reqs)
            raise
        return reqs

    def _finished(self, req) -> None:
        """Metrics of a finished request (called on the engine's thread)."""
        m = self.metrics
        if m is None:
            return
        m.tokens.labels(self.name, "input").inc(len(req.prompt))
        m.tokens.labels(self.name, "output").inc(len(req.tokens))
        if req.first_token_time is not None:
            m.first_token.labels(self.name).observe(req.first_token_time - req.submitted)

    def rows(self, req, end: int | None = None) -> list[dict]:
        """The attention rows the engine recorded for ``req`` since the last call, those before position
        ``end`` if given (streams: each token's chunk carries the rows that produced it, however far the
        engine has run ahead of the reader)."""
        rec = req.attention
        if rec is None:
            return []
        ids = req.prompt + req.tokens
        out = []
        for pos, layers in rec.take(end):
            tok = self.tokenizer.tok.id_to_token(ids[pos]) or ""
            out.append({"position": pos, "token": tok, "text": token_texts(self.tokenizer, [ids[pos]])[0],
                        "prompt": pos < len(req.prompt), "layers": rec.row_layers(pos, layers)})
        return out

    def attention(self, req) -> dict:
        """The whole sequence's attention (prompt and generated tokens), as ``qkv explain --json`` lays it out."""
        ids = (req.prompt + req.tokens)[: req.attention.length]
        return {"tokens": [self.tokenizer.tok.id_to_token(i) or "" for i in ids],
                "texts": token_texts(self.tokenizer, ids), "n_heads": self.model.config.n_heads,
                "prompt_tokens": len(req.prompt), "layers": req.attention.layer_entries()}

    async def pieces(self, reqs: list):
        """Yields ``(index, text, finish_reason)``: text pieces as they become final (finish_reason None),
        then one last item per choice with the rest of its text and why it ended; for requests recording
        attention, also ``(index, rows, "attention")`` as rows arrive. Cancels every unfinished request
        when the consumer stops early (a client that went away)."""
        queue: asyncio.Queue = asyncio.Queue()

        async def follow(index, req):
            stream = TextStream(self.tokenizer, req.config.stop, stop_token_ids=req.config.stop_ids)
            try:
                end = len(req.prompt)  # generated token k comes from the rows before position len(prompt) + k
                async for tok in req:
                    rows = self.rows(req, end=end)
                    end += 1
                    if rows:
                        queue.put_nowait((index, rows, "attention"))
                    piece = stream.push(tok)
                    if piece:
                        queue.put_nowait((index, piece, None))
                rows = self.rows(req)
                if rows:
                    queue.put_nowait((index, rows, "attention"))
                queue.put_nowait((index, stream.flush(), req.finish_reason))
            except Exception as e:  # noqa: BLE001 -- the engine's failure reaches the client as a 500
                queue.put_nowait((index, e, "error"))

        tasks = [asyncio.create_task(follow(i, r)) for i, r in enumerate(reqs)]
        try:
            left = len(reqs)
            while left:
                index, piece, reason = await queue.get()
                if reason == "error":
                    raise APIError(500, f"generation failed: {piece}", code="generation_failed")
                if reason not in (None, "attention"):
                    left -= 1
                yield index, piece, reason
        finally:
            for t in tasks:
                t.cancel()
            cancel(reqs)


class Job:
    """One HTTP request's choices on the engine, answered whole (`result`) or as server-sent events
    (`events`). Either one cancels the engine requests if it is stopped early."""

    def __init__(self, name: str, gen: Generator, reqs: list, chat: bool, *, prompt_tokens: int,
                 include_usage: bool = False):
        self.name, self.gen, self.reqs, self.chat = name, gen, reqs, chat
        self.prompt_tokens, self.include_usage = prompt_tokens, include_usage
        self.id, self.created = shapes.new_id("chatcmpl" if chat else "cmpl"), shapes.now()

    @property
    def completion_tokens(self) -> int:
        return sum(len(r.tokens) for r in self.reqs)

    async def result(self) -> dict:
        """OpenAI's whole response."""
        texts, reasons = [""] * len(self.reqs), [None] * len(self.reqs)
        async with contextlib.aclosing(self.gen.pieces(self.reqs)) as pieces:  # closing it cancels the rest
            async for index, piece, reason in pieces:
                if reason == "attention":
                    continue
                texts[index] += piece
                reasons[index] = reason or reasons[index]
        out = shapes.completion(self.id, self.name, self.created, list(zip(texts, reasons)), self.prompt_tokens,
                                self.completion_tokens, self.chat)
        for choice, req in zip(out["choices"], self.reqs):
            if req.attention is not None:
                choice["qkv"] = {"attention": self.gen.attention(req)}
        return out

    async def events(self):
        """``data: {chunk}`` events, ``data: [DONE]`` last. A client that goes away closes this generator,
        which cancels the engine requests (their rows are freed at once)."""
        def event(obj) -> str:
            return f"data: {json.dumps(obj, ensure_ascii=False)}\n\n"

        def chunk(index, **kw) -> str:
            return event(shapes.chunk(self.id, self.name, self.created, index, self.chat, **kw))

        try:
            if self.chat:
                for i in range(len(self.reqs)):
                    yield chunk(i, role=True)
            async with contextlib.aclosing(self.gen.pieces(self.reqs)) as pieces:
                async for index, piece, reason in pieces:
                    if reason == "attention":
                        yield chunk(index, extra={"attention": {"rows": piece}})
                        continue
                    if piece:
                        yield chunk(index, text=piece)
                    if reason is not None:
                        yield chunk(index, finish_reason=reason)
        except APIError as e:  # the status line is sent already: the error goes in the stream
            yield event(e.body())
            return
        finally:
            cancel(self.reqs)  # no-op when all finished
        if self.include_usage:
            yield chunk(None, usage_=shapes.usage(self.prompt_tokens, self.completion_tokens))
        yield "data: [DONE]\n\n"


def cancel(reqs: list) -> None:
    """Cancel unfinished engine requests without blocking the event loop (``Request.cancel`` waits for
    the engine's current step to free the rows)."""
    live = [r for r in reqs if not r.done]
    if not live:
        return

    def run():
        for r in live:
            r.cancel()

    try:
        asyncio.get_running_loop().run_in_executor(None, run)
    except RuntimeError:  # no loop: called from a plain thread
        run()
