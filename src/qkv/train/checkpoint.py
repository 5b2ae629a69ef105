"""Checkpoints in safetensors, written atomically; the trained model as a folder `qkv.load` reads.

A checkpoint is a directory ``checkpoints/step_000500/`` holding ``model.safetensors``
(the weights) and ``trainer.safetensors`` (optimizer moments, RNG and data-sampler
states as tensors; step, best metric and history as JSON metadata). It is written
under a temporary name and renamed into place, then ``checkpoints/latest`` (a
one-line file) is replaced; a run killed at any moment leaves the previous
checkpoint whole. Nothing is unpickled when reading them back.
"""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
from pathlib import Path

import torch
from safetensors.torch import load_file, load_model, save_file, save_model


def atomic_write_text(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    with open(tmp, "w", encoding="utf-8") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def _fsync_dir(path: Path) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def save_checkpoint(folder: Path, step: int, model, optimizer, rng: dict[str, torch.Tensor], meta: dict,
                    keep: int = 2) -> Path:
    """Write ``folder/checkpoints/step_{step}`` atomically and point ``latest`` at it; keep the last ``keep``."""
    root = folder / "checkpoints"
    root.mkdir(parents=True, exist_ok=True)
    name = f"step_{step:08d}"
    final, tmp = root / name, root / f".{name}.tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    save_model(model, str(tmp / "model.safetensors"))
    tensors = dict(rng)
    groups = []
    for gi, group in enumerate(optimizer.param_groups):
        groups.append({k: v for k, v in group.items() if k != "params"})
        for pi, p in enumerate(group["params"]):
            for key, value in optimizer.state.get(p, {}).items():
                t = value if isinstance(value, torch.Tensor) else torch.tensor(value)
                tensors[f"optim.{gi}.{pi}.{key}"] = t.detach().cpu().contiguous()
    save_file(tensors, str(tmp / "trainer.safetensors"),
              metadata={"meta": json.dumps({**meta, "step": step, "param_groups": groups})})
    for f in tmp.iterdir():
        with open(f, "rb") as fh:
            os.fsync(fh.fileno())
    if final.exists():
        shutil.rmtree(final)
    os.replace(tmp, final)
    _fsync_dir(root)
    atomic_write_text(root / "latest", name + "\n")
    for old in sorted(p for p in root.iterdir() if p.is_dir() and p.name.startswith("step_"))[:-keep]:
        shutil.rmtree(old, ignore_errors=True)
    return final


def latest_checkpoint(folder: Path) -> Path | None:
    pointer = folder / "checkpoints" / "latest"
    if not pointer.exists():
        return None
    path = folder / "checkpoints" / pointer.read_text().strip()
    return path if (path / "trainer.safetensors").exists() else None


def load_checkpoint(path: Path, model, optimizer) -> tuple[dict, dict[str, torch.Tensor]]:
    """Restore weights and optimizer state; returns (metadata, rng tensors)."""
    from safetensors import safe_open

    load_model(model, str(path / "model.safetensors"), strict=True)
    tensors = load_file(str(path / "trainer.safetensors"))
    with safe_open(str(path / "trainer.safetensors"), "pt") as f:
        meta = json.loads(f.metadata()["meta"])
    for gi, group in enumerate(optimizer.param_groups):
        group.update(meta["param_groups"][gi])
        for pi, p in enumerate(group["params"]):
            prefix = f"optim.{gi}.{pi}."
            state = {k[len(prefix):]: v for k, v in tensors.items() if k.startswith(prefix)}
            if state:
                optimizer.state[p] = {k: (v.to(p.device) if v.dim() else v) for k, v in state.items()}
    rng = {k: v for k, v in tensors.items() if k.startswith("rng.")}
    return meta, rng


def save_pretrained(model, folder: Path, train_config: dict | None = None) -> None:
    """The model as a folder `qkv.load` reads: config.json, model.safetensors, tokenizer.json."""
    from ..pretrained import FAMILIES

    family = next(name for name, cls in FAMILIES.items() if type(model) is cls)
    folder.mkdir(parents=True, exist_ok=True)
    tmp = folder / ".model.safetensors.tmp"
    save_model(model, str(tmp))
    os.replace(tmp, folder / "model.safetensors")
    config = {"qkv_family": family, "qkv_config": dataclasses.asdict(model.config)}
    if train_config is not None:
        config["qkv_train"] = train_config
    atomic_write_text(folder / "config.json", json.dumps(config, indent=2))
    if getattr(model, "tokenizer", None) is not None:
        model.tokenizer.save(folder)
