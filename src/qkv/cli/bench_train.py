"""`qkv bench train`: training throughput of qkv against transformers on the same model, in one process.

A GPT-2-style language model (nanoGPT's character-level Shakespeare shape: 6 layers,
6 heads, 384 wide, block 256, vocabulary 65, no dropout), random weights shared by
both (transformers' ``GPT2LMHeadModel`` saved, then read by ``qkv.load``). Each
training step: forward, cross-entropy over every position, backward, gradient
clipping at 1.0 and an AdamW step (lr 1e-3, betas 0.9/0.99, weight decay 0.1), on the
same batches. The first step's losses are compared (same weights, same batch), and
the ratio is ``transformers time / qkv time`` over interleaved rounds of steps.
"""

from __future__ import annotations

import tempfile
from collections.abc import Callable

import torch
import torch.nn.functional as F

import qkv

from .bench import interleaved

SHAPE = dict(n_layer=6, n_head=6, n_embd=384, n_positions=256, vocab_size=65)


def _trainer(model, logits_of: Callable, batches: list[torch.Tensor]):
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3, betas=(0.9, 0.99), weight_decay=0.1)
    state = {"i": 0}

    def step() -> float:
        win = batches[state["i"] % len(batches)]
        state["i"] += 1
        logits = logits_of(model, win[:, :-1])
        loss = F.cross_entropy(logits.flatten(0, 1), win[:, 1:].flatten())
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        return float(loss.detach())

    return step


def bench_gpt2_training(repeat: int = 3, batch: int = 16, steps: int = 3) -> dict:
    import transformers as T

    torch.manual_seed(0)
    hf = T.GPT2LMHeadModel(T.GPT2Config(**SHAPE, resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0))
    with tempfile.TemporaryDirectory() as d:
        hf.save_pretrained(d)
        ours = qkv.load(d)
    hf.train(), ours.train()
    for p in ours.parameters():
        p.requires_grad_(True)
    g = torch.Generator().manual_seed(1)
    block = SHAPE["n_positions"]
    batches = [torch.randint(0, SHAPE["vocab_size"], (batch, block + 1), generator=g) for _ in range(4)]
    step_ours = _trainer(ours, lambda m, x: m(x).logits, batches)
    step_hf = _trainer(hf, lambda m, x: m(x).logits, batches)
    first = abs(step_ours() - step_hf())  # same weights, same batch
    for _ in range(steps - 1):  # warm-up
        step_ours(), step_hf()

    def run_ours():
        for _ in range(steps):
            step_ours()

    def run_hf():
        for _ in range(steps):
            step_hf()

    tq, tr = interleaved(run_ours, run_hf, repeat)
    tokens = steps * batch * block
    return {"case": f"GPT-2-style 6 x 384, block {block}, batch {batch}: training steps (fp32)",
            "baseline": "transformers GPT2LMHeadModel", "qkv_s": tq, "baseline_s": tr, "speedup": tr / tq,
            "qkv_per_s": tokens / tq, "baseline_per_s": tokens / tr, "unit": "tokens/s",
            "check": f"first-step loss difference {first:.1e}"}


def run(repeat: int = 3, progress: Callable[[str], None] | None = None) -> dict:
    say = progress or (lambda s: None)
    say("GPT-2-style training steps vs transformers")
    rows = [bench_gpt2_training(repeat)]
    env = {"torch": torch.__version__, "threads": torch.get_num_threads(), "qkv": qkv.__version__}
    return {"speed": rows, "env": env}


def format_table(result: dict, markdown: bool = False) -> str:
    from .bench_text import format_table as text_table

    return text_table(result, markdown)
