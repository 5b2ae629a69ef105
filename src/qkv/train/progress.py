"""Progress while training: a bar (loss, rate, ETA) on terminals, log lines elsewhere, metrics appended to
``metrics.jsonl``, and a PNG of the curves."""

from __future__ import annotations

import json
import logging
import sys
import time
from pathlib import Path

log = logging.getLogger("qkv.train")


class Progress:
    def __init__(self, total: int, start: int = 0, enabled: bool = True, out: Path | None = None):
        self.total, self.start, self.enabled = total, start, enabled
        self.file = (out / "metrics.jsonl") if out is not None else None
        self.t0 = time.perf_counter()
        self.bar = None
        self.task = None

    def __enter__(self):
        if self.enabled and sys.stderr.isatty():
            from rich.progress import BarColumn, MofNCompleteColumn, TextColumn, TimeRemainingColumn
            from rich.progress import Progress as Bar

            self.bar = Bar(TextColumn("train"), BarColumn(), MofNCompleteColumn(), TextColumn("{task.fields[info]}"),
                           TimeRemainingColumn(), transient=False)
            self.bar.__enter__()
            self.task = self.bar.add_task("train", total=self.total, completed=self.start, info="")
        return self

    def __exit__(self, *exc):
        if self.bar is not None:
            self.bar.__exit__(*exc)

    def _append(self, record: dict) -> None:
        if self.file is not None:
            with open(self.file, "a", encoding="utf-8") as f:
                f.write(json.dumps(record) + "\n")

    def update(self, step: int, loss: float, lr: float, rate: float, unit: str, write: bool) -> None:
        info = f"loss {loss:.4f}  {rate:,.0f} {unit}  lr {lr:.2e}"
        if self.bar is not None:
            self.bar.update(self.task, completed=step, info=info)
        if write:
            self._append({"step": step, "loss": loss, "lr": lr, "rate": rate, "unit": unit,
                          "elapsed": round(time.perf_counter() - self.t0, 3)})
            if self.enabled and self.bar is None:
                done = step - self.start
                eta = (self.total - step) * (time.perf_counter() - self.t0) / max(done, 1)
                log.info("step %d/%d  %s  eta %.0fs", step, self.total, info, eta)

    def record(self, metrics: dict) -> None:
        """An evaluation: appended to metrics.jsonl and shown."""
        entry = {"split": "val", **metrics} if "split" not in metrics else dict(metrics)
        self._append(entry)
        text = "  ".join(f"{k} {v:.4f}" if isinstance(v, float) else f"{k} {v}" for k, v in entry.items())
        if self.bar is not None:
            self.bar.console.print(text)
        elif self.enabled:
            log.info("%s", text)


def plot_curves(out: Path) -> Path | None:
    """``curves.png``: training loss and validation metrics against steps, from ``metrics.jsonl``."""
    path = out / "metrics.jsonl"
    if not path.exists():
        return None
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        log.info("matplotlib is not installed; no curves.png (pip install 'qkv[train]')")
        return None
    rows = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    train = [r for r in rows if "lr" in r]
    evals = [r for r in rows if r.get("split") == "val"]
    fig, ax = plt.subplots(figsize=(8, 4.5))
    if train:
        ax.plot([r["step"] for r in train], [r["loss"] for r in train], label="train loss", alpha=0.6)
    if evals:
        ax.plot([r["step"] for r in evals], [r["loss"] for r in evals], "o-", label="val loss")
        extra = [k for k in ("accuracy", "exact_match") if k in evals[-1]]
        if extra:
            ax2 = ax.twinx()
            ax2.plot([r["step"] for r in evals], [r[extra[0]] for r in evals], "s-", color="tab:green", label=extra[0])
            ax2.set_ylabel(extra[0])
    ax.set_xlabel("step")
    ax.set_ylabel("loss")
    handles = [h for a in fig.axes for h in a.get_legend_handles_labels()[0]]
    fig.axes[-1].legend(handles, [h.get_label() for h in handles], loc="center right")  # one legend, clear of
    # the curves: losses fall to the bottom, accuracy rises to the top
    fig.tight_layout()
    target = out / "curves.png"
    fig.savefig(target, dpi=100)
    plt.close(fig)
    return target
