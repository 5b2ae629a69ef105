"""``POST /v1/classify`` (qkv's own shape) and ``POST /v1/audio/transcriptions`` (OpenAI's).

``/v1/classify`` serves text classifiers (`qkv.models.TextEncoder` with
``head="sequence_classification"``) and image or audio classifiers (`qkv.models.VisionTransformer` with a
classification head, ``config.input`` "image" or "audio"). The request is JSON::

    {"model": "sst2", "input": "a fine film" | ["...", ...], "top": 3}         # text
    {"model": "vit", "image": "<base64 PNG or JPEG>" | [...], "top": 3}        # images
    {"model": "kws", "audio": "<base64 WAV, FLAC or OGG>" | [...], "top": 3}   # audio clips

(a ``data:...;base64,`` URL is read as its base64 part). The server reads no files or URLs: only the bytes
sent. The answer, in input order, is what ``model.classify`` gives in-process::

    {"object": "list", "model": "vit",
     "data": [{"index": 0, "label": "cat", "score": 0.91, "top": [["cat", 0.91], ["dog", 0.05], ...]}],
     "usage": {"prompt_tokens": N, "total_tokens": N}}

``top`` (default 5) is how many labels each ``top`` list holds; ``usage`` counts the tokens the model read
(text tokens, or image / spectrogram patches). Concurrent requests to a model are batched (`Batcher`).

``/v1/audio/transcriptions`` serves `qkv.models.SpeechRecognizer` (Whisper) as OpenAI does: a
multipart/form-data upload with ``file`` (WAV, FLAC, OGG: what soundfile reads), ``model`` and optionally
``response_format`` ("json": ``{"text": ..., "usage": {"type": "duration", "seconds": ...}}``, or "text":
the plain text), ``temperature`` (0, the default, is greedy decoding), ``language`` ("en" only) and an empty
``prompt``. Other fields and formats (srt, vtt, verbose_json, timestamp_granularities) are refused by name.
Transcriptions run one at a time per model, in arrival order.

Limits (400 naming the field): inputs per request, pixels per image and per request (decompression
bombs), clip length, sample rate and channels, tokens per text (``max_input_tokens`` and the model's
``max_length``); the body size (413) is checked before anything is parsed.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import io
import math

import numpy as np
from starlette.datastructures import UploadFile
from starlette.exceptions import HTTPException
from starlette.requests import Request
from starlette.responses import JSONResponse, PlainTextResponse
from starlette.routing import Route

from . import openai_shapes as shapes
from .batching import Batcher, TokenCounter
from .errors import APIError, bad_field

MAX_MEDIA_INPUTS = 64  # images or clips per classify request (texts: shapes.MAX_INPUTS)
MAX_IMAGE_PIXELS = 4096 * 4096  # per image, checked from the header before decoding
MAX_REQUEST_PIXELS = 4 * MAX_IMAGE_PIXELS  # all images of one request (decoded RGB: 3 bytes each)
MAX_CLIP_SECONDS = 60.0  # per clip to classify
MAX_TRANSCRIPTION_SECONDS = 600.0  # per upload to transcribe
SAMPLE_RATES = (1000, 192000)  # Hz, inclusive
MAX_CHANNELS = 8
_FIELDS = {"text": "input", "image": "image", "audio": "audio"}  # the classify field each kind reads
_NO_FILES = ("file", "files", "path", "paths", "filename", "url", "image_url", "audio_url")
_FORM_FIELDS = ("file", "model", "language", "prompt", "response_format", "temperature")


class Classifier:
    """A text, image or audio classifier: concurrent requests share one ``classify`` call (`Batcher`,
    by tokens: text tokens, or patches per image or clip)."""

    tasks = ("classify",)

    def __init__(self, name: str, model, kind: str, ctx):
        self.name, self.model, self.kind, self.field = name, model, kind, _FIELDS[kind]
        c = model.config
        self.labels = c.labels or [str(i) for i in range(c.num_labels)]
        if kind == "text":
            self.context = min(ctx.max_input_tokens, c.max_length)  # classify truncates at max_length
        else:
            self.tokens_each = math.prod(s // p for s, p in zip(c.size, c.patch)) + (c.pool == "cls")
        self.batcher = Batcher(self._classify, budget=ctx.batch_tokens, max_items=256 if kind == "text" else 32,
                               max_wait=0.005, max_pending=max(ctx.max_queue, 1) * 64,
                               on_batch=ctx.metrics.batch_observer(name), name=name)
        if kind == "text":
            self.count = TokenCounter(model.tokenizer, self.batcher.lock)

    def _classify(self, items: list) -> list[dict]:
        """``model.classify`` with every label ranked in ``top``."""
        if self.kind != "text":
            return self.model.classify(items, top=len(self.labels))
        ids, types = zip(*items)  # tokenized when counted; the batch runs packed (no padding)
        out = []
        for p in self.model.classify_ids(ids, types, max_tokens=2048):
            top = sorted(zip(self.labels, p.tolist()), key=lambda kv: -kv[1])
            out.append({"label": top[0][0], "score": top[0][1], "top": top})
        return out

    def inputs(self, body: dict) -> tuple[list, list[int]]:
        """The request's inputs, decoded, and their token costs (runs on a worker thread)."""
        if self.kind == "text":
            texts = shapes.texts(body, "input")
            if len(texts) > shapes.MAX_INPUTS:
                raise bad_field("input", f"holds {len(texts)} texts; send at most {shapes.MAX_INPUTS} per request")
            tokens = self.count.encode(texts)
            for i, (ids, _) in enumerate(tokens):
                if len(ids) > self.context:
                    raise APIError(400, f"input[{i}]: {len(ids)} tokens is more than {self.name} accepts "
                                   f"({self.context}); shorten it", param="input", code="context_length_exceeded")
            return tokens, [len(ids) for ids, _ in tokens]
        values = body.get(self.field)
        values = [values] if isinstance(values, str) else values
        if not isinstance(values, list) or not values:
            raise bad_field(self.field, "must be a base64 string or a non-empty list of them, got "
                            f"{type(values).__name__}")
        if len(values) > MAX_MEDIA_INPUTS:
            raise bad_field(self.field, f"holds {len(values)} inputs; send at most {MAX_MEDIA_INPUTS} per request")
        raws = [_base64(v, f"{self.field}[{i}]") for i, v in enumerate(values)]
        if self.kind == "image":
            items = _images(raws)
        else:
            items = [_audio(r, f"audio[{i}]", MAX_CLIP_SECONDS) for i, r in enumerate(raws)]
        return items, [self.tokens_each] * len(items)


class Transcriber:
    """A speech recognizer: transcriptions run one at a time (a `Batcher` of one), in arrival order."""

    tasks = ("transcriptions",)

    def __init__(self, name: str, model, ctx):
        self.name, self.model = name, model
        self.batcher = Batcher(self._transcribe, max_items=1, max_wait=0.0, max_pending=max(ctx.max_queue, 1),
                               on_batch=ctx.metrics.batch_observer(name), name=name)

    def _transcribe(self, items: list) -> list[str]:
        (wave, rate, options), = items
        return [self.model.transcribe(wave, rate, **options)]


def served(name, model, ctx):
    """The served wrapper for a classifier or speech recognizer, or None for other models."""
    from ..models import SpeechRecognizer, TextEncoder, VisionTransformer

    if isinstance(model, TextEncoder) and model.config.head == "sequence_classification":
        if getattr(model, "tokenizer", None) is None:
            raise ValueError(f"model {name!r} has no tokenizer: the server classifies text; put its tokenizer.json "
                             "in the folder (or set model.tokenizer)")
        return Classifier(name, model, "text", ctx)
    if isinstance(model, VisionTransformer):
        if model.classifier is None:
            raise ValueError(f"model {name!r} is a VisionTransformer without a classification head "
                             "(num_labels=0): the server serves image and audio classifiers")
        if model.config.input not in ("image", "audio"):
            raise ValueError(f"model {name!r} classifies {model.config.input!r} arrays, which the server does not "
                             "read: it serves image and audio classifiers")
        return Classifier(name, model, model.config.input, ctx)
    if isinstance(model, SpeechRecognizer):
        if getattr(model, "tokenizer", None) is None:
            raise ValueError(f"model {name!r} has no tokenizer: the server writes text; put its tokenizer.json in "
                             "the folder (or set model.tokenizer)")
        return Transcriber(name, model, ctx)
    return None


# -- decoding bytes -------------------------------------------------------------------------------------------


def _base64(value, where: str) -> bytes:
    if not isinstance(value, str):
        raise bad_field(where, f"must be a base64 string of the file's bytes, got {type(value).__name__}")
    if value.startswith("data:"):  # a data URL: data:image/png;base64,....
        head, _, value = value.partition(",")
        if not head.endswith(";base64"):
            raise bad_field(where, "a data URL must be base64-encoded (data:<type>;base64,...)")
    try:
        return base64.b64decode(value, validate=True)
    except (binascii.Error, ValueError):
        raise bad_field(where, "is not valid base64; send the file's bytes base64-encoded") from None


def _images(raws: list[bytes]) -> list:
    """RGB PIL images from PNG or JPEG bytes, sizes checked from the headers before any pixel is decoded."""
    from PIL import Image

    opened, total = [], 0
    for i, raw in enumerate(raws):
        where = f"image[{i}]"
        try:
            im = Image.open(io.BytesIO(raw), formats=("PNG", "JPEG"))
        except (OSError, ValueError, Image.DecompressionBombError) as e:
            raise bad_field(where, f"is not a PNG or JPEG image ({type(e).__name__}); send the image file's "
                            "bytes, base64-encoded") from None
        w, h = im.size
        total += w * h
        if w * h > MAX_IMAGE_PIXELS:
            raise bad_field(where, f"is {w} x {h} pixels; send at most {MAX_IMAGE_PIXELS} pixels per image")
        if total > MAX_REQUEST_PIXELS:
            raise bad_field("image", f"the images hold more than {MAX_REQUEST_PIXELS} pixels together; send "
                            "fewer or smaller ones")
        opened.append((where, im))
    out = []
    for where, im in opened:
        try:
            out.append(im.convert("RGB"))  # decodes; as the model reads an image file
        except (OSError, ValueError, SyntaxError) as e:
            raise bad_field(where, f"is a broken image ({e}); send the whole file") from None
    return out


def _audio(raw: bytes, where: str, max_seconds: float) -> tuple[np.ndarray, int]:
    """A mono float32 waveform (channels averaged, as `qkv.models.audio.load_audio` reads files) and its
    sample rate; read in blocks, never more than ``max_seconds``."""
    import soundfile

    try:
        f = soundfile.SoundFile(io.BytesIO(raw))
    except (RuntimeError, TypeError, ValueError) as e:  # soundfile.LibsndfileError is a RuntimeError
        raise bad_field(where, f"is not an audio file this server reads (WAV, FLAC, OGG): {e}") from None
    with f:
        rate, channels = f.samplerate, f.channels
        if not SAMPLE_RATES[0] <= rate <= SAMPLE_RATES[1]:
            raise bad_field(where, f"has a sample rate of {rate} Hz; send {SAMPLE_RATES[0]} to {SAMPLE_RATES[1]} Hz")
        if channels > MAX_CHANNELS:
            raise bad_field(where, f"has {channels} channels; send at most {MAX_CHANNELS}")
        limit = int(max_seconds * rate)
        try:
            parts = [b.mean(axis=1) for b in f.blocks(1 << 16, dtype="float32", always_2d=True, frames=limit + 1)]
        except (RuntimeError, ValueError) as e:
            raise bad_field(where, f"is a broken audio file ({e}); send the whole file") from None
    wave = np.concatenate(parts) if parts else np.zeros(0, np.float32)
    if len(wave) > limit:
        raise bad_field(where, f"is longer than {max_seconds:g} s; send a shorter clip")
    return wave, rate


# -- routes ---------------------------------------------------------------------------------------------------


def _check_fields(body: dict, allowed: tuple, clf: Classifier | None = None) -> None:
    for key in body:
        if key in _NO_FILES:
            raise bad_field(key, "the server reads no files or URLs; send the bytes themselves"
                            + (f", base64-encoded in {clf.field!r}" if clf is not None else " as the 'file' upload"))
        if clf is not None and key in _FIELDS.values() and key != clf.field:
            raise bad_field(key, f"{clf.name} classifies {clf.kind}{'s' if clf.kind != 'audio' else ''}; send "
                            f"them in {clf.field!r}")
        if key not in allowed:
            raise bad_field(key, f"is not a field this route reads (it reads {list(allowed)}); leave it out")


async def _form(request: Request, limit: int):
    """The multipart form, parsed as it arrives; 413 past ``limit`` bytes, before or while it does."""
    if not request.headers.get("content-type", "").startswith("multipart/form-data"):
        raise APIError(400, "send the audio as multipart/form-data with 'file' and 'model' parts (as the openai "
                       "client does)", param="file", code="invalid_form")
    size = request.headers.get("content-length")
    too_big = APIError(413, f"the request body ({size or 'more than that'} bytes) is larger than this server "
                       f"accepts ({limit} bytes); send less", code="body_too_large")
    if size is not None and size.isdigit() and int(size) > limit:
        raise too_big
    total = 0

    async def receive():
        nonlocal total
        message = await request.receive()
        total += len(message.get("body", b""))
        if total > limit:
            raise too_big
        return message

    try:
        return await Request(request.scope, receive).form(max_files=1, max_fields=len(_FORM_FIELDS))
    except HTTPException as e:  # python-multipart's refusals
        raise APIError(400, f"the multipart form is malformed: {e.detail}", code="invalid_form") from None


def _transcription_options(form) -> dict:
    for key in form.keys():
        if key not in _FORM_FIELDS:
            raise bad_field(key, f"is not supported by this server; it reads {list(_FORM_FIELDS)}")
    language = (form.get("language") or "").lower()
    if language not in ("", "en", "english"):
        raise bad_field("language", f"{language!r}: this server's Whisper transcribes English only; send 'en' "
                        "or leave it out")
    if form.get("prompt"):
        raise bad_field("prompt", "is not supported by this server; leave it out")
    try:
        temperature = float(form.get("temperature") or 0)
    except ValueError:
        temperature = math.nan
    if not 0 <= temperature <= 1:
        raise bad_field("temperature", f"must be a number in [0, 1], got {form.get('temperature')!r}")
    return {"do_sample": False} if temperature == 0 else {"do_sample": True, "temperature": temperature}


def routes(ctx) -> list:
    async def classify(request):
        body = await ctx.body(request)
        name, clf = ctx.pick(body, Classifier, "/v1/classify")
        _check_fields(body, ("model", clf.field, "top"), clf)
        top = shapes.integer(body, "top", 1, 1 << 20, 5)
        items, costs = await asyncio.to_thread(clf.inputs, body)
        ctx.metrics.tokens.labels(name, "input").inc(sum(costs))
        results = await clf.batcher.submit(items, costs)
        data = [{"index": i, "label": r["label"], "score": r["score"], "top": [list(t) for t in r["top"][:top]]}
                for i, r in enumerate(results)]
        return JSONResponse({"object": "list", "model": name, "data": data,
                             "usage": shapes.usage(sum(costs), 0, embeddings=True)})

    async def transcriptions(request):
        form = await _form(request, ctx.max_body_bytes)
        try:
            name, tr = ctx.pick({"model": form.get("model")}, Transcriber, "/v1/audio/transcriptions")
            options = _transcription_options(form)
            fmt = form.get("response_format") or "json"
            if fmt not in ("json", "text"):
                raise bad_field("response_format", f"{fmt!r} is not supported by this server; use 'json' or 'text'")
            upload = form.get("file")
            if not isinstance(upload, UploadFile):
                raise bad_field("file", "send the audio file as a file upload (a multipart part with a filename)")
            raw = await upload.read()
        finally:
            await form.close()
        wave, rate = await asyncio.to_thread(_audio, raw, "file", MAX_TRANSCRIPTION_SECONDS)
        text, = await tr.batcher.submit([(wave, rate, options)], [1])
        if fmt == "text":
            return PlainTextResponse(text)
        return JSONResponse({"text": text, "usage": {"type": "duration", "seconds": math.ceil(len(wave) / rate)}})

    return [Route("/v1/classify", classify, methods=["POST"]),
            Route("/v1/audio/transcriptions", transcriptions, methods=["POST"])]
