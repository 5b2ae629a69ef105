"""Helpers shared by the Hugging Face converters."""

from __future__ import annotations

from collections.abc import Mapping

import torch

from .._keymap import ConversionError, KeyMap

ACTIVATIONS = {"gelu": "gelu", "gelu_new": "gelu_tanh", "gelu_pytorch_tanh": "gelu_tanh", "relu": "relu",
               "silu": "silu", "swish": "silu", "gelu_fast": "gelu_tanh"}
TEXT_HEADS = {
    "ForSequenceClassification": "sequence_classification",
    "ForTokenClassification": "token_classification",
    "ForQuestionAnswering": "question_answering",
}


def _activation(name: str) -> str:
    if name not in ACTIVATIONS:
        raise ConversionError(f"activation {name!r} is not supported; known: {sorted(ACTIVATIONS)}")
    return ACTIVATIONS[name]


def _first(*values):
    """The first value that is not None."""
    return next(v for v in values if v is not None)


def _arch(cfg: Mapping) -> str:
    archs = cfg.get("architectures") or []
    return archs[0] if archs else ""


def _labels(cfg: Mapping) -> tuple[int, list[str] | None]:
    id2label = cfg.get("id2label")
    if id2label:
        names = [id2label[k] for k in sorted(id2label, key=int)]
        return len(names), names
    n = cfg.get("num_labels", 2)
    return n, None


def _prefix(sd: Mapping[str, torch.Tensor], probe: str, candidates: tuple[str, ...]) -> str:
    for p in candidates:
        if p + probe in sd:
            return p
    raise ConversionError(f"checkpoint has no {probe!r} under any of the prefixes {candidates}")


def _no_leftovers(sd, *maps: KeyMap) -> None:
    used = set().union(*(m.used for m in maps))
    ignored = [p for m in maps for p in m.ignored]
    left = sorted(k for k in sd if k not in used and not any(p.fullmatch(k) for p in ignored))
    if left:
        raise ConversionError(f"checkpoint keys not used by the conversion: {left[:10]}")
