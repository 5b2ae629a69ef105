"""The `qkv` command. Subcommands are thin front ends over the library; only this layer prints."""

from __future__ import annotations

import argparse
import json
import os
import sys

import qkv

from ._args import (
    Parser,
    UsageError,
    add_precision,
    input_file,
    int_list,
    integer,
    load_model,
    number,
    output_file,
    report,
)


def _cmd_bench(args) -> int:
    import importlib

    from . import bench

    progress = None if args.json else (lambda s: print(f"  {s} ...", file=sys.stderr, flush=True))
    if args.what in ("text", "media", "vision", "train"):  # against transformers: the test extras
        try:
            suite = importlib.import_module(f"qkv.cli.bench_{args.what}")
            import transformers  # noqa: F401
        except ImportError as e:
            print(f"qkv bench {args.what} needs the test extras: pip install -e '.[test]' ({e})", file=sys.stderr)
            return 2
        result = suite.run(repeat=args.repeat or 3, progress=progress)
    elif args.what == "generate":  # qkv's own engine against its own sequential decoding: no extras needed
        suite = importlib.import_module("qkv.cli.bench_generate")
        result = suite.run(quick=args.quick, repeat=args.repeat, progress=progress)
    elif args.what == "serve":  # the HTTP server in a child process; the one-at-a-time baseline needs the test extras
        suite = importlib.import_module("qkv.cli.bench_serve")
        result = suite.run(quick=args.quick, repeat=args.repeat, soak_seconds=args.soak_seconds, only=args.only,
                           progress=progress)
    elif args.what == "engines":  # CTranslate2 / ONNX Runtime, optional: a missing engine skips its rows
        suite = importlib.import_module("qkv.cli.bench_engines")
        result = suite.run(quick=args.quick, repeat=args.repeat, only=args.only, progress=progress)
    else:  # attention: the core against SDPA and FlexAttention
        result = bench.run(quick=args.quick, repeat=args.repeat, memory=not args.no_memory, only=args.only,
                           progress=progress)
        if not args.json:
            env = result["env"]
            print(f"qkv {env['qkv']} | torch {env['torch']} | {env['threads']} threads | {env['cpu']}")
            print("fp32, B=1, H=8, D=64; speedup = baseline time / qkv time, measured interleaved in one process\n")
        suite = bench
    print(json.dumps(result, indent=2) if args.json else suite.format_table(result, markdown=args.markdown))
    return 0


def _cmd_backends(args) -> int:
    av = qkv.backends.available()
    if args.json:
        rows = {}
        for name, caps in av.items():
            d = {k: v for k, v in vars(caps).items()}
            d["dtypes"] = [str(t).removeprefix("torch.") for t in caps.dtypes]
            rows[name] = d
        print(json.dumps(rows, indent=2))
        return 0
    flags = ["masks", "score_mod", "bias", "dropout", "weights", "lse", "backward"]
    print("backend   " + " ".join(f"{f:>9}" for f in flags) + "  notes")
    for name, caps in av.items():
        marks = " ".join(f"{('yes' if getattr(caps, f) else '-'):>9}" for f in flags)
        note = caps.notes if caps.available else f"unavailable: {caps.reason}"
        print(f"{name:<9} {marks}  {note}")
    return 0


def _texts(args) -> list[str]:
    texts = list(args.text)
    if args.file:
        path = input_file(args.file, "--file")
        try:
            with open(path, encoding="utf-8") as f:
                texts += [line.rstrip("\n") for line in f if line.strip()]
        except UnicodeDecodeError as e:
            raise ValueError(f"--file {args.file}: not UTF-8 text (byte {e.start}); save it as UTF-8") from None
    if not texts:
        raise SystemExit("give at least one text (or --file with one text per line)")
    return texts


def _cmd_embed(args) -> int:
    texts = _texts(args)
    model = _model_that(args, "embed", "embed sentences (give a sentence encoder such as all-MiniLM-L6-v2)")
    vectors = model.embed(texts, batch_size=args.batch_size)
    if args.json:
        print(json.dumps({"model": args.model, "dim": vectors.shape[1], "texts": texts,
                          "embeddings": [[round(x, 7) for x in v.tolist()] for v in vectors]}))
        return 0
    for t, v in zip(texts, vectors):
        head = " ".join(f"{x:+.4f}" for x in v[:6].tolist())
        print(f"{head} ... ({vectors.shape[1]} dims)  {_safe(t[:60])}")
    return 0


def _model_that(args, method: str, does: str):
    """``qkv.load(args.model)``, refused with a message unless it has ``method``."""
    model = load_model(args, args.model)
    if not hasattr(model, method):
        raise ValueError(f"{args.model} is a {type(model).__name__}, which does not {does}")
    return model


def _cmd_classify(args) -> int:
    model = _model_that(args, "classify", "classify")
    inputs = _texts(args)
    results = model.classify(inputs)
    rows = []
    for item, r in zip(inputs, results):
        scores = r.get("scores") or dict(r.get("top", []))
        top = sorted(scores.items(), key=lambda kv: -kv[1])[: args.top]
        rows.append({"input": item, "label": r["label"], "score": r["score"], "top": top})
    if args.json:
        print(json.dumps(rows))
    else:
        for row in rows:
            rest = ", ".join(f"{k} {v:.3f}" for k, v in row["top"][1:])
            print(_safe(f"{row['label']}  {row['score']:.3f}  {str(row['input'])[:60]}" + (f"  ({rest})" if rest else "")))
    return 0


def _cmd_generate(args) -> int:
    model = _model_that(args, "generate", "generate text")
    prompts = _texts(args)
    sample = args.sample or args.temperature != 1.0 or any(
        v is not None for v in (args.top_k, args.top_p, args.min_p))
    if sample and args.num_beams:
        raise UsageError("--num-beams is beam search (deterministic): drop --sample, --temperature, --top-k, "
                         "--top-p and --min-p, or drop --num-beams")
    out = model.generate(prompts, max_new_tokens=args.max_new_tokens, do_sample=sample, temperature=args.temperature,
                         top_k=args.top_k, top_p=args.top_p, min_p=args.min_p, seed=args.seed, stop=args.stop or None,
                         repetition_penalty=args.repetition_penalty, num_beams=args.num_beams)
    if args.json:
        print(json.dumps([{"prompt": p, "completion": c} for p, c in zip(prompts, out)]))
    else:
        for p, c in zip(prompts, out):
            print(_safe(p + c if model.continues_prompt else c))
    return 0


def _cmd_chat(args) -> int:
    from . import chat

    return chat.run(args)


def _cmd_serve(args) -> int:
    from . import serve

    return serve.run(args)


def _cmd_transcribe(args) -> int:
    for path in args.files:
        input_file(path, "audio file")
    model = _model_that(args, "transcribe", "transcribe speech (give a speech recognizer such as whisper-tiny.en)")
    rows = []
    for path in args.files:
        text, seconds = model.transcribe(path, return_timing=True, max_new_tokens=args.max_new_tokens)
        rows.append({"file": path, "text": text, "seconds": round(seconds, 3)})
        if not args.json:
            print(_safe(f"{path}\t{text}"))
    if args.json:
        print(json.dumps(rows, indent=2))
    return 0


def _cmd_explain(args) -> int:
    import time

    from .. import explain as X

    start = time.perf_counter()
    layer = "rollout" if args.rollout else args.layer
    output_file(args.html, "--html", ".html")
    output_file(args.png, "--png", ".png")
    capture = dict(topk=args.topk, full=True if args.full else None)
    if args.layers:
        capture["layers"] = args.layers
    if args.image:
        input_file(args.image, "--image")
        if not args.model:
            raise ValueError("--image needs --model: a ViT folder (config.json + model.safetensors)")
        model = load_model(args, args.model)
        ex = X.explain_image(model, args.image, name=args.model, **capture)
    elif args.audio:
        input_file(args.audio, "--audio")
        name = args.model or "whisper-tiny.en"
        ex = X.explain_audio(load_model(args, name), args.audio, name=name, **capture)
    else:
        texts = _texts(args)
        name = args.model or "all-MiniLM-L6-v2"
        ex = X.explain_text(load_model(args, name), " ".join(texts), name=name, **capture)
    layer, head = ex.resolve_layer(layer), ex.resolve_head(args.head)  # out-of-range values are refused here
    if args.token is not None:
        X.find_token(ex, args.token)  # a token that is not there is refused, whatever the output
    if args.html:
        X.render_html(ex, args.html, token=args.token if ex.kind == "text" else None)
    if args.png:
        X.png(ex, args.png, token=args.token, layer=layer, head=head)
    if args.json:
        data = ex.to_dict(layer=None if layer in (None, "rollout") else layer, head=head,
                          include_rollout=args.rollout)
        data["seconds"] = round(time.perf_counter() - start, 3)
        print(json.dumps(data))
        return 0
    if ex.kind == "text" and ex.length <= 2048:
        X.terminal(ex, token=args.token, layer=layer, head=head)
    else:
        print(_safe(f"{ex.model}: {ex.kind}, {ex.length} positions, {len(ex.maps)} layers captured"))
    for note in ex.notes:
        print(_safe(f"note: {note}"))
    for what, path in (("html", args.html), ("png", args.png)):
        if path:
            print(_safe(f"wrote {what}: {path}"))
    return 0


def _cmd_train(args) -> int:
    import logging

    from ..train import fit, load_config

    logging.basicConfig(level=logging.INFO, format="%(message)s", stream=sys.stderr)
    cfg = load_config(args.config, args.set or [])
    result = fit(cfg, resume=args.resume, progress=not args.quiet)
    summary = {"out": str(result.out), "step": result.step, "val": result.metrics, "test": result.test,
               "interrupted": result.interrupted, "stopped_early": result.stopped_early}
    if os.environ.get("RANK", "0") == "0":  # under torchrun, the first process reports
        print(json.dumps(summary) if args.json else "\n".join(f"{k}: {v}" for k, v in summary.items()))
    return 130 if result.interrupted else 0


def _cmd_evaluate(args) -> int:
    from pathlib import Path

    from ..data import load_data
    from ..train import TrainConfig, evaluate
    from ..train.config import load_config

    folder = Path(args.checkpoint)
    if (folder / "model.safetensors").exists() and not (folder / "config.json").exists():
        folder = folder.parent.parent  # a checkpoints/step_N folder: its run folder has the config
    cfg_file = folder / "config.json"
    if not cfg_file.exists():
        raise FileNotFoundError(f"{folder}: no config.json; give a training output folder (qkv train's `out`)")
    from ..pretrained import load_weights, read_json

    saved = read_json(cfg_file)
    if "qkv_train" not in saved:
        raise ValueError(f"{folder} was not written by qkv train: no training config to rebuild its data from")
    cfg: TrainConfig = load_config(None, args.set or [], base=saved["qkv_train"])
    model = qkv.load(folder)
    if Path(args.checkpoint) != folder:
        load_weights(model, Path(args.checkpoint) / "model.safetensors")
    data = load_data(cfg.data, cfg.task, cfg.seed)
    result = {split: evaluate(cfg.task, model, data, split, cfg.train.batch_size, cfg.data.block_size, 0)
              for split in args.split}
    print(json.dumps(result) if args.json else "\n".join(f"{k}: {v}" for k, v in result.items()))
    return 0


def _cmd_info(args) -> int:
    from dataclasses import asdict

    model = load_model(args, args.model)
    info = {
        "model": args.model,
        "source": getattr(model, "source", None),
        "family": type(model).__name__,
        "parameters": model.num_parameters(),
        "attention_backend": model.backend,
        "available_backends": [n for n, c in qkv.backends.available().items() if c.available],
        "tokenizer": model.tokenizer is not None,
        "config": asdict(model.config),
    }
    if args.json:
        print(json.dumps(info, indent=2, default=str))
        return 0
    print(f"{info['model']}: {info['family']}, {info['parameters'] / 1e6:.1f}M parameters")
    print(f"  source: {info['source']}")
    print(f"  attention backend: {info['attention_backend']} (available: {', '.join(info['available_backends'])})")
    print(f"  tokenizer: {'yes' if info['tokenizer'] else 'no'}")
    for k, v in info["config"].items():
        print(f"  {k}: {v}")
    return 0


def _inputs(parser, text_help: str, one: str, model_help: str) -> None:
    """The positional inputs, --file (one per line) and a required --model."""
    parser.add_argument("text", nargs="*", help=text_help)
    parser.add_argument("--file", help=f"a text file with one {one} per line")
    parser.add_argument("--model", required=True, help=model_help)


def build_parser() -> argparse.ArgumentParser:
    p = Parser(prog="qkv", description="Self-attention for PyTorch: attention core, models, tools.")
    p.add_argument("--version", action="version", version=f"qkv {qkv.__version__}")
    sub = p.add_subparsers(dest="command", metavar="COMMAND")

    b = sub.add_parser("bench", help="benchmarks (ratios against baselines measured in the same run)",
                       description="Run a benchmark suite and print a table of speedups and peak memory.")
    b.add_argument("what", choices=["attention", "text", "media", "vision", "train", "generate", "serve", "engines"],
                   help="attention: the core vs SDPA/FlexAttention; text: embeddings and decoding; "
                        "media: transcription and ViT; vision: detection, segmentation and captioning forward; "
                        "train: GPT-2-style training steps (these four against the reference libraries); "
                        "generate: continuous batching against requests run one after another, latency at "
                        "1/4/16 concurrent requests, turn-2 prefill with a KV cache; serve: the HTTP server "
                        "(embeddings, attention, streaming chat, a soak; --only embeddings|chat|soak); engines: "
                        "qkv float32/bfloat16/int8 against CTranslate2 and ONNX Runtime (pip install -e "
                        "'.[engines]'; --only gpt2|minilm|whisper)")
    b.add_argument("--quick", action="store_true", help="a short subset (under a minute on 2 cores)")
    b.add_argument("--repeat", type=integer(1, 1000), default=None, help="timed repetitions per case (median is reported)")
    b.add_argument("--only", default=None, help="only cases whose name contains this text")
    b.add_argument("--no-memory", action="store_true", help="skip the peak-memory probes")
    b.add_argument("--soak-seconds", type=number(0, 86400), default=None,
                   help="serve: length of the soak (default 120; --quick: 5)")
    b.add_argument("--markdown", action="store_true", help="print Markdown tables (for BENCHMARKS.md)")
    b.add_argument("--json", action="store_true", help="print the results as JSON")
    b.set_defaults(func=_cmd_bench)

    em = sub.add_parser("embed", help="sentence embeddings", description="Embed texts with a sentence encoder.")
    em.add_argument("text", nargs="*", help="texts to embed")
    em.add_argument("--file", help="a text file with one text per line")
    em.add_argument("--model", default="all-MiniLM-L6-v2", help="registered name or model folder")
    em.add_argument("--batch-size", type=integer(1, 65536), default=32, help="texts per forward pass")
    em.add_argument("--json", action="store_true", help="print the vectors as JSON")
    em.set_defaults(func=_cmd_embed)

    cl = sub.add_parser("classify", help="labels for texts, images or audio clips",
                        description="Classify with a trained text classifier or ViT (images, or audio/signal models "
                                    "trained by qkv train).")
    _inputs(cl, "texts, or image / audio file paths", "input", "model folder (e.g. a qkv train output folder)")
    cl.add_argument("--top", type=integer(1), default=3, help="labels shown per input")
    cl.add_argument("--json", action="store_true")
    cl.set_defaults(func=_cmd_classify)

    ge = sub.add_parser("generate", help="continue a prompt with a language model",
                        description="Generate text with a causal or encoder-decoder model (KV-cached decoding).")
    _inputs(ge, "prompts", "prompt", "model folder (config.json, model.safetensors, tokenizer.json)")
    ge.add_argument("--max-new-tokens", type=integer(0, 1_000_000), default=32)
    ge.add_argument("--sample", action="store_true", help="sample instead of greedy decoding")
    ge.add_argument("--temperature", type=number(0, 100, low_open=True), default=1.0)
    ge.add_argument("--top-k", type=integer(1), default=None)
    ge.add_argument("--top-p", type=number(0, 1, low_open=True), default=None)
    ge.add_argument("--min-p", type=number(0, 1), default=None, help="drop tokens below min_p x the top probability")
    ge.add_argument("--seed", type=integer(0, 2**63 - 1), default=None)
    ge.add_argument("--repetition-penalty", type=number(0, 100, low_open=True), default=None,
                    help="transformers' repetition penalty (> 1 discourages repeats)")
    ge.add_argument("--stop", action="append", default=[], metavar="TEXT",
                    help="end the completion before this text (repeatable)")
    ge.add_argument("--num-beams", type=integer(1, 64), default=None, help="beam search with this many beams")
    ge.add_argument("--json", action="store_true", help="print prompts and completions as JSON")
    ge.set_defaults(func=_cmd_generate)

    ch = sub.add_parser("chat", help="a multi-turn conversation with a chat model",
                        description="Chat with a causal LM that has a chat template, one message per stdin line "
                                    "(terminal or piped); the reply streams, the KV cache is kept between turns. "
                                    "/reset clears the conversation, /exit or end of input quits.")
    ch.add_argument("--model", required=True, help="model folder (config.json, model.safetensors, tokenizer.json "
                    "and a chat template)")
    ch.add_argument("--template", help="a Jinja chat template file, for a model whose tokenizer has none")
    ch.add_argument("--system", default=None, help="the system message")
    ch.add_argument("--max-new-tokens", type=integer(1, 1_000_000), default=None,
                    help="longest reply, and the room kept for it in the context (default 256 or half the context)")
    ch.add_argument("--max-context", type=integer(2, 1_000_000), default=None, help="tokens of context (default: "
                    "the model's max_positions); when full, the oldest turns are dropped")
    ch.add_argument("--sample", action="store_true", help="sample instead of greedy decoding")
    ch.add_argument("--temperature", type=number(0, 100, low_open=True), default=1.0)
    ch.add_argument("--top-p", type=number(0, 1, low_open=True), default=None)
    ch.add_argument("--seed", type=integer(0, 2**63 - 1), default=None)
    ch.add_argument("--explain", type=integer(1, 1000), nargs="?", const=10, default=None, metavar="N",
                    help="after each reply, the N (default 10) earlier tokens it attended to most")
    ch.add_argument("--json", action="store_true", help="one JSON object per turn (nothing streamed)")
    ch.set_defaults(func=_cmd_chat)

    from . import serve as _serve

    _serve.add_parser(sub)
    sub.choices["serve"].set_defaults(func=_cmd_serve)

    tr = sub.add_parser("transcribe", help="speech to text", description="Transcribe English speech (WAV, FLAC, ...).")
    tr.add_argument("files", nargs="+", help="audio files")
    tr.add_argument("--model", default="whisper-tiny.en", help="registered name or model folder")
    tr.add_argument("--max-new-tokens", type=integer(1, 1_000_000), default=None, help="tokens per 30 s window (default: as many as fit)")
    tr.add_argument("--json", action="store_true", help="print text and timing per file as JSON")
    tr.set_defaults(func=_cmd_transcribe)

    ex = sub.add_parser("explain", help="where each token, patch or frame attends",
                        description="Capture a model's attention on one input and show it: terminal light bulbs, "
                                    "a PNG heatmap, a self-contained HTML page, or JSON.")
    ex.add_argument("text", nargs="*", help="text to explain")
    ex.add_argument("--file", help="read the text from a file")
    ex.add_argument("--model", default=None, help="registered name or model folder (text default: all-MiniLM-L6-v2)")
    ex.add_argument("--image", help="an image file (with a ViT --model)")
    ex.add_argument("--audio", help="an audio file (default model: whisper-tiny.en)")
    ex.add_argument("--layer", type=integer(), default=None, help="layer to show (default: the last; -1 counts "
                    "from the end)")
    ex.add_argument("--layers", type=int_list, default=None, help="comma-separated layers to capture (default: all)")
    ex.add_argument("--head", type=integer(), default=None, help="head to show (default: the mean of heads)")
    ex.add_argument("--rollout", action="store_true", help="show attention rollout (Abnar and Zuidema, 2020)")
    ex.add_argument("--token", default=None, help="the token (text or index) whose attention the terminal/PNG shows")
    ex.add_argument("--topk", type=integer(1, 65536), default=16, help="keys kept per query when inputs are long")
    ex.add_argument("--full", action="store_true", help="keep full matrices even for long inputs")
    ex.add_argument("--html", help="write a self-contained HTML page here")
    ex.add_argument("--png", help="write a PNG heatmap here")
    ex.add_argument("--json", action="store_true", help="print tokens and weights as JSON")
    ex.set_defaults(func=_cmd_explain)

    tn = sub.add_parser("train", help="train a model from a TOML config",
                        description="Train on built-in or your own data: progress, metrics.jsonl, curves.png, "
                                    "atomic checkpoints, --resume; under torchrun, DistributedDataParallel.")
    tn.add_argument("config", nargs="?", default=None, help="TOML file (tables: data, model, train)")
    tn.add_argument("--set", action="append", metavar="KEY=VALUE", help="override a field, e.g. --set train.lr=3e-4")
    tn.add_argument("--resume", action="store_true", help="continue from the last checkpoint in `out`")
    tn.add_argument("--quiet", action="store_true", help="no progress output")
    tn.add_argument("--json", action="store_true", help="print the summary as JSON")
    tn.set_defaults(func=_cmd_train)

    ev = sub.add_parser("evaluate", help="evaluate a trained model on its task",
                        description="Evaluate a qkv train output folder (or one of its checkpoints).")
    ev.add_argument("checkpoint", help="the run folder, or checkpoints/step_N inside it")
    ev.add_argument("--split", nargs="+", default=["test"], choices=["train", "val", "test"])
    ev.add_argument("--set", action="append", metavar="KEY=VALUE", help="override a config field")
    ev.add_argument("--json", action="store_true")
    ev.set_defaults(func=_cmd_evaluate)

    inf = sub.add_parser("info", help="describe a model", description="Architecture, size and attention backend of a model.")
    inf.add_argument("model", help="registered name or model folder")
    inf.add_argument("--json", action="store_true")
    inf.set_defaults(func=_cmd_info)

    be = sub.add_parser("backends", help="list attention backends and what each supports",
                        description="List the registered attention backends with their capabilities.")
    be.add_argument("--json", action="store_true", help="print as JSON")
    be.set_defaults(func=_cmd_backends)
    from . import vision_tasks as _vision_tasks  # detect, segment, caption

    _vision_tasks.add_parsers(sub)
    for command in sub.choices.values():  # every command that loads --model takes --dtype and --quantize
        if any("--model" in a.option_strings for a in command._actions):
            add_precision(command)
    return p


def _safe(text: str) -> str:
    """Text for the terminal: controls that could drive it (escape sequences) shown as visible stand-ins."""
    from ..explain.tokens import terminal_safe

    return terminal_safe(text)


def main(argv: list[str] | None = None) -> int:
    """Run the `qkv` command; returns its exit status (0 ok, 2 an error the message explains, 130 interrupted)."""
    argv = sys.argv[1:] if argv is None else list(argv)
    as_json = "--json" in argv
    parser = build_parser()
    try:
        args = parser.parse_args(argv)
    except UsageError as e:
        if not as_json:
            print(getattr(e, "usage", parser.format_usage()), end="", file=sys.stderr)
        return report(next((a for a in argv if not a.startswith("-")), None), e, as_json)
    if not getattr(args, "func", None):
        parser.print_help()
        return 0
    as_json = bool(getattr(args, "json", False))
    try:
        return args.func(args)
    except BrokenPipeError:  # output piped into `head` and the like: stop quietly
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 0
    except KeyboardInterrupt:
        print(f"qkv {args.command}: interrupted", file=sys.stderr)
        return 130
    except (ValueError, TypeError, ImportError, RuntimeError, OSError, KeyError) as e:
        # ConfigError, DataError and ConversionError are ValueErrors; soundfile's errors are RuntimeErrors
        if os.environ.get("QKV_DEBUG"):
            raise
        return report(args.command, e, as_json)
    except Exception as e:  # noqa: BLE001 -- a bug of ours: one line, and how to see the traceback
        if os.environ.get("QKV_DEBUG"):
            raise
        return report(args.command, e, as_json, f"internal error ({type(e).__name__}: {e}); run again with "
                      "QKV_DEBUG=1 for the traceback and report it")


if __name__ == "__main__":
    sys.exit(main())
