"""The ASGI app: OpenAI's routes over qkv models, by what each model does.

`create_app` takes ``{name: model}``: a `qkv.models.TextEncoder` (``.embed``) serves
``/v1/embeddings``; a `qkv.models.CausalLM` with a tokenizer serves ``/v1/completions`` and, when its
tokenizer has a chat template, ``/v1/chat/completions``, on one continuous-batching engine per model
(started with the app, stopped at its shutdown). Requests are parsed and checked here; the models do
the work, as the CLI calls them.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import hmac
import json
import logging
import threading

import numpy as np
from starlette.applications import Starlette
from starlette.exceptions import HTTPException
from starlette.requests import Request
from starlette.responses import JSONResponse, Response, StreamingResponse
from starlette.routing import Route

from ..explain import explain_texts
from . import attention, media, openmp, page
from . import openai_shapes as shapes
from .attention import attention_dict
from .batching import Batcher, TokenCounter
from .errors import APIError, FastJSON, bad_field
from .generate import Generator, Job
from .memory import Trimmer
from .metrics import Metrics, Middleware

log = logging.getLogger(__name__)


class _Encoder:
    """A sentence encoder: concurrent requests are batched (`Batcher`, by token budget) and each batch
    runs packed (`TextEncoder.embed_ids`: the texts end to end, each attending to itself, no padding)
    on the tokens the request was counted with; requests for attention run under the same lock, packed
    too, each text's embedding and attention from one pass."""

    def __init__(self, name: str, model, *, max_pending: int, budget: int, metrics: Metrics | None = None):
        self.name, self.model = name, model
        self.lock = threading.Lock()
        sizes = [getattr(model.config, k, None) for k in ("max_positions", "max_length")]  # embed truncates
        self.context = min((n for n in sizes if n), default=None)  # at max_length: refuse instead
        self.count = TokenCounter(model.tokenizer, self.lock)
        self.row_tokens = 2048  # tokens per packed row (`TextEncoder.packed_rows`)
        self.batcher = Batcher(self._embed, budget=budget, max_pending=max_pending, lock=self.lock, max_wait=0.005,
                               on_batch=metrics.batch_observer(name) if metrics else None, name=name)

    tasks = ("embeddings",)

    def _embed(self, tokens: list[tuple[list[int], list[int]]]):
        ids, types = zip(*tokens)
        return list(self.model.embed_ids(ids, types, max_tokens=self.row_tokens).numpy())

    async def embed(self, tokens: list[tuple[list[int], list[int]]]) -> list[np.ndarray]:
        return await self.batcher.submit(tokens, [len(ids) for ids, _ in tokens])

    def explain(self, texts: list[str], spec: dict) -> tuple[np.ndarray, list[dict]]:
        """Embeddings and the attention of each text, from the same passes (`explain_texts`: packed
        rows; a text alone is `explain_text`'s own pass)."""
        explained = explain_texts(self.model, texts, embed=True, **spec)  # on the batcher's thread, locked
        return np.stack([ex.embedding.numpy() for ex in explained]), [attention_dict(ex) for ex in explained]


@dataclasses.dataclass
class Context:
    """What route handlers outside this module (media, page) get: the served models, the limits, the
    metrics, and the request helpers (`pick` a model by the body's ``model`` field, read a JSON `body`)."""

    served: dict
    metrics: Metrics
    max_body_bytes: int
    max_input_tokens: int
    max_queue: int
    batch_tokens: int = 16384  # tokens per encoder / classifier batch
    pick: object = None  # (body, want: type | tuple, route) -> (name, served)

    async def body(self, request: Request) -> dict:
        return await _body(request, self.max_body_bytes)


def _kind(name: str, model, ctx: Context, max_batch: int, budget: int):
    if getattr(model, "continues_prompt", False):
        if getattr(model, "tokenizer", None) is None:
            raise ValueError(f"model {name!r} has no tokenizer: the server reads and writes text; put its "
                             "tokenizer.json in the folder (or set model.tokenizer)")
        return Generator(name, model, max_queue=ctx.max_queue, max_batch=max_batch, metrics=ctx.metrics)
    served = media.served(name, model, ctx)
    if served is not None:
        return served
    if hasattr(model, "embed") and getattr(model, "tokenizer", None) is not None:
        return _Encoder(name, model, max_pending=max(ctx.max_queue, 1) * 64, budget=budget, metrics=ctx.metrics)
    raise ValueError(f"model {name!r} is a {type(model).__name__}: this server serves sentence encoders "
                     "(embeddings), causal language models (completions, chat), classifiers and speech "
                     "recognizers")


async def _body(request: Request, limit: int) -> dict:
    """The request's JSON object; 413 past ``limit`` bytes (checked as it arrives), 400 if not JSON."""
    size = request.headers.get("content-length")
    if size is not None and size.isdigit() and int(size) > limit:
        raise APIError(413, f"the request body ({size} bytes) is larger than this server accepts ({limit} "
                       "bytes); send less", code="body_too_large")
    chunks, total = [], 0
    async for chunk in request.stream():
        total += len(chunk)
        if total > limit:
            raise APIError(413, f"the request body is larger than this server accepts ({limit} bytes); "
                           "send less", code="body_too_large")
        chunks.append(chunk)
    try:
        body = json.loads(b"".join(chunks))
    except (ValueError, UnicodeDecodeError) as e:
        raise APIError(400, f"the request body is not valid JSON ({e}); send a JSON object",
                       code="invalid_json") from None
    if not isinstance(body, dict):
        raise APIError(400, f"the request body must be a JSON object, got {type(body).__name__}",
                       code="invalid_json")
    return body


class _Auth:
    """Pure ASGI middleware: with an API key, every route but /health and the page's files needs
    ``Authorization: Bearer KEY`` (compared in constant time)."""

    def __init__(self, app, api_key: str | None):
        self.app, self.key = app, (api_key.encode() if api_key else None)

    async def __call__(self, scope, receive, send):
        if (self.key is None or scope["type"] != "http" or scope["path"] == "/health"
                or scope["path"] in page.PUBLIC_PATHS):  # the page's own files hold no secret
            return await self.app(scope, receive, send)
        header = dict(scope["headers"]).get(b"authorization", b"")
        scheme, _, token = header.partition(b" ")
        if scheme.lower() != b"bearer" or not hmac.compare_digest(token.strip(), self.key):
            err = APIError(401, "missing or wrong API key: send the header 'Authorization: Bearer KEY'",
                           code="invalid_api_key")
            return await err.response()(scope, receive, send)
        return await self.app(scope, receive, send)


def create_app(models: dict, *, api_key: str | None = None, max_queue: int = 64,
               max_body_bytes: int = 4 * 2**20, max_input_tokens: int = 8192, max_tokens_limit: int = 4096,
               max_batch: int = 16, batch_tokens: int = 16384, trim_interval: float = 2.0) -> Starlette:
    """An OpenAI-compatible ASGI app over ``{name: model}`` (see the module docstring for the routes).

    ``max_queue``: generation requests that may wait per model beyond the running batch (429 past it;
    encoders queue 64x as many inputs, 503 past that); ``max_body_bytes``: largest request body (413);
    ``max_input_tokens``: longest input (400); ``max_tokens_limit``: largest ``max_tokens`` (400);
    ``max_batch``: rows each engine decodes together; ``batch_tokens``: tokens per encoder batch;
    ``trim_interval``: seconds between returns of freed memory to the system while requests arrive
    (`qkv.serve.memory`; 0: never).
    ``app.state.served`` maps each name to its `Generator` (``.engine``) or encoder; ``app.state.metrics``
    is the `Metrics`.
    """
    if not models:
        raise ValueError("create_app: give at least one model, as {name: model}")
    for name, value in (("max_queue", max_queue), ("max_body_bytes", max_body_bytes),
                        ("max_input_tokens", max_input_tokens), ("max_tokens_limit", max_tokens_limit),
                        ("max_batch", max_batch), ("batch_tokens", batch_tokens)):
        if isinstance(value, bool) or not isinstance(value, int) or value < (0 if name == "max_queue" else 1):
            raise ValueError(f"create_app: {name}={value!r} must be a positive int")
    if isinstance(trim_interval, bool) or not isinstance(trim_interval, (int, float)) or not trim_interval >= 0:
        raise ValueError(f"create_app: trim_interval={trim_interval!r} must be a number of seconds >= 0 (0: never)")
    metrics = Metrics()
    served: dict = {}
    ctx = Context(served, metrics, max_body_bytes, max_input_tokens, max_queue, batch_tokens)
    for name, m in models.items():
        served[name] = _kind(name, m, ctx, max_batch, batch_tokens)
    generators = [s for s in served.values() if isinstance(s, Generator)]
    openmp.release_pool()  # the models were built on this thread; they run on the compute thread
    for name, s in served.items():
        if isinstance(s, Generator):
            eng = s.engine
            metrics.watch(name, lambda e=eng: e.pending, lambda e=eng: e.batch_size)
            eng.on_step = lambda rows, name=name: metrics.batch.labels(name).observe(rows)
        elif hasattr(s, "batcher"):
            metrics.watch(name, lambda b=s.batcher: b.pending)

    def pick(body: dict, want, route: str):
        name = body.get("model")
        if name is None and len(served) == 1:
            name = next(iter(served))
        if not isinstance(name, str):
            raise bad_field("model", f"give the name of a served model: one of {sorted(served)}")
        if name not in served:
            raise APIError(404, f"the model {name!r} does not exist here; served: {sorted(served)}",
                           param="model", code="model_not_found")
        s = served[name]
        if not isinstance(s, want):
            raise bad_field("model", f"{name} is a {type(s.model).__name__}, which {route} does not serve")
        return name, s

    ctx.pick = pick

    async def health(request):
        return JSONResponse({"status": "ok"})

    async def list_models(request):
        return JSONResponse(shapes.model_list(served))

    async def get_model(request):
        name = request.path_params["name"]
        if name not in served:
            raise APIError(404, f"the model {name!r} does not exist here; served: {sorted(served)}",
                           param="model", code="model_not_found")
        return JSONResponse(shapes.model_card(name, served[name]))

    async def embeddings(request):
        body = await _body(request, max_body_bytes)
        name, enc = pick(body, _Encoder, "/v1/embeddings")
        texts, fmt = shapes.texts(body, "input"), shapes.encoding_format(body)
        if len(texts) > shapes.MAX_INPUTS:
            raise bad_field("input", f"holds {len(texts)} texts; send at most {shapes.MAX_INPUTS} per request")
        dims = shapes.integer(body, "dimensions", 1, 1 << 20)
        if dims is not None and dims != enc.model.config.dim:
            raise bad_field("dimensions", f"{name} gives {enc.model.config.dim}-dimensional embeddings only")
        c = enc.model.config
        want = attention.spec(body, c.n_layers, c.n_heads)
        tokens = await enc.count.encodings(texts)
        counts = [len(ids) for ids, _ in tokens]
        limit = min(max_input_tokens, enc.context or max_input_tokens)
        for i, n in enumerate(counts):
            if n > limit:
                raise APIError(400, f"input[{i}]: {n} tokens is more than {name} accepts ({limit}); shorten it",
                               param="input", code="context_length_exceeded")
        metrics.tokens.labels(name, "input").inc(sum(counts))
        if want is None:
            vectors, maps = await enc.embed(tokens), None
        else:
            vectors, maps = await enc.batcher.run(enc.explain, texts, want)
        out = shapes.embedding_list(name, vectors, fmt, sum(counts))
        for item, m in zip(out["data"], maps or ()):
            item["qkv"] = {"attention": m}
        return FastJSON(out)

    async def completions(request):
        return await _generate(request, chat=False)

    async def chat_completions(request):
        return await _generate(request, chat=True)

    async def _generate(request, chat: bool):
        body = await _body(request, max_body_bytes)
        name, gen = pick(body, Generator, "/v1/chat/completions" if chat else "/v1/completions")
        prompts, n, max_new_tokens = await _prompts(body, gen, chat)
        c = gen.model.config
        want = attention.spec(body, c.n_layers, c.n_heads)
        stream = shapes.flag(body, "stream")
        options = body.get("stream_options")
        include_usage = stream and isinstance(options, dict) and bool(options.get("include_usage"))
        gen.start()  # no-op when the lifespan started it
        job = Job(name, gen, gen.submit(prompts, n, max_new_tokens, attention=want), chat,
                  prompt_tokens=sum(len(p.ids) for p in prompts) * n, include_usage=include_usage)
        if stream:
            return StreamingResponse(job.events(), media_type="text/event-stream",
                                     headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})
        result = await _unless_disconnected(request, job.result())
        return Response(status_code=499) if result is None else JSONResponse(result)  # 499: nobody reads it

    async def _prompts(body: dict, gen: Generator, chat: bool):
        """The request's prompts (tokenized on a worker thread: a long input must not hold up the other
        requests), choices per prompt and new-token budget."""
        shapes.unsupported(body, {"logprobs": (False, 0), "top_logprobs": (0,), "echo": (False,),
                                  "suffix": ("",), "best_of": (1,), "logit_bias": ({},), "tools": ([],),
                                  "tool_choice": ("none",), "response_format": ({"type": "text"},)})
        n = shapes.integer(body, "n", 1, shapes.MAX_N, 1)
        opts = shapes.sampling(body, getattr(gen.model, "generation_defaults", None) or {})
        stops = shapes.stop(body)
        if stops:
            opts["stop"] = stops
        max_tokens = shapes.integer(body, "max_tokens", 1, max_tokens_limit)
        if chat:
            max_tokens = shapes.integer(body, "max_completion_tokens", 1, max_tokens_limit, max_tokens)
            msgs = shapes.messages(body)
            prompts = [await asyncio.to_thread(gen.chat_prompt, msgs, opts)]
            param, default = "messages", None  # chat: as long as the context allows
        else:
            inputs = shapes.texts(body, "prompt")
            prompts = await asyncio.to_thread(lambda: [gen.prompt(t, opts) for t in inputs])
            param, default = "prompt", 16  # OpenAI's default for completions
        budget = min(gen.check_length(p, max_tokens, limit=max_tokens_limit, max_input=max_input_tokens,
                                      param=param, default=default) for p in prompts)
        return prompts, n, budget

    async def api_error(request, exc: APIError):
        return exc.response()

    async def metrics_text(request):
        return metrics.render()

    async def http_error(request, exc: HTTPException):
        code = {404: "not_found", 405: "method_not_allowed"}.get(exc.status_code)
        msg = f"{request.method} {request.url.path}: {exc.detail}"
        return APIError(exc.status_code, msg, code=code).response()

    async def server_error(request, exc: Exception):
        log.exception("request %s %s failed", request.method, request.url.path)
        return APIError(500, f"internal error: {type(exc).__name__}", code="internal_error").response()

    trimmer = Trimmer(metrics.answered, trim_interval)

    @contextlib.asynccontextmanager
    async def lifespan(app):
        for g in generators:
            g.start()
        trimmer.start()
        try:
            yield
        finally:  # after uvicorn's graceful shutdown: the running requests have finished
            await trimmer.stop()
            for g in generators:
                g.stop()

    routes = [Route("/health", health), Route("/v1/models", list_models),
              Route("/v1/models/{name:path}", get_model),
              Route("/v1/embeddings", embeddings, methods=["POST"]),
              Route("/v1/completions", completions, methods=["POST"]),
              Route("/v1/chat/completions", chat_completions, methods=["POST"]),
              Route("/metrics", metrics_text)]
    routes += media.routes(ctx) + page.routes(ctx)
    app = Starlette(routes=routes, lifespan=lifespan,
                    exception_handlers={APIError: api_error, HTTPException: http_error, Exception: server_error})
    app.state.served, app.state.metrics, app.state.trimmer = served, metrics, trimmer
    app.add_middleware(_Auth, api_key=api_key)
    app.add_middleware(Middleware, metrics=metrics, routes=routes)  # outermost: counts refused requests too
    return app


async def _unless_disconnected(request: Request, work):
    """Await ``work`` unless the client goes away first: then cancel it (which cancels its engine
    requests) and return None."""
    task, gone = asyncio.ensure_future(work), asyncio.create_task(_disconnected(request))
    try:
        await asyncio.wait({task, gone}, return_when=asyncio.FIRST_COMPLETED)
    except BaseException:
        task.cancel()
        raise
    finally:
        gone.cancel()
    if task.done():
        return task.result()
    task.cancel()
    with contextlib.suppress(asyncio.CancelledError):
        await task
    return None


async def _disconnected(request: Request) -> None:
    """Returns once the client has gone away (the body is read already, so the next message the server
    sends is the disconnect)."""
    while (await request.receive())["type"] != "http.disconnect":
        pass
