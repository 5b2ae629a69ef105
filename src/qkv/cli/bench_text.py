"""`qkv bench text`: qkv's text models against the reference libraries, on the same weights, in one process.

- Sentence embeddings: the offline all-MiniLM-L6-v2 on 1,000 generated sentences of
  mixed length (3 to 180 words), qkv ``model.embed`` vs sentence-transformers'
  ``encode`` (each with its default batch size).
- Greedy decoding: 128 new tokens after a 32-token prompt, batch 1, for GPT-2
  (124M configuration) and a small Llama configuration with random weights,
  qkv ``generate`` vs transformers' ``generate`` (tokens must be identical).

Each ratio is ``reference time / qkv time`` from interleaved runs.
"""

from __future__ import annotations

import random
import tempfile
from collections.abc import Callable

import torch

import qkv

from .bench import interleaved, rate_table

WORDS = ("the of and to in a is that for it as was with be by on not he this are or his from at which but have an "
         "they you were her she there one all we their its been has more if would will when so no who can said "
         "attention transformer river bank muddy quantum network language model sentence embedding").split()


def sentences(n: int = 1000, seed: int = 0) -> list[str]:
    """Deterministic sentences with log-uniform lengths between 3 and 180 words."""
    rng = random.Random(seed)
    return [" ".join(rng.choice(WORDS) for _ in range(int(2 ** rng.uniform(1.6, 7.5)))) for _ in range(n)]


def bench_embeddings(repeat: int = 3, n: int = 1000) -> dict:
    from sentence_transformers import SentenceTransformer

    from qkv.pretrained import resolve

    texts = sentences(n)
    ours = qkv.load("all-MiniLM-L6-v2")
    ref = SentenceTransformer(str(resolve("all-MiniLM-L6-v2")), device="cpu")
    ours.embed(texts[:64]), ref.encode(texts[:64])  # warm-up
    a, b = ours.embed(texts), torch.from_numpy(ref.encode(texts))
    cos = float(torch.nn.functional.cosine_similarity(a, b).min())
    tq, tr = interleaved(lambda: ours.embed(texts), lambda: ref.encode(texts), repeat)
    return {"case": f"all-MiniLM-L6-v2 embeddings, {n} sentences", "baseline": "sentence-transformers encode",
            "qkv_s": tq, "baseline_s": tr, "speedup": tr / tq, "qkv_per_s": n / tq, "baseline_per_s": n / tr,
            "unit": "sentences/s", "check": f"min cosine {cos:.7f}"}


def _causal_models():
    import transformers as T

    yield "GPT-2 124M", T.GPT2LMHeadModel(T.GPT2Config())
    yield "Llama small (6 x 512, GQA 8/4)", T.LlamaForCausalLM(T.LlamaConfig(
        hidden_size=512, num_hidden_layers=6, num_attention_heads=8, num_key_value_heads=4, intermediate_size=1376,
        vocab_size=32000))


def bench_decoding(repeat: int = 3, prompt: int = 32, new: int = 128) -> list[dict]:
    rows = []
    for name, hf in _causal_models():
        torch.manual_seed(0)
        hf.eval()
        with tempfile.TemporaryDirectory() as d:
            hf.save_pretrained(d)
            ours = qkv.load(d)
        ids = torch.randint(0, hf.config.vocab_size, (1, prompt), generator=torch.Generator().manual_seed(1))

        def run_ours():
            return ours.generate(ids, max_new_tokens=new, eos_token_id=[])

        def run_ref():
            with torch.no_grad():
                return hf.generate(ids, max_new_tokens=new, min_new_tokens=new, do_sample=False, pad_token_id=0)

        same = torch.equal(run_ours(), run_ref())
        tq, tr = interleaved(run_ours, run_ref, repeat)
        rows.append({"case": f"{name}: greedy {new} tokens after {prompt}", "baseline": "transformers generate",
                     "qkv_s": tq, "baseline_s": tr, "speedup": tr / tq, "qkv_per_s": new / tq,
                     "baseline_per_s": new / tr, "unit": "tokens/s", "check": f"identical tokens: {same}"})
    return rows


def run(repeat: int = 3, progress: Callable[[str], None] | None = None) -> dict:
    say = progress or (lambda s: None)
    say("sentence embeddings vs sentence-transformers")
    rows = [bench_embeddings(repeat)]
    say("greedy decoding vs transformers")
    rows += bench_decoding(repeat)
    env = {"torch": torch.__version__, "threads": torch.get_num_threads(), "qkv": qkv.__version__}
    return {"speed": rows, "env": env}


def format_table(result: dict, markdown: bool = False) -> str:
    return rate_table(result, markdown, digits=1)
