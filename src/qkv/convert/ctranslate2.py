"""CTranslate2 checkpoints -> qkv: the ``model.bin`` reader and the Whisper converter.

``model.bin`` is a little-endian table: a version (uint32), the spec name and
revision, then for each variable its name, rank, dims, dtype code and raw
bytes, then aliases (name -> variable). Strings are uint16-length-prefixed and
NUL-terminated. Nothing is executed while reading it.
"""

from __future__ import annotations

import json
import re
import struct
from collections.abc import Mapping
from pathlib import Path

import numpy as np
import torch

from ..models import WhisperConfig
from ._keymap import ConversionError, KeyMap

# CTranslate2's DataType codes
_DTYPES = {0: np.float32, 1: np.int8, 2: np.int16, 3: np.int32, 4: np.float16}
_BF16 = 5


class _Reader:
    def __init__(self, data: bytes):
        self.data, self.off = data, 0

    def take(self, fmt: str):
        value = struct.unpack_from("<" + fmt, self.data, self.off)
        self.off += struct.calcsize("<" + fmt)
        return value[0] if len(value) == 1 else value

    def string(self) -> str:
        n = self.take("H")
        raw = self.data[self.off : self.off + n]
        self.off += n
        return raw.rstrip(b"\0").decode("utf-8")

    def raw(self, n: int) -> bytes:
        out = self.data[self.off : self.off + n]
        if len(out) != n:
            raise ConversionError(f"model.bin ends early: wanted {n} bytes at offset {self.off}")
        self.off += n
        return out


def read_model_bin(path: str | Path) -> tuple[str, dict[str, torch.Tensor]]:
    """(spec name, {variable name: tensor}) of a CTranslate2 ``model.bin``; aliases resolved, scalars as 0-d tensors."""
    try:
        return _read_model_bin(path)
    except (struct.error, RuntimeError, KeyError, UnicodeDecodeError, OSError) as e:
        raise ConversionError(f"{path}: not a readable CTranslate2 model.bin ({type(e).__name__}: {e})") from None


def _read_model_bin(path: str | Path) -> tuple[str, dict[str, torch.Tensor]]:
    r = _Reader(Path(path).read_bytes())
    version = r.take("I")
    if version < 5:
        raise ConversionError(f"model.bin format version {version} is too old (need >= 5)")
    spec = r.string()
    r.take("I")  # spec revision
    out: dict[str, torch.Tensor] = {}
    for _ in range(r.take("I")):
        name = r.string()
        rank = r.take("B")
        dims = [r.take("I") for _ in range(rank)]
        code = r.take("B")
        nbytes = r.take("I")
        raw = r.raw(nbytes)
        if code == _BF16:
            t = torch.frombuffer(bytearray(raw), dtype=torch.bfloat16)
        elif code in _DTYPES:
            t = torch.from_numpy(np.frombuffer(raw, dtype=_DTYPES[code]).copy())
        else:
            raise ConversionError(f"model.bin variable {name!r} has unknown dtype code {code}")
        try:
            out[name] = t.reshape(dims)
        except RuntimeError:
            raise ConversionError(f"model.bin variable {name!r}: {t.numel()} values do not fill shape {dims}") from None
    for _ in range(r.take("I")):
        alias, target = r.string(), r.string()
        if target not in out:
            raise ConversionError(f"model.bin alias {alias!r} points to a missing variable {target!r}")
        out[alias] = out[target]
    return spec, out


def _token_id(vocab: Mapping[str, int], token: str) -> int | None:
    return vocab.get(token)


def _variable(variables: Mapping[str, torch.Tensor], name: str, rank: int | None = None) -> torch.Tensor:
    """A variable a WhisperSpec must have (of ``rank`` dimensions, if given), refused by name otherwise."""
    if name not in variables:
        raise ConversionError(f"model.bin has no variable {name!r}: not a complete CTranslate2 Whisper model")
    t = variables[name]
    if rank is not None and t.dim() != rank:
        raise ConversionError(f"model.bin variable {name!r} has shape {tuple(t.shape)}; a Whisper model has "
                              f"{rank} dimensions there")
    return t


def _ids(config: Mapping, name: str, default: list[int]) -> list[int]:
    value = config.get(name, default)
    if not isinstance(value, list) or not all(isinstance(v, int) and not isinstance(v, bool) for v in value):
        raise ConversionError(f"config.json field {name}={value!r} must be a list of token ids")
    return value


def whisper_config(variables: Mapping[str, torch.Tensor], config: Mapping, vocab: Mapping[str, int]) -> WhisperConfig:
    """WhisperConfig from the variables' shapes and scalars, ``config.json`` and the tokenizer vocabulary."""
    def layers(side: str) -> int:
        return len({m.group(1) for k in variables if (m := re.match(rf"{side}/layer_(\d+)/", k))})

    emb = _variable(variables, "decoder/embeddings/weight", 2)
    heads = int(_variable(variables, "encoder/num_heads", 0))
    dim = emb.shape[1]
    if int(variables.get("decoder/num_heads", heads)) != heads:
        raise ConversionError("CTranslate2 Whisper with different encoder and decoder head counts is not supported")
    start = _token_id(vocab, "<|startoftranscript|>")
    eot = _token_id(vocab, "<|endoftext|>")
    if start is None or eot is None:
        raise ConversionError("tokenizer has no <|startoftranscript|> / <|endoftext|>: not a Whisper tokenizer")
    try:
        return WhisperConfig(
            vocab_size=emb.shape[0], dim=dim, n_layers=layers("encoder"), n_decoder_layers=layers("decoder"),
            n_heads=heads, head_dim=dim // heads if heads > 0 else None,
            ffn_dim=_variable(variables, "encoder/layer_0/ffn/linear_0/weight", 2).shape[0],
            max_positions=_variable(variables, "decoder/position_encodings/encodings", 2).shape[0],
            n_mels=_variable(variables, "encoder/conv1/weight", 3).shape[1],
            audio_positions=_variable(variables, "encoder/position_encodings/encodings", 2).shape[0],
            decoder_start_token_id=start, eos_token_id=eot, pad_token_id=eot,
            no_timestamps_token_id=_token_id(vocab, "<|notimestamps|>"),
            suppress_tokens=_ids(config, "suppress_ids", []),
            begin_suppress_tokens=_ids(config, "suppress_ids_begin", [220, eot]),
        )
    except (ValueError, TypeError) as e:
        raise ConversionError(f"model.bin describes a Whisper model qkv cannot build: {e}") from None


def _linear(km: KeyMap, target: str, source: str) -> None:
    km.copy(target + ".weight", source + "/weight")
    km.copy(target + ".bias", source + "/bias")


def _norm(km: KeyMap, target: str, source: str) -> None:
    km.copy(target + ".weight", source + "/gamma")
    km.copy(target + ".bias", source + "/beta")


def whisper(variables: Mapping[str, torch.Tensor], config: WhisperConfig) -> dict[str, torch.Tensor]:
    """CTranslate2 WhisperSpec variables -> SpeechRecognizer state dict (weights as float32)."""
    km = KeyMap(variables, dtype=torch.float32)
    km.ignore(r"(en|de)coder/num_heads", r"decoder/(activation|alibi|alignment_heads|alignment_layer|pre_norm|"
              r"scale_embeddings|start_from_zero_embedding)")
    for name in ("conv1", "conv2"):
        _linear(km, f"enc_side.{name}", f"encoder/{name}")
    km.copy("enc_side.pos", "encoder/position_encodings/encodings")
    km.copy("tokens.weight", "decoder/embeddings/weight")
    km.copy("dec_side.pos.weight", "decoder/position_encodings/encodings")
    _norm(km, "encoder.norm", "encoder/layer_norm")
    _norm(km, "decoder.norm", "decoder/layer_norm")
    for side, n in (("encoder", config.n_layers), ("decoder", config.n_decoder_layers or config.n_layers)):
        for i in range(n):
            lk = km.within(f"{side}/layer_{i}/", f"{side}.layers.{i}.")
            _linear(lk, "attn.qkv", "self_attention/linear_0")  # fused q, k, v (k bias zero)
            _linear(lk, "attn.o", "self_attention/linear_1")
            _norm(lk, "attn_norm", "self_attention/layer_norm")
            if side == "decoder":
                _linear(lk, "cross.q", "attention/linear_0")
                _linear(lk, "cross.kv", "attention/linear_1")  # fused k, v
                _linear(lk, "cross.o", "attention/linear_2")
                _norm(lk, "cross_norm", "attention/layer_norm")
            _linear(lk, "ffn.up", "ffn/linear_0")
            _linear(lk, "ffn.down", "ffn/linear_1")
            _norm(lk, "ffn_norm", "ffn/layer_norm")
    km.head("lm_head.weight", "decoder/projection/weight", tied_to="tokens.weight", tied=True)
    return km.result()


def _json(path: Path, default: dict | None = None) -> dict:
    """A JSON object from ``path`` (``default`` when the file is absent); errors name the file."""
    if default is not None and not path.exists():
        return default
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, ValueError) as e:
        raise ConversionError(f"{path}: not a readable JSON file ({type(e).__name__}: {e})") from None
    if not isinstance(data, dict):
        raise ConversionError(f"{path}: expected a JSON object ({{...}}), found a {type(data).__name__}")
    return data


def _vocabulary(tok: dict, path: Path) -> dict[str, int]:
    vocab = tok.get("model", {}).get("vocab") if isinstance(tok.get("model"), dict) else None
    added = tok.get("added_tokens", [])
    if not isinstance(vocab, dict) or not isinstance(added, list) or not all(
            isinstance(a, dict) and isinstance(a.get("content"), str) and isinstance(a.get("id"), int) for a in added):
        raise ConversionError(f"{path}: expected a tokenizer with a model.vocab object and an added_tokens list")
    vocab = dict(vocab)
    for a in added:
        vocab[a["content"]] = a["id"]
    return vocab


def load_folder(folder: Path):
    """(family, config, state dict) of a CTranslate2 folder: model.bin, config.json, tokenizer.json."""
    spec, variables = read_model_bin(folder / "model.bin")
    if spec != "WhisperSpec":
        raise ConversionError(f"CTranslate2 spec {spec!r} is not supported (only WhisperSpec)")
    cfg = _json(folder / "config.json", default={})
    tok_file = folder / "tokenizer.json"
    if not tok_file.exists():
        raise ConversionError(f"{folder} has no tokenizer.json, which the Whisper token ids are read from")
    config = whisper_config(variables, cfg, _vocabulary(_json(tok_file), tok_file))
    return "speech", config, whisper(variables, config)
