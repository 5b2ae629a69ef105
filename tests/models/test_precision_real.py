"""The quality each lower precision promises, on the real offline checkpoints: all-MiniLM-L6-v2 embeddings
(cosine to float32) and whisper-tiny.en transcripts of synthesised speech (identical to float32's)."""

import copy

import pytest
import torch
from whisper_helpers import SENTENCES, espeak

import qkv
from qkv.cli import main

VOICES = [("en-us", 150, 50), ("en-gb", 130, 40), ("en-us", 175, 70)]
TEXTS = [
    "The bank raised its interest rates again this quarter.",
    "We sat on the bank of the river and watched the boats.",
    "A quick brown fox jumps over the lazy dog near the old mill.",
    "Attention lets every token look at every other token in the sequence.",
    "She bought three apples, two pears and a melon at the market on Sunday morning.",
    "ok",
    "Transformers stack multi-head attention, feed-forward layers, residuals and normalisation to model long "
    "sequences of words, pixels or audio frames, and they are trained on very large corpora.",
]


@pytest.fixture(scope="module")
def minilm():
    return qkv.load("all-MiniLM-L6-v2").eval()


@pytest.mark.parametrize("how", ["int8", "int8-weights", "bfloat16"])
def test_minilm_embeddings_keep_their_direction(minilm, how):
    ref = minilm.embed(TEXTS)
    low = copy.deepcopy(minilm)
    low = low.to(torch.bfloat16) if how == "bfloat16" else low.quantize(
        "int8", activations="none" if how == "int8-weights" else "dynamic")
    cos = torch.nn.functional.cosine_similarity(low.embed(TEXTS).float(), ref, dim=-1)
    sentences = torch.tensor([len(t.split()) > 1 for t in TEXTS])
    assert cos[sentences].min() >= (0.999 if how == "bfloat16" else 0.99), cos
    # a one-word text averages no errors away: measured 0.984 for int8 ("ok"), 0.9999 for bfloat16
    assert cos.min() >= (0.999 if how == "bfloat16" else 0.98), cos


def test_embed_command_takes_dtype_and_quantize(minilm, capsys):
    import json

    ref = minilm.embed(TEXTS[:2])
    for flags in (["--quantize", "int8"], ["--dtype", "bfloat16"], ["--dtype", "bfloat16", "--quantize", "int8"]):
        assert main(["embed", "--json", *flags, *TEXTS[:2]]) == 0
        got = torch.tensor(json.loads(capsys.readouterr().out)["embeddings"])
        assert torch.nn.functional.cosine_similarity(got, ref, dim=-1).min() >= 0.99, flags
    assert main(["embed", "--quantize", "int4", "x"]) == 2
    assert "int4" in capsys.readouterr().err


@pytest.mark.parametrize("i", range(3))
def test_whisper_int8_transcribes_clean_speech_as_float32_does(tmp_path, i):
    fp32 = qkv.load("whisper-tiny.en").eval()
    int8 = copy.deepcopy(fp32).quantize("int8")
    voice, speed, pitch = VOICES[i % len(VOICES)]
    wav = espeak(SENTENCES[i], tmp_path / "clip.wav", voice, speed, pitch)
    assert int8.transcribe(wav) == fp32.transcribe(wav)
