"""The training loop: AdamW, warmup + cosine, clipping, accumulation, bf16 autocast, evaluation, early
stopping, atomic checkpoints, exact resume, Ctrl-C, and DistributedDataParallel under torchrun."""

from __future__ import annotations

import json
import logging
import math
import os
import signal
import time
from contextlib import nullcontext
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.distributed as dist

from ..data import load_data
from ..models import CausalLM
from .checkpoint import latest_checkpoint, load_checkpoint, save_checkpoint, save_pretrained
from .config import TrainConfig
from .progress import Progress, plot_curves
from .tasks import METRIC, TASKS, build_model, evaluate, loss_and_stats

log = logging.getLogger(__name__)


@dataclass
class Result:
    step: int
    metrics: dict  # the last evaluation on the validation split
    test: dict | None  # evaluation on the test split at the end
    out: Path
    interrupted: bool = False
    stopped_early: bool = False


def lr_at(step: int, cfg) -> float:
    """Linear warmup, then cosine decay to ``min_lr`` at the last step."""
    t = cfg.train
    floor = t.lr / 10 if t.min_lr is None else t.min_lr
    warmup = t.warmup_steps
    if step < warmup:
        return t.lr * (step + 1) / warmup
    frac = (step - warmup) / max(1, t.steps - warmup)
    return floor + 0.5 * (t.lr - floor) * (1 + math.cos(math.pi * min(frac, 1.0)))


def _optimizer(model, cfg) -> torch.optim.AdamW:
    """AdamW with weight decay on parameters of two or more dimensions (matrices, embeddings), not on
    biases and norm gains."""
    decay, no_decay = [], []
    for p in {id(p): p for p in model.parameters() if p.requires_grad}.values():
        (decay if p.dim() >= 2 else no_decay).append(p)
    t = cfg.train
    return torch.optim.AdamW([{"params": decay, "weight_decay": t.weight_decay},
                              {"params": no_decay, "weight_decay": 0.0}], lr=t.lr, betas=tuple(t.betas))


def _distributed() -> tuple[int, int, torch.device]:
    """(rank, world size, device); joins the process group when launched by torchrun. Each process
    trains on GPU ``LOCAL_RANK`` when CUDA is available (nccl), else on the CPU (gloo)."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if torch.cuda.is_available():
        device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
        torch.cuda.set_device(device)
    else:
        device = torch.device("cpu")
    if world > 1 and not dist.is_initialized():
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    return (dist.get_rank(), dist.get_world_size(), device) if world > 1 else (0, 1, device)


class _Interrupt:
    """Ctrl-C (SIGINT) and SIGTERM set a flag; the loop saves and leaves at the end of the step."""

    def __init__(self):
        self.hit = False
        self.old = {}

    def __enter__(self):
        for sig in (signal.SIGINT, signal.SIGTERM):
            try:
                self.old[sig] = signal.signal(sig, self._handle)
            except ValueError:  # not the main thread
                pass
        return self

    def _handle(self, signum, frame):
        self.hit = True

    def __exit__(self, *exc):
        for sig, handler in self.old.items():
            signal.signal(sig, handler)


def fit(cfg: TrainConfig, *, resume: bool = False, progress: bool = True, max_steps: int | None = None) -> Result:
    """Train as ``cfg`` says; ``resume`` continues from the last checkpoint in ``cfg.out``.

    ``max_steps`` stops early (for tests: a run "killed" at a known step) without
    changing the schedule, which always follows ``train.steps``.
    """
    rank, world, device = _distributed()
    out = Path(cfg.out)
    torch.manual_seed(cfg.seed)
    data = load_data(cfg.data, cfg.task, cfg.seed)
    model = build_model(cfg, data).to(device)
    optimizer = _optimizer(model, cfg)
    net = model
    if world > 1:
        net = torch.nn.parallel.DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda" else None)
    sampler = torch.Generator().manual_seed(cfg.seed + 1)
    state = {"step": 0, "best": None, "bad_evals": 0, "history": []}
    ckpt = latest_checkpoint(out) if resume else None
    if resume and ckpt is None and rank == 0:
        log.warning("no checkpoint in %s; starting from scratch", out / "checkpoints")
    if ckpt is not None:
        meta, rng = load_checkpoint(ckpt, model, optimizer)
        state.update({k: meta[k] for k in ("step", "best", "bad_evals", "history") if k in meta})
        torch.set_rng_state(rng["rng.torch"])
        if device.type == "cuda" and "rng.cuda" in rng:
            torch.cuda.set_rng_state(rng["rng.cuda"], device)
        sampler.set_state(rng["rng.data"])
    t = cfg.train
    if rank == 0:
        out.mkdir(parents=True, exist_ok=True)
        save_pretrained(model, out, cfg.to_dict())
    metric, mode = METRIC[cfg.task]
    per_step = t.batch_size * world  # examples (or windows) per optimizer step, over all processes
    autocast = torch.autocast(device.type, dtype=torch.bfloat16) if t.bf16 else nullcontext()
    last_eval: dict = state["history"][-1] if state["history"] else {}
    interrupted = stopped = False
    bar = Progress(t.steps, start=state["step"], enabled=progress and rank == 0, out=out if rank == 0 else None)
    model.train()
    end = t.steps if max_steps is None else min(t.steps, max_steps)
    with _Interrupt() as stop, bar:
        for step in range(state["step"], end):
            t0 = time.perf_counter()
            for group in optimizer.param_groups:
                group["lr"] = lr_at(step, cfg)
            total, items = 0.0, 0
            per_token = TASKS[cfg.task].model is CausalLM  # rate in tokens read (lm, mqar, chat), else examples
            for micro in range(t.accumulate):
                batch = data.sample("train", per_step, sampler, cfg.data.block_size)
                batch = {k: v[rank * t.batch_size : (rank + 1) * t.batch_size].to(device) for k, v in batch.items()}
                sync = nullcontext() if micro == t.accumulate - 1 or world == 1 else net.no_sync()
                with sync, autocast:
                    loss, stats = loss_and_stats(cfg.task, net, batch, t.label_smoothing, t.class_balance)
                (loss / t.accumulate).backward()  # even when not finite: under DDP every rank joins the reduction
                total += float(loss.detach()) / t.accumulate
                items += batch[next(iter(batch))].numel() if per_token else stats.get("examples", stats["count"])
            _stop_if_diverged(step + 1, total, _grad_norm(model, t.grad_clip), cfg, optimizer, out, world, device)
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            state["step"] = step + 1
            rate = items * world / max(time.perf_counter() - t0, 1e-9)
            bar.update(step + 1, loss=total, lr=optimizer.param_groups[0]["lr"], rate=rate,
                       unit="tok/s" if per_token else "ex/s", write=(step + 1) % t.log_every == 0)
            last = step + 1 == t.steps
            if rank == 0 and ((step + 1) % t.eval_every == 0 or last):
                limit = 0 if last else t.eval_batches  # the final evaluation reads the whole split
                last_eval = {"step": step + 1, **evaluate(cfg.task, model, data, "val", t.batch_size,
                                                          cfg.data.block_size, limit)}
                state["history"].append(last_eval)
                bar.record(last_eval)
                better = state["best"] is None or (last_eval[metric] < state["best"] if mode == "min"
                                                   else last_eval[metric] > state["best"])
                if better:
                    state["best"], state["bad_evals"] = last_eval[metric], 0
                else:
                    state["bad_evals"] += 1
                stopped = bool(t.early_stop) and state["bad_evals"] >= t.early_stop
            if world > 1:
                flags = torch.tensor([float(stopped), float(stop.hit)], device=device)
                dist.broadcast(flags, 0)
                stopped, interrupt = bool(flags[0]), bool(flags[1])
            else:
                interrupt = stop.hit
            if (step + 1) % t.save_every == 0 or last or stopped or interrupt:
                _stop_if_bad_weights(step + 1, model, out)  # every rank: they all hold the same weights
                if rank == 0:
                    _save(out, step + 1, model, optimizer, sampler, state)
            if interrupt:
                interrupted = True
                break
            if stopped:
                break
    test = None
    if rank == 0:
        save_pretrained(model, out, cfg.to_dict())
        if (state["step"] == t.steps or stopped) and data.splits.get("test") is not data.splits["val"]:
            test = evaluate(cfg.task, model, data, "test", t.batch_size, cfg.data.block_size, 0)
            bar.record({"step": state["step"], "split": "test", **test})
        plot_curves(out)
    if world > 1:
        dist.barrier()
    return Result(state["step"], last_eval, test, out, interrupted, stopped)


class TrainingDiverged(RuntimeError):
    """The loss or the gradient norm became NaN or infinite: training stopped before the optimizer step,
    and nothing of the bad state was saved (the last checkpoint in ``out/checkpoints`` is the last good one).

    ``step`` is the step that failed (1-based), ``loss`` its training loss, ``checkpoint`` the last good
    checkpoint folder (None when none was written before)."""

    def __init__(self, message: str, step: int, loss: float, checkpoint: Path | None):
        super().__init__(message)
        self.step, self.loss, self.checkpoint = step, loss, checkpoint


def _grad_norm(model, clip: float) -> torch.Tensor:
    """The gradients' total 2-norm, clipped to ``clip`` when it is > 0 (the norm returned is the unclipped one)."""
    params = [p for p in model.parameters() if p.grad is not None]
    if clip > 0:
        return torch.nn.utils.clip_grad_norm_(params, clip)
    if not params:
        return torch.zeros(())
    norms = torch.stack([torch.linalg.vector_norm(p.grad.detach(), 2.0) for p in params])
    return torch.linalg.vector_norm(norms, 2.0)  # what clip_grad_norm_ computes (torch >= 2.5)


def _stop_if_diverged(step: int, loss: float, norm: torch.Tensor, cfg, optimizer, out: Path, world: int,
                      device) -> None:
    """Raise `TrainingDiverged` when the loss or gradient norm is not finite, on any process: under torchrun
    the processes agree (one all-reduce of a flag), so all of them stop at the same step."""
    bad = not (math.isfinite(loss) and bool(torch.isfinite(norm)))
    if world > 1:
        flag = torch.tensor([float(bad)], device=device)
        dist.all_reduce(flag, op=dist.ReduceOp.MAX)
        bad = bool(flag[0])
    if not bad:
        return
    t = cfg.train
    lr = optimizer.param_groups[0]["lr"]
    tips = [f"a lower train.lr (now {t.lr:g}; this step's {lr:.3g})"]
    tips.append("train.grad_clip = 1.0 (now off)" if t.grad_clip == 0
                else f"a smaller train.grad_clip (now {t.grad_clip:g})")
    if t.bf16:
        tips.append("train.bf16 = false (float32)")
    where = "" if world == 1 else f" on at least one of the {world} processes"
    ckpt = latest_checkpoint(out)
    kept = (f"the last good checkpoint, {ckpt}, is kept: fix the config and continue from it with --resume"
            if ckpt is not None else f"no checkpoint was written before it (train.save_every={t.save_every})")
    raise TrainingDiverged(f"training diverged at step {step}: the loss is {loss:g} and the gradient norm "
                           f"{float(norm):g}{where}; the step was not taken and nothing was saved; {kept}. "
                           f"Try {', '.join(tips)}", step, loss, ckpt)


def _stop_if_bad_weights(step: int, model, out: Path) -> None:
    """Never checkpoint weights that are not finite (a guard behind the loss and gradient check)."""
    if all(bool(torch.isfinite(p).all()) for p in model.parameters()):
        return
    ckpt = latest_checkpoint(out)
    raise TrainingDiverged(f"training diverged by step {step}: some weights are NaN or infinite; nothing was "
                           f"saved; the last good checkpoint is {ckpt}. Try a lower train.lr or train.grad_clip "
                           "= 1.0", step, float("nan"), ckpt)


def _save(out, step, model, optimizer, sampler, state):
    rng = {"rng.torch": torch.get_rng_state(), "rng.data": sampler.get_state()}
    device = next(model.parameters()).device
    if device.type == "cuda":
        rng["rng.cuda"] = torch.cuda.get_rng_state(device)
    meta = {k: state[k] for k in ("best", "bad_evals", "history")}
    save_checkpoint(out, step, model, optimizer, rng, json.loads(json.dumps(meta)))
