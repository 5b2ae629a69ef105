"""Tasks: what model a task trains, its loss on a batch, and its metric."""

from __future__ import annotations

import dataclasses

import torch
import torch.nn.functional as F

from ..data import IGNORE, Data
from ..models import CausalLM, CausalLMConfig, Seq2Seq, Seq2SeqConfig, TextEncoder, TextEncoderConfig, ViTConfig, VisionTransformer
from .config import ConfigError, TrainConfig

METRIC = {"lm": ("loss", "min"), "mqar": ("accuracy", "max"), "classify": ("accuracy", "max"),
          "listops": ("accuracy", "max"), "seq2seq": ("exact_match", "max"), "image": ("accuracy", "max"),
          "audio": ("accuracy", "max"), "signal": ("accuracy", "max")}

# Small defaults per task, overridden by the [model] table.
DEFAULTS = {
    "lm": dict(dim=128, n_layers=4, n_heads=4, ffn_dim=512, activation="gelu_tanh", dropout=0.0),
    # learned positions and a width-2 token convolution: the recall circuit forms in hundreds of steps
    # (BENCHMARKS.md: plain attention, rotary or learned, stayed at chance on 256 tokens within budget)
    "mqar": dict(dim=128, n_layers=2, n_heads=2, ffn_dim=256, positions="learned", token_conv=2, norm="rms",
                 activation="swiglu", bias=False),
    "classify": dict(dim=128, n_layers=2, n_heads=4, ffn_dim=512, dropout=0.1, attn_dropout=0.1),
    "listops": dict(dim=128, n_layers=2, n_heads=4, ffn_dim=256, dropout=0.1, attn_dropout=0.0),
    # learned positions and 1/sqrt(d) attention train far faster from scratch than T5's relative
    # buckets with unscaled attention (copying: exact in 400 steps instead of none in 1000)
    "seq2seq": dict(dim=128, n_layers=2, n_heads=4, head_dim=32, ffn_dim=512, positions="learned", scale=None,
                    scale_decoder_output=False, activation="gelu"),
    "image": dict(dim=128, n_layers=4, n_heads=4, ffn_dim=256, dropout=0.1),
    "audio": dict(dim=128, n_layers=4, n_heads=4, ffn_dim=256, dropout=0.1),
    "signal": dict(dim=128, n_layers=4, n_heads=4, ffn_dim=256, dropout=0.1),
}


# The model config each task trains: what the [model] table's fields are checked against.
CONFIG_CLASS = {"lm": CausalLMConfig, "mqar": CausalLMConfig, "classify": TextEncoderConfig,
                "listops": TextEncoderConfig, "seq2seq": Seq2SeqConfig, "image": ViTConfig, "audio": ViTConfig,
                "signal": ViTConfig}


def _config(cls, values: dict, where: str = "model"):
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(values) - names)
    if unknown:
        raise ConfigError(f"{where}.{unknown[0]}: unknown field for {cls.__name__}; known: {sorted(names)}")
    try:
        return cls(**values)
    except (TypeError, ValueError) as e:
        raise ConfigError(f"{where}: {e}") from None


def model_config(cfg: TrainConfig, data: Data):
    """The task's model config: defaults, then the [model] table, then what the data fixes (vocabulary, classes)."""
    task, values = cfg.task, {**DEFAULTS[cfg.task], **cfg.model}
    info = data.info
    if task in ("lm", "mqar"):
        values.setdefault("vocab_size", info["vocab_size"])
        values.setdefault("max_positions", max(cfg.data.block_size, info.get("seq_len", 0)))
        if data.tokenizer is not None:
            values.setdefault("eos_token_id", data.tokenizer.eos_id)
            values.setdefault("pad_token_id", data.tokenizer.pad_id)
        return _config(CausalLMConfig, values)
    if task in ("classify", "listops"):
        width = data.splits["train"]["input_ids"].shape[1]
        values.update(head="sequence_classification", num_labels=info["num_labels"])
        values.setdefault("vocab_size", info["vocab_size"])
        values.setdefault("max_positions", width)
        values.setdefault("max_length", values["max_positions"])
        values.setdefault("labels", data.labels)
        values.setdefault("type_vocab_size", 0)
        return _config(TextEncoderConfig, values)
    if task == "seq2seq":
        tok = data.tokenizer
        values.setdefault("vocab_size", info["vocab_size"])
        values.setdefault("max_positions", cfg.data.max_length + 1)
        values.update(decoder_start_token_id=tok.bos_id, eos_token_id=tok.eos_id, pad_token_id=tok.pad_id)
        return _config(Seq2SeqConfig, values)
    shape = info["input_shape"]  # (channels, H, W) or (channels, L)
    values.setdefault("channels", shape[0])
    values.setdefault("image_size", list(shape[1:]))
    values.setdefault("patch_size", [2] * (len(shape) - 1))
    values.update(num_labels=info["num_labels"], input=task)  # image, audio or signal: what classify() reads
    values.setdefault("labels", data.labels)
    return _config(ViTConfig, values)


def build_model(cfg: TrainConfig, data: Data):
    c = model_config(cfg, data)
    model = {CausalLMConfig: CausalLM, TextEncoderConfig: TextEncoder, Seq2SeqConfig: Seq2Seq,
             ViTConfig: VisionTransformer}[type(c)](c)
    model.init_weights()
    model.tokenizer = data.tokenizer
    return model


def loss_and_stats(task: str, model, batch: dict, label_smoothing: float = 0.0) -> tuple[torch.Tensor, dict]:
    """The training loss of a batch and the counts its metric sums over."""
    if task == "lm":
        logits = model(batch["input_ids"]).logits
        labels = batch["labels"]
        loss = F.cross_entropy(logits.flatten(0, 1).float(), labels.flatten(), ignore_index=IGNORE,
                               label_smoothing=label_smoothing)
        keep = labels != IGNORE
        right = ((logits.argmax(-1) == labels) & keep).sum()
        return loss, {"correct": int(right), "count": int(keep.sum())}
    if task == "mqar":  # labels only at the queries: logits there only
        keep = batch["labels"] != IGNORE
        logits = model(batch["input_ids"], logits_for=keep).logits
        labels = batch["labels"][keep]
        loss = F.cross_entropy(logits.float(), labels, label_smoothing=label_smoothing)
        return loss, {"correct": int((logits.argmax(-1) == labels).sum()), "count": int(labels.numel())}
    if task in ("classify", "listops"):
        logits = model(batch["input_ids"], batch["attention_mask"]).logits
    elif task == "seq2seq":
        labels = batch["labels"]
        start = torch.full_like(labels[:, :1], model.config.decoder_start_token_id)
        dec = torch.cat([start, labels[:, :-1].clamp(min=0)], dim=1)
        logits = model(batch["input_ids"], batch["attention_mask"], decoder_input_ids=dec).logits
        loss = F.cross_entropy(logits.flatten(0, 1).float(), labels.flatten(), ignore_index=IGNORE,
                               label_smoothing=label_smoothing)
        keep = labels != IGNORE
        exact = ((logits.argmax(-1) == labels) | ~keep).all(-1).sum()
        return loss, {"correct": int(exact), "count": labels.shape[0]}
    else:
        logits = model(batch["pixel_values"]).logits
    labels = batch["labels"]
    loss = F.cross_entropy(logits.float(), labels, label_smoothing=label_smoothing)
    return loss, {"correct": int((logits.argmax(-1) == labels).sum()), "count": labels.shape[0]}


@torch.no_grad()
def evaluate(task: str, model, data: Data, split: str, batch_size: int, block_size: int, limit: int = 0) -> dict:
    """Mean loss and the task's metric over a split (in order; ``limit`` batches at most)."""
    was = model.training
    model.eval()
    total, n, correct, count = 0.0, 0, 0, 0
    try:
        device = next(model.parameters()).device
        for batch in data.batches(split, batch_size, block_size, limit):
            loss, stats = loss_and_stats(task, model, {k: v.to(device) for k, v in batch.items()})
            total += float(loss) * stats["count"]
            n += stats["count"]
            correct += stats["correct"]
            count += stats["count"]
    finally:
        model.train(was)
    out = {"loss": total / max(n, 1)}
    if task == "lm":
        out["perplexity"] = float(torch.exp(torch.tensor(out["loss"])))
    else:
        out[METRIC[task][0]] = correct / max(count, 1)
    return out
