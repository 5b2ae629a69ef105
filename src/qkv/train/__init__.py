"""Training: `fit(config)` from Python, ``qkv train CONFIG.toml`` from the command line.

>>> from qkv.train import load_config, fit
>>> cfg = load_config("shakespeare.toml", ["train.steps=500"])
>>> result = fit(cfg)                       # progress, metrics.jsonl, curves.png, checkpoints
>>> result = fit(cfg, resume=True)          # continues exactly where a killed run stopped

A NaN or infinite loss stops the run with `TrainingDiverged` (a RuntimeError) before the bad step is
taken; the last checkpoint written before it is kept.
"""

from .checkpoint import latest_checkpoint, load_checkpoint, save_checkpoint, save_pretrained
from .config import TASKS, ConfigError, DataConfig, OptimConfig, TrainConfig, load_config
from .loop import Result, TrainingDiverged, fit, lr_at
from .tasks import build_model, evaluate, model_config

__all__ = ["fit", "Result", "load_config", "TrainConfig", "DataConfig", "OptimConfig", "ConfigError", "TASKS",
           "build_model", "model_config", "evaluate", "save_pretrained", "save_checkpoint", "load_checkpoint",
           "latest_checkpoint", "lr_at", "TrainingDiverged"]
