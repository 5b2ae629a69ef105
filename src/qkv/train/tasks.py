"""Tasks: one table (`TASKS`) of what model each task trains, its loss on a batch, its metric and unit."""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F

from ..data import IGNORE, Data
from ..models import (CaptionerConfig, CausalLM, CausalLMConfig, ImageCaptioner, ObjectDetector, SegformerConfig,
                      SemanticSegmenter, Seq2Seq, Seq2SeqConfig, TextEncoder, TextEncoderConfig, ViTConfig,
                      VisionTransformer, YolosConfig)
from . import vision_tasks as V
from .config import ConfigError, TrainConfig

def _fill_lm(values: dict, cfg: TrainConfig, data: Data) -> None:
    values.setdefault("vocab_size", data.info["vocab_size"])
    values.setdefault("max_positions", max(cfg.data.block_size, data.info.get("seq_len", 0)))
    if data.tokenizer is not None:
        values.setdefault("eos_token_id", data.tokenizer.eos_id)
        values.setdefault("pad_token_id", data.tokenizer.pad_id)


def _fill_classify(values: dict, cfg: TrainConfig, data: Data) -> None:
    values.update(head="sequence_classification", num_labels=data.info["num_labels"])
    values.setdefault("vocab_size", data.info["vocab_size"])
    values.setdefault("max_positions", data.splits["train"]["input_ids"].shape[1])
    values.setdefault("max_length", values["max_positions"])
    values.setdefault("labels", data.labels)
    values.setdefault("type_vocab_size", 0)


def _fill_seq2seq(values: dict, cfg: TrainConfig, data: Data) -> None:
    tok = data.tokenizer
    values.setdefault("vocab_size", data.info["vocab_size"])
    values.setdefault("max_positions", cfg.data.max_length + 1)
    values.update(decoder_start_token_id=tok.bos_id, eos_token_id=tok.eos_id, pad_token_id=tok.pad_id)


def _fill_vit(values: dict, cfg: TrainConfig, data: Data) -> None:
    shape = data.info["input_shape"]  # (channels, H, W) or (channels, L)
    values.setdefault("channels", shape[0])
    values.setdefault("image_size", list(shape[1:]))
    values.setdefault("patch_size", [2] * (len(shape) - 1))
    values.update(num_labels=data.info["num_labels"], input=cfg.task)  # image, audio or signal: what classify() reads
    values.setdefault("labels", data.labels)


def _token_loss(model, batch, smoothing):
    """Next-token prediction at every labelled position."""
    logits = model(batch["input_ids"]).logits
    labels = batch["labels"]
    loss = F.cross_entropy(logits.flatten(0, 1).float(), labels.flatten(), ignore_index=IGNORE,
                           label_smoothing=smoothing)
    keep = labels != IGNORE
    right = ((logits.argmax(-1) == labels) & keep).sum()
    return loss, {"correct": int(right), "count": int(keep.sum())}


def _query_loss(model, batch, smoothing):
    """MQAR: labels only at the queries, so logits there only."""
    keep = batch["labels"] != IGNORE
    logits = model(batch["input_ids"], logits_for=keep).logits
    labels = batch["labels"][keep]
    loss = F.cross_entropy(logits.float(), labels, label_smoothing=smoothing)
    return loss, {"correct": int((logits.argmax(-1) == labels).sum()), "count": int(labels.numel())}


def _sequence_loss(model, batch, smoothing):
    """Teacher-forced decoding; a sequence counts as right when every labelled token is."""
    labels = batch["labels"]
    start = torch.full_like(labels[:, :1], model.config.decoder_start_token_id)
    dec = torch.cat([start, labels[:, :-1].clamp(min=0)], dim=1)
    logits = model(batch["input_ids"], batch["attention_mask"], decoder_input_ids=dec).logits
    loss = F.cross_entropy(logits.flatten(0, 1).float(), labels.flatten(), ignore_index=IGNORE,
                           label_smoothing=smoothing)
    keep = labels != IGNORE
    exact = ((logits.argmax(-1) == labels) | ~keep).all(-1).sum()
    return loss, {"correct": int(exact), "count": labels.shape[0]}


def _label_loss(logits, batch, smoothing):
    labels = batch["labels"]
    loss = F.cross_entropy(logits.float(), labels, label_smoothing=smoothing)
    return loss, {"correct": int((logits.argmax(-1) == labels).sum()), "count": labels.shape[0]}


def _text_label_loss(model, batch, smoothing):
    return _label_loss(model(batch["input_ids"], batch["attention_mask"]).logits, batch, smoothing)


def _input_label_loss(model, batch, smoothing):
    return _label_loss(model(batch["pixel_values"]).logits, batch, smoothing)


@dataclass(frozen=True)
class Task:
    """What a `qkv train` task trains and how it is scored."""

    config: type  # the model config class (what the [model] table is checked against)
    model: type  # the model family built from it
    fill: Callable[[dict, TrainConfig, Data], None]  # what the data fixes in the config (vocabulary, classes)
    loss: Callable  # (model, batch, label_smoothing) -> (loss, {"correct", "count"})
    metric: str  # what correct / count is called
    mode: str  # "max": higher is better; "min": the loss itself is the metric
    unit: str  # what one "count" is
    defaults: dict = field(default_factory=dict)  # small model defaults, overridden by the [model] table
    # metrics over a whole split (mAP, mean IoU, BLEU): scorer(model) has add(model, batch, output) and
    # result() -> {metric: value}; the loss then returns the model output as stats["output"]
    scorer: type | None = None


_VIT = dict(dim=128, n_layers=4, n_heads=4, ffn_dim=256, dropout=0.1)
TASKS: dict[str, Task] = {
    "lm": Task(CausalLMConfig, CausalLM, _fill_lm, _token_loss, "loss", "min", "token",
               dict(dim=128, n_layers=4, n_heads=4, ffn_dim=512, activation="gelu_tanh", dropout=0.0)),
    # learned positions and a width-2 token convolution: the recall circuit forms in hundreds of steps
    # (BENCHMARKS.md: plain attention, rotary or learned, stayed at chance on 256 tokens within budget)
    "mqar": Task(CausalLMConfig, CausalLM, _fill_lm, _query_loss, "accuracy", "max", "query",
                 dict(dim=128, n_layers=2, n_heads=2, ffn_dim=256, positions="learned", token_conv=2, norm="rms",
                      activation="swiglu", bias=False)),
    # conversations: the lm loss on assistant tokens only (qkv.data.chat sets the other labels to IGNORE)
    "chat": Task(CausalLMConfig, CausalLM, _fill_lm, _token_loss, "loss", "min", "token",
                 dict(dim=128, n_layers=4, n_heads=4, ffn_dim=512, activation="gelu_tanh", dropout=0.0)),
    "classify": Task(TextEncoderConfig, TextEncoder, _fill_classify, _text_label_loss, "accuracy", "max", "text",
                     dict(dim=128, n_layers=2, n_heads=4, ffn_dim=512, dropout=0.1, attn_dropout=0.1)),
    "listops": Task(TextEncoderConfig, TextEncoder, _fill_classify, _text_label_loss, "accuracy", "max",
                    "expression", dict(dim=128, n_layers=2, n_heads=4, ffn_dim=256, dropout=0.1, attn_dropout=0.0)),
    # learned positions and 1/sqrt(d) attention train far faster from scratch than T5's relative
    # buckets with unscaled attention (copying: exact in 400 steps instead of none in 1000)
    "seq2seq": Task(Seq2SeqConfig, Seq2Seq, _fill_seq2seq, _sequence_loss, "exact_match", "max", "sequence",
                    dict(dim=128, n_layers=2, n_heads=4, head_dim=32, ffn_dim=512, positions="learned", scale=None,
                         scale_decoder_output=False, activation="gelu")),
    "image": Task(ViTConfig, VisionTransformer, _fill_vit, _input_label_loss, "accuracy", "max", "image", _VIT),
    "audio": Task(ViTConfig, VisionTransformer, _fill_vit, _input_label_loss, "accuracy", "max", "clip", _VIT),
    "signal": Task(ViTConfig, VisionTransformer, _fill_vit, _input_label_loss, "accuracy", "max", "signal", _VIT),
    # YOLOS-Ti's shape at 64 x 64: 8 x 8 patches, a [DET] token per possible object and some spare
    "detect": Task(YolosConfig, ObjectDetector, V.fill_detect, V.detect_loss, "map50", "max", "image",
                   dict(patch_size=8, dim=192, n_layers=6, n_heads=3, ffn_dim=768, num_detection_tokens=10,
                        norm_eps=1e-6), V.DetectionScore),
    "segment": Task(SegformerConfig, SemanticSegmenter, V.fill_segment, V.segment_loss, "mean_iou", "max", "pixel",
                    dict(head_dropout=0.0), V.SegmentationScore),
    # [model.encoder] and [model.decoder] tables over vision_tasks.CAPTION_ENCODER / CAPTION_DECODER
    "caption": Task(CaptionerConfig, ImageCaptioner, V.fill_caption, V.caption_loss, "exact_match", "max",
                    "caption", {}, V.CaptionScore),
}
# Views of the table, by task name.
METRIC = {name: (t.metric, t.mode) for name, t in TASKS.items()}
DEFAULTS = {name: t.defaults for name, t in TASKS.items()}
CONFIG_CLASS = {name: t.config for name, t in TASKS.items()}


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
    task = TASKS[cfg.task]
    values = {**task.defaults, **cfg.model}
    task.fill(values, cfg, data)
    return _config(task.config, values)


def build_model(cfg: TrainConfig, data: Data):
    model = TASKS[cfg.task].model(model_config(cfg, data))
    model.init_weights()
    model.tokenizer = data.tokenizer
    return model


def loss_and_stats(task: str, model, batch: dict, label_smoothing: float = 0.0,
                   class_balance: float = 0.0) -> tuple[torch.Tensor, dict]:
    """The training loss of a batch and the counts its metric sums over (``class_balance``: segment only)."""
    if class_balance:
        return TASKS[task].loss(model, batch, label_smoothing, class_balance=class_balance)
    return TASKS[task].loss(model, batch, label_smoothing)


@torch.no_grad()
def evaluate(task: str, model, data: Data, split: str, batch_size: int, block_size: int, limit: int = 0) -> dict:
    """Mean loss and the task's metric over a split (in order; ``limit`` batches at most)."""
    was = model.training
    model.eval()
    total, n, correct, count = 0.0, 0, 0, 0
    t = TASKS[task]
    scorer = t.scorer(model) if t.scorer is not None else None
    try:
        device = next(model.parameters()).device
        for batch in data.batches(split, batch_size, block_size, limit):
            batch = {k: v.to(device) for k, v in batch.items()}
            loss, stats = loss_and_stats(task, model, batch)
            total += float(loss) * stats["count"]
            n += stats["count"]
            correct += stats.get("correct", 0)
            count += stats["count"]
            if scorer is not None:
                scorer.add(model, batch, stats["output"])
    finally:
        model.train(was)
    out = {"loss": total / max(n, 1)}
    if t.mode == "min":  # the loss is the metric: report its perplexity beside it
        out["perplexity"] = float(torch.exp(torch.tensor(out["loss"])))
    elif scorer is not None:
        out.update(scorer.result())
    else:
        out[t.metric] = correct / max(count, 1)
    return out
