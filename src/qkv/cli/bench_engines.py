"""`qkv bench engines`: qkv against the CPU engines people pick for speed, same weights, same threads.

- GPT-2 124M greedy decoding (random weights saved by ``transformers``, converted with CTranslate2's
  own converter): qkv float32 / int8 against CTranslate2 float32 / int8; prompts of 24-39 tokens, 64
  new tokens each, one request at a time; quality: greedy tokens equal to qkv float32, by position.
(MiniLM against ONNX Runtime and whisper-tiny.en against CTranslate2 are the next rows; their quality
is tested in tests/models/test_precision_real.py.)

Every engine runs in this process with 2 intra-op threads (``torch.set_num_threads`` and the engines'
own thread settings); all four are timed interleaved (medians of ``repeat`` rounds). The engine is
optional: ``pip install ctranslate2``; without it the rows are skipped with the reason.
"""

from __future__ import annotations

import json
import statistics
import tempfile
import time
from pathlib import Path

import torch

import qkv

from .bench import rate_table

THREADS = 2
# OpenMP runtimes keep their threads spinning after a parallel region (Intel's, in CTranslate2's wheels,
# for KMP_BLOCKTIME = 200 ms; libgomp too): a call timed right after another engine's would share the cores
# with its spinning threads. Each timed call starts after this pause.
SETTLE_S = 0.5


def _interleave(fns: dict, repeat: int) -> dict:
    """Seconds per call of each function, medians of ``repeat`` rounds that run them in turn."""
    times: dict = {k: [] for k in fns}
    for _ in range(repeat):
        for k, fn in fns.items():
            time.sleep(SETTLE_S)
            t0 = time.perf_counter()
            fn()
            times[k].append(time.perf_counter() - t0)
    return {k: statistics.median(v) for k, v in times.items()}


# -- GPT-2 -------------------------------------------------------------------------------------------------


def _gpt2_folder(root: Path) -> Path:
    """A GPT-2 124M folder saved by transformers (random weights, seed 0) with a word-level vocabulary
    that CTranslate2's converter can read (token strings t0..t50256, no merges)."""
    import transformers

    folder = root / "gpt2"
    folder.mkdir()
    torch.manual_seed(0)
    cfg = transformers.GPT2Config(vocab_size=50257, n_positions=1024, n_embd=768, n_layer=12, n_head=12)
    transformers.GPT2LMHeadModel(cfg).eval().save_pretrained(folder, safe_serialization=True)
    vocab = {f"t{i}": i for i in range(cfg.vocab_size - 1)} | {"<|endoftext|>": cfg.vocab_size - 1}
    (folder / "vocab.json").write_text(json.dumps(vocab))
    (folder / "merges.txt").write_text("#version: 0.2\n")
    transformers.GPT2Tokenizer(str(folder / "vocab.json"), str(folder / "merges.txt")).save_pretrained(folder)
    return folder


def _prompts(n: int, vocab: int = 50256) -> list[list[int]]:
    g = torch.Generator().manual_seed(1)
    return [torch.randint(0, vocab, (24 + i % 16,), generator=g).tolist() for i in range(n)]


def bench_gpt2(root: Path, repeat: int, quick: bool, new: int = 64) -> list[dict]:
    import ctranslate2
    from ctranslate2.converters import TransformersConverter

    folder = _gpt2_folder(root)
    prompts = _prompts(2 if quick else 6)
    ct2 = {}
    for ctype in ("float32", "int8"):
        out = root / f"gpt2-ct2-{ctype}"
        TransformersConverter(str(folder)).convert(str(out), quantization=ctype)
        ct2[ctype] = ctranslate2.Generator(str(out), device="cpu", compute_type=ctype, intra_threads=THREADS,
                                           inter_threads=1)
    ours = {"float32": qkv.load(folder).eval(), "int8": qkv.load(folder).eval().quantize("int8")}

    def run_qkv(model):
        return [model.generate(torch.tensor([p]), max_new_tokens=new, eos_token_id=[])[0, len(p):].tolist()
                for p in prompts]

    def run_ct2(gen):
        res = gen.generate_batch([[f"t{i}" for i in p] for p in prompts], max_length=new, min_length=new,
                                 sampling_topk=1, include_prompt_in_result=False, beam_size=1)
        return [r.sequences_ids[0] for r in res]

    fns = {f"qkv {k}": (lambda m=m: run_qkv(m)) for k, m in ours.items()}
    fns |= {f"CTranslate2 {k}": (lambda g=g: run_ct2(g)) for k, g in ct2.items()}
    tokens = {k: fn() for k, fn in fns.items()}  # warm-up, and the tokens to compare
    secs = _interleave(fns, repeat)
    ref = tokens["qkv float32"]
    total = sum(len(t) for t in ref)
    rows = []
    for ctype in ("float32", "int8"):
        q, e = f"qkv {ctype}", f"CTranslate2 {ctype}"
        same_q = sum(a == b for x, y in zip(tokens[q], ref) for a, b in zip(x, y))
        same_e = sum(a == b for x, y in zip(tokens[e], ref) for a, b in zip(x, y))
        rows.append({"case": f"GPT-2 124M greedy, {len(prompts)} prompts x {new} tokens, {ctype}",
                     "baseline": e, "baseline_per_s": total / secs[e], "qkv_per_s": total / secs[q],
                     "speedup": secs[e] / secs[q], "unit": "tokens/s",
                     "check": f"tokens = qkv fp32: qkv {same_q}/{total}, {e.split()[0]} {same_e}/{total}"})
    return rows


def run(quick: bool = False, repeat: int | None = None, only: str | None = None, progress=None) -> dict:
    torch.set_num_threads(THREADS)
    repeat = repeat or (3 if quick else 5)
    suites = {"gpt2": bench_gpt2}
    rows = []
    with tempfile.TemporaryDirectory(prefix="qkv-bench-engines-") as tmp:
        for name, fn in suites.items():
            if only and only != name:
                continue
            if progress is not None:
                progress(name)
            try:
                rows += fn(Path(tmp), repeat, quick)
            except ImportError as e:
                rows.append({"case": name, "baseline": "-", "check": f"skipped: {e}"})
    return {"rows": rows, "threads": THREADS, "torch": torch.__version__}


def format_table(result: dict, markdown: bool = False) -> str:
    done = [r for r in result["rows"] if "speedup" in r]
    out = rate_table({"speed": done}, markdown) if done else ""
    skipped = [f"{r['case']}: {r['check']}" for r in result["rows"] if "speedup" not in r]
    return "\n".join([out, *skipped]).strip()
