"""Helpers shared by the Hugging Face config builders: activations, task heads, class names, building."""

from __future__ import annotations

import re

from .._keymap import ConversionError
from ._fields import Fields

# transformers' activation names -> qkv's (gelu_new, gelu_pytorch_tanh and gelu_fast are one tanh formula)
ACTIVATIONS = {"gelu": "gelu", "gelu_new": "gelu_tanh", "gelu_pytorch_tanh": "gelu_tanh", "relu": "relu",
               "silu": "silu", "swish": "silu", "gelu_fast": "gelu_tanh"}
# act(gate(x)) * up(x) with that activation (Llama's MLP, T5's gated-* feed-forward)
GATED = {"silu": "swiglu", "gelu": "geglu", "gelu_tanh": "geglu_tanh", "relu": "reglu"}
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


def _arch(f: Fields) -> str:
    archs = f["architectures"] or []
    return archs[0] if archs else ""


def _labels(f: Fields) -> tuple[int, list[str] | None]:
    """(number of classes, their names or None): id2label, else num_labels, else 2."""
    names = f["id2label"]
    if names:
        if f["num_labels"] is not None and f["num_labels"] != len(names):
            raise ConversionError(f"{f.source}: num_labels={f['num_labels']} but id2label names {len(names)} "
                                  "classes; make them agree")
        return len(names), names
    return (f["num_labels"] if f["num_labels"] is not None else 2), None


def build(cls, f: Fields, names: dict[str, str], **values):
    """``cls(**values)``; its refusals (bad sizes, too large for memory) name the config.json fields too
    (``names``: qkv field -> config.json field)."""
    try:
        return cls(**values)
    except (ValueError, TypeError) as e:
        said = [f"{q} is {h}" for q, h in names.items() if re.search(rf"\b{q}\b", str(e))]
        raise ConversionError(f"{f.source}: qkv's {f.family} loader cannot build this model: {e}"
                              + (f" (in config.json {', '.join(said)})" if said else "")) from None
