"""`qkv bench engines`: qkv against the CPU engines people pick for speed, same weights, same threads.

- GPT-2 124M greedy decoding (random weights saved by ``transformers``, converted with CTranslate2's
  own converter): qkv float32 / int8 against CTranslate2 float32 / int8; prompts of 24-39 tokens, 64
  new tokens each, one request at a time; quality: greedy tokens equal to qkv float32, by position.
- all-MiniLM-L6-v2 sentence embeddings (the offline checkpoint): qkv float32 / bfloat16 / int8 against
  ONNX Runtime float32 (transformers' BertModel exported by ``torch.onnx.export``, all graph
  optimisations on) and ONNX Runtime int8 (its ``quantize_dynamic``); generated sentences of 6-30 words
  in length-sorted batches of 32 through the same tokenizer, mean pooling; quality: min cosine to qkv
  float32 over the sentences.
- whisper-tiny.en transcription (the offline CTranslate2 checkpoint, read by qkv directly): qkv float32
  / int8 against CTranslate2's Whisper (faster-whisper's engine) float32 / int8, greedy, one clip at a
  time, log-mel features computed by qkv for both; clips synthesised by espeak-ng; quality: transcripts
  equal to qkv float32's.

Every engine runs in this process with 2 intra-op threads (``torch.set_num_threads`` and the engines'
own thread settings); all four are timed interleaved (medians of ``repeat`` rounds). The engine is
optional (``pip install -e '.[engines]'``); without one, its rows are skipped
with the reason.
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

    def run_ct2(gen):  # one request at a time, as qkv's side runs them
        return [gen.generate_batch([[f"t{i}" for i in p]], max_length=new, min_length=new, sampling_topk=1,
                                   include_prompt_in_result=False, beam_size=1)[0].sequences_ids[0] for p in prompts]

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


# -- MiniLM ------------------------------------------------------------------------------------------------


def _sentences(n: int) -> list[str]:
    import random

    rng = random.Random(0)
    words = ("the a bank river money stock market green old new fast slow quickly house tree city model attention "
             "token sequence learns language image sound people buy sell sat watched boats rates rose fell "
             "morning evening under over near far").split()
    return [" ".join(rng.choice(words) for _ in range(rng.randint(6, 30))) for _ in range(n)]


def _minilm_onnx(root: Path, folder: Path) -> Path:
    """all-MiniLM-L6-v2's transformers BertModel exported by ``torch.onnx.export`` (dynamo), dynamic batch
    and length: last_hidden_state from input_ids and attention_mask."""
    import transformers

    hf = transformers.BertModel.from_pretrained(folder, attn_implementation="eager").eval()

    class Hidden(torch.nn.Module):
        def __init__(self, m):
            super().__init__()
            self.m = m

        def forward(self, ids, mask):
            return self.m(input_ids=ids, attention_mask=mask).last_hidden_state

    ids = torch.randint(0, 1000, (2, 16))
    mask = torch.ones_like(ids)
    mask[1, 10:] = 0
    dim = ({0: torch.export.Dim("b"), 1: torch.export.Dim("t", min=2, max=512)},) * 2
    path = root / "minilm.onnx"
    torch.onnx.export(Hidden(hf), (ids, mask), str(path), input_names=["input_ids", "attention_mask"],
                      output_names=["last_hidden_state"], dynamic_shapes=dim, dynamo=True, verbose=False)
    return path


def bench_minilm(root: Path, repeat: int, quick: bool, batch: int = 32) -> list[dict]:
    import numpy as np
    import onnxruntime as ort
    from onnxruntime.quantization import QuantType, quantize_dynamic

    from ..pretrained import resolve

    folder = resolve("all-MiniLM-L6-v2")
    texts = _sentences(200 if quick else 1000)
    fp32 = qkv.load(folder).eval()
    ours = {"float32": fp32, "bfloat16": qkv.load(folder, dtype=torch.bfloat16).eval(),
            "int8": qkv.load(folder).eval().quantize("int8")}
    onnx32 = _minilm_onnx(root, folder)
    onnx8 = root / "minilm-int8.onnx"
    quantize_dynamic(str(onnx32), str(onnx8), weight_type=QuantType.QInt8)
    sessions = {}
    for name, path in (("float32", onnx32), ("int8", onnx8)):
        so = ort.SessionOptions()
        so.intra_op_num_threads, so.inter_op_num_threads = THREADS, 1
        so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        sessions[name] = ort.InferenceSession(str(path), so, providers=["CPUExecutionProvider"])
    tok = fp32.tokenizer

    def run_ort(sess):  # the same tokenizer and length-sorted batches as qkv; mean pooling, normalised
        out = np.empty((len(texts), fp32.config.dim), dtype=np.float32)
        for idx, b in tok.length_batches(texts, batch, fp32.config.max_length, torch.device("cpu")):
            mask = b["attention_mask"].numpy()
            h = sess.run(None, {"input_ids": b["input_ids"].numpy(), "attention_mask": mask})[0]
            pooled = (h * mask[..., None]).sum(1) / np.maximum(mask.sum(1, keepdims=True), 1)
            out[idx.numpy()] = pooled / np.linalg.norm(pooled, axis=1, keepdims=True)
        return torch.from_numpy(out)

    fns = {f"qkv {k}": (lambda m=m: m.embed(texts, batch_size=batch)) for k, m in ours.items()}
    fns |= {f"ONNX Runtime {k}": (lambda sess=sess: run_ort(sess)) for k, sess in sessions.items()}
    vecs = {k: fn().float() for k, fn in fns.items()}
    secs = _interleave(fns, repeat)
    ref = vecs["qkv float32"]
    cos = {k: torch.nn.functional.cosine_similarity(v, ref, dim=-1).min().item() for k, v in vecs.items()}
    rows = []
    for ours_name, base in (("float32", "float32"), ("bfloat16", "float32"), ("int8", "int8")):
        q, e = f"qkv {ours_name}", f"ONNX Runtime {base}"
        rows.append({"case": f"all-MiniLM-L6-v2 embeddings, {len(texts)} sentences, batch {batch}, {ours_name}",
                     "baseline": e, "baseline_per_s": len(texts) / secs[e], "qkv_per_s": len(texts) / secs[q],
                     "speedup": secs[e] / secs[q], "unit": "sentences/s",
                     "check": f"min cosine to qkv fp32: qkv {cos[q]:.4f}, ORT {cos[e]:.4f}"})
    return rows


# -- Whisper -----------------------------------------------------------------------------------------------

CLIPS = ["The quick brown fox jumps over the lazy dog.", "Attention is all you need.",
         "Please call Stella and ask her to bring these things with her from the store.",
         "The meeting starts at nine tomorrow morning in the small room.",
         "Self attention lets every word look at every other word in the sentence."]


def _clips(root: Path, n: int) -> list[Path]:
    import shutil
    import subprocess

    exe = shutil.which("espeak-ng")
    if exe is None:
        raise ImportError("espeak-ng is not installed (apt-get install espeak-ng)")
    paths = []
    for i, text in enumerate(CLIPS[:n]):
        path = root / f"clip{i}.wav"
        subprocess.run([exe, "-v", "en-us", "-s", "150", "-w", str(path), text], check=True, capture_output=True)
        paths.append(path)
    return paths


def bench_whisper(root: Path, repeat: int, quick: bool) -> list[dict]:
    import ctranslate2
    import numpy as np

    from ..pretrained import resolve

    folder = resolve("whisper-tiny.en")
    if not (folder / "model.bin").exists():
        raise ImportError(f"{folder} is not a CTranslate2 folder (model.bin)")
    clips = _clips(root, 2 if quick else len(CLIPS))
    fp32 = qkv.load(folder).eval()
    ours = {"float32": fp32, "int8": qkv.load(folder).eval().quantize("int8")}
    engines = {c: ctranslate2.models.Whisper(str(folder), device="cpu", compute_type=c, intra_threads=THREADS,
                                             inter_threads=1) for c in ("float32", "int8")}
    c = fp32.config
    prompt, tok = c.decoder_prompt(), fp32.tokenizer

    def run_ct2(engine):  # features as qkv computes them (equal to WhisperFeatureExtractor's), one clip at a time
        texts = []
        for clip in clips:
            feats = ctranslate2.StorageView.from_array(np.ascontiguousarray(fp32.features(clip).numpy()))
            res = engine.generate(feats, [prompt], beam_size=1, max_length=c.max_positions,
                                  suppress_tokens=list(c.suppress_tokens) or [-1], suppress_blank=True)
            texts.append(tok.decode([t for t in res[0].sequences_ids[0] if t not in prompt]).strip())
        return texts

    fns = {f"qkv {k}": (lambda m=m: [m.transcribe(clip) for clip in clips]) for k, m in ours.items()}
    fns |= {f"CTranslate2 {k}": (lambda e=e: run_ct2(e)) for k, e in engines.items()}
    texts = {k: fn() for k, fn in fns.items()}
    secs = _interleave(fns, repeat)
    ref = texts["qkv float32"]
    rows = []
    for ctype in ("float32", "int8"):
        q, e = f"qkv {ctype}", f"CTranslate2 {ctype}"
        same = {k: sum(a == b for a, b in zip(texts[k], ref)) for k in (q, e)}
        rows.append({"case": f"whisper-tiny.en transcription, {len(clips)} espeak-ng clips, greedy, {ctype}",
                     "baseline": e, "baseline_per_s": len(clips) / secs[e], "qkv_per_s": len(clips) / secs[q],
                     "speedup": secs[e] / secs[q], "unit": "clips/s",
                     "check": f"transcripts = qkv fp32: qkv {same[q]}/{len(clips)}, CT2 {same[e]}/{len(clips)}"})
    return rows


def run(quick: bool = False, repeat: int | None = None, only: str | None = None, progress=None) -> dict:
    torch.set_num_threads(THREADS)
    repeat = repeat or (3 if quick else 5)
    suites = {"gpt2": bench_gpt2, "minilm": bench_minilm, "whisper": bench_whisper}
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
