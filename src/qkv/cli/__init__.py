"""The `qkv` command. Subcommands are thin front ends over the library; only this layer prints."""

from __future__ import annotations

import argparse
import json
import sys

import qkv


def _cmd_bench(args) -> int:
    from . import bench

    if args.what != "attention":
        print(f"unknown benchmark {args.what!r}; available: attention", file=sys.stderr)
        return 2
    progress = None if args.json else (lambda s: print(f"  {s} ...", file=sys.stderr, flush=True))
    result = bench.run(quick=args.quick, repeat=args.repeat, memory=not args.no_memory, only=args.only,
                       progress=progress)
    if args.json:
        print(json.dumps(result, indent=2))
    else:
        env = result["env"]
        print(f"qkv {env['qkv']} | torch {env['torch']} | {env['threads']} threads | {env['cpu']}")
        print("fp32, B=1, H=8, D=64; speedup = baseline time / qkv time, measured interleaved in one process\n")
        print(bench.format_table(result, markdown=args.markdown))
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


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="qkv", description="Self-attention for PyTorch: attention core, models, tools.")
    p.add_argument("--version", action="version", version=f"qkv {qkv.__version__}")
    sub = p.add_subparsers(dest="command", metavar="COMMAND")

    b = sub.add_parser("bench", help="benchmarks (ratios against baselines measured in the same run)",
                       description="Run a benchmark suite and print a table of speedups and peak memory.")
    b.add_argument("what", choices=["attention"], help="which suite")
    b.add_argument("--quick", action="store_true", help="a short subset (under a minute on 2 cores)")
    b.add_argument("--repeat", type=int, default=None, help="timed repetitions per case (median is reported)")
    b.add_argument("--only", default=None, help="only cases whose name contains this text")
    b.add_argument("--no-memory", action="store_true", help="skip the peak-memory probes")
    b.add_argument("--markdown", action="store_true", help="print Markdown tables (for BENCHMARKS.md)")
    b.add_argument("--json", action="store_true", help="print the results as JSON")
    b.set_defaults(func=_cmd_bench)

    be = sub.add_parser("backends", help="list attention backends and what each supports",
                        description="List the registered attention backends with their capabilities.")
    be.add_argument("--json", action="store_true", help="print as JSON")
    be.set_defaults(func=_cmd_backends)
    return p


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if not getattr(args, "func", None):
        parser.print_help()
        return 0
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
