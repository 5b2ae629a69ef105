"""`qkv serve`: the loaded models behind an OpenAI-compatible HTTP API (uvicorn; ``pip install 'qkv[serve]'``).

``--model NAME_OR_PATH`` serves a registered name (under that name) or a folder (under its folder
name); ``--model NAME=PATH`` picks the name. Models are read as `qkv.load` reads them (safetensors
only). Binds 127.0.0.1 unless ``--host`` says otherwise. On SIGTERM or Ctrl-C uvicorn stops accepting
connections and lets the running requests finish, then the engines stop.
"""

from __future__ import annotations

import os
import sys


from ._args import integer, load_model


def add_parser(sub) -> None:
    sv = sub.add_parser("serve", help="serve models over an OpenAI-compatible HTTP API",
                        description="Serve models over HTTP with OpenAI's API: /v1/embeddings for sentence "
                                    "encoders, /v1/completions and /v1/chat/completions (streaming too) for causal "
                                    "language models, /v1/classify for classifiers, /v1/audio/transcriptions for "
                                    "speech recognizers, /v1/models, /health, /metrics (Prometheus) and a web page "
                                    "at /. Add \"qkv\": {\"attention\": {...}} to a request for its attention.")
    sv.add_argument("--model", action="append", required=True, metavar="NAME_OR_PATH",
                    help="registered name or model folder, or NAME=PATH to choose the served name (repeat to serve "
                         "several)")
    sv.add_argument("--host", default="127.0.0.1", help="address to bind (default 127.0.0.1: this machine only)")
    sv.add_argument("--port", type=integer(0, 65535), default=8000)
    sv.add_argument("--api-key", default=None, help="require 'Authorization: Bearer KEY' on every route but /health "
                    "(default: the QKV_API_KEY environment variable, if set)")
    sv.add_argument("--max-queue", type=integer(0, 1_000_000), default=64,
                    help="generation requests that may wait per model beyond the running batch (429 past it)")
    sv.add_argument("--max-batch", type=integer(1, 4096), default=16, help="requests each model decodes together")
    sv.add_argument("--batch-tokens", type=integer(1, 10_000_000), default=16384,
                    help="tokens an encoder or classifier batch may hold (concurrent requests share a call)")
    sv.add_argument("--max-body-bytes", type=integer(1, 2**40), default=4 * 2**20, help="largest request body")
    sv.add_argument("--max-input-tokens", type=integer(1, 10_000_000), default=8192, help="longest input")
    sv.add_argument("--max-tokens", type=integer(1, 10_000_000), default=4096, help="largest max_tokens accepted")
    sv.add_argument("--log-level", default="info", choices=["critical", "error", "warning", "info", "debug"])


def model_specs(values: list[str]) -> dict[str, str]:
    """``--model`` values as {served name: name or path}."""
    out: dict[str, str] = {}
    for v in values:
        name, eq, path = v.partition("=")
        if not eq or not name or os.sep in name or "/" in name:  # a bare name or path (a path may hold '=')
            name, path = os.path.basename(os.path.normpath(v)) or v, v
        if not path:
            raise ValueError(f"--model {v!r}: give NAME=PATH with a path after '='")
        if name in out:
            raise ValueError(f"--model: the name {name!r} is given twice; choose names with NAME=PATH")
        out[name] = path
    return out


def run(args) -> int:
    try:
        import uvicorn

        from ..serve import create_app
    except ImportError as e:
        raise ImportError(f"qkv serve needs the serve extra: pip install 'qkv[serve]' ({e})") from None
    specs = model_specs(args.model)
    models = {}
    for name, path in specs.items():
        print(f"loading {name} from {path} ...", file=sys.stderr, flush=True)
        models[name] = load_model(args, path)
    app = create_app(models, api_key=args.api_key or os.environ.get("QKV_API_KEY") or None,
                     max_queue=args.max_queue, max_batch=args.max_batch, max_body_bytes=args.max_body_bytes,
                     max_input_tokens=args.max_input_tokens, max_tokens_limit=args.max_tokens,
                     batch_tokens=args.batch_tokens)
    config = uvicorn.Config(app, host=args.host, port=args.port, log_level=args.log_level,
                            timeout_graceful_shutdown=30, lifespan="on")
    print(f"serving {', '.join(models)} on http://{args.host}:{args.port}/v1", file=sys.stderr, flush=True)
    uvicorn.Server(config).run()  # SIGTERM/SIGINT: graceful shutdown, then the lifespan stops the engines
    return 0
