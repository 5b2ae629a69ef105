"""Reading a model folder's files with errors that name the file and the fix."""

from __future__ import annotations

import json
from pathlib import Path

import torch


def read_json(path: Path, expect: type = dict):
    """A JSON object (or a list, with ``expect=list``) from ``path``; errors name the file and what is wrong."""
    if path.is_dir():
        raise ValueError(f"{path}: is a folder, not a JSON file")
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except UnicodeDecodeError as e:
        raise ValueError(f"{path}: not UTF-8 text (byte {e.start}); it may be damaged: fetch it again") from None
    except json.JSONDecodeError as e:
        raise ValueError(f"{path}: not valid JSON ({e.msg} at line {e.lineno}, column {e.colno}); "
                         "it may be truncated: fetch it again") from None
    if not isinstance(data, expect):
        want = "object ({...})" if expect is dict else "list ([...])"
        raise ValueError(f"{path}: expected a JSON {want}, found a {type(data).__name__}")
    return data


def load_file(path: Path) -> dict[str, torch.Tensor]:
    """The tensors of one safetensors file; a truncated or corrupt file is refused by name."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file as _load

    try:
        return _load(str(path))
    except (SafetensorError, OSError, RuntimeError, ValueError) as e:
        raise ValueError(f"{path}: not a readable safetensors file ({e}); it may be truncated or corrupt: "
                         "fetch or save it again") from None


def load_weights(model: torch.nn.Module, path: Path) -> None:
    """Fill ``model`` strictly from one safetensors file (tied weights saved once are restored to both
    names); a damaged file or a mismatch of names or shapes is refused naming the file."""
    from safetensors import SafetensorError
    from safetensors.torch import load_model

    if not path.exists():
        raise FileNotFoundError(f"no {path.name} in {path.parent}")
    try:
        load_model(model, str(path), strict=True)
    except (SafetensorError, OSError) as e:
        raise ValueError(f"{path}: not a readable safetensors file ({e}); it may be truncated or corrupt: "
                         "fetch or save it again") from None
    except RuntimeError as e:  # strict loading: missing / unexpected keys, or shapes that differ
        first = str(e).strip().splitlines()
        raise ValueError(f"{path}: the weights do not fit the model its config describes ({' '.join(first)[:400]})"
                         ) from None
