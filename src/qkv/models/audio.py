"""Audio input for speech models: loading, resampling to 16 kHz, and Whisper's log-mel features.

The features are computed with ``torch.stft`` and a Slaney-style mel filterbank
(as librosa and Whisper build it), not torchaudio, whose PyPI build does not
import beside the CPU torch.
"""

from __future__ import annotations

import functools
import math
from pathlib import Path

import numpy as np
import torch

SAMPLE_RATE = 16000
N_FFT = 400  # 25 ms windows
HOP = 160  # 10 ms hop
CHUNK_SECONDS = 30
CHUNK_SAMPLES = SAMPLE_RATE * CHUNK_SECONDS  # Whisper always sees 30 s (3000 frames)


def load_audio(source, sample_rate: int | None = None) -> torch.Tensor:
    """Mono float32 waveform at 16 kHz from a file path (WAV, FLAC, OGG via soundfile) or an array.

    Arrays (numpy or torch; (N,) or (N, channels)) need ``sample_rate``; other rates are
    resampled with a polyphase filter (scipy's ``resample_poly``).
    """
    if isinstance(source, (str, Path)):
        if not Path(source).is_file():
            raise FileNotFoundError(f"no audio file at {str(source)!r}")
        try:
            import soundfile
        except ImportError:
            raise ImportError("reading audio files needs soundfile: pip install 'qkv[audio]'") from None
        data, rate = soundfile.read(str(source), dtype="float32", always_2d=True)
        data = data.mean(axis=1)
    else:
        if sample_rate is None:
            raise ValueError("audio arrays need their sample_rate, e.g. transcribe(array, sample_rate=22050)")
        data = source.detach().cpu().numpy() if isinstance(source, torch.Tensor) else np.asarray(source)
        data = data.astype(np.float32)
        if data.ndim == 2:
            data = data.mean(axis=1 if data.shape[1] < data.shape[0] else 0)
        if data.ndim != 1:
            raise ValueError(f"audio must be (samples,) or (samples, channels), got shape {data.shape}")
        rate = sample_rate
    if rate != SAMPLE_RATE:
        data = resample(data, rate, SAMPLE_RATE)
    return torch.from_numpy(np.ascontiguousarray(data, dtype=np.float32))


def resample(data: np.ndarray, rate: int, target: int = SAMPLE_RATE) -> np.ndarray:
    """Polyphase resampling (anti-aliased) from ``rate`` to ``target`` Hz."""
    try:
        from scipy.signal import resample_poly
    except ImportError:
        raise ImportError(f"resampling {rate} Hz audio to {target} Hz needs scipy: pip install 'qkv[audio]'") from None
    g = math.gcd(int(rate), int(target))
    return resample_poly(data, target // g, int(rate) // g).astype(np.float32)


def _hz_to_mel(f: np.ndarray) -> np.ndarray:
    """Slaney's mel scale: linear below 1 kHz, logarithmic above."""
    f = np.asarray(f, dtype=np.float64)
    mel = f / (200.0 / 3)
    log = f >= 1000.0
    return np.where(log, 15.0 + np.log(np.maximum(f, 1e-10) / 1000.0) / (np.log(6.4) / 27.0), mel)


def _mel_to_hz(m: np.ndarray) -> np.ndarray:
    m = np.asarray(m, dtype=np.float64)
    hz = m * (200.0 / 3)
    return np.where(m >= 15.0, 1000.0 * np.exp((np.log(6.4) / 27.0) * (m - 15.0)), hz)


@functools.lru_cache(maxsize=8)
def mel_filters(n_mels: int = 80, n_fft: int = N_FFT, sample_rate: int = SAMPLE_RATE) -> torch.Tensor:
    """Triangular, area-normalised mel filters (n_fft // 2 + 1, n_mels), Slaney scale, 0 to 8 kHz."""
    fft_freqs = np.linspace(0, sample_rate // 2, n_fft // 2 + 1)
    mels = np.linspace(_hz_to_mel(0.0), _hz_to_mel(sample_rate / 2), n_mels + 2)
    edges = _mel_to_hz(mels)
    widths = np.diff(edges)
    slopes = edges[None, :] - fft_freqs[:, None]  # (freqs, n_mels + 2)
    down = -slopes[:, :-2] / widths[:-1]
    up = slopes[:, 2:] / widths[1:]
    weights = np.maximum(0.0, np.minimum(down, up))
    weights *= 2.0 / (edges[2:] - edges[:-2])  # equal area per filter
    return torch.from_numpy(weights.astype(np.float32))


def log_mel(audio: torch.Tensor, n_mels: int = 80, samples: int | None = CHUNK_SAMPLES) -> torch.Tensor:
    """Whisper's features: (N,) or (B, N) waveforms at 16 kHz -> (B, n_mels, samples // 160).

    Pads (or cuts) to ``samples`` (30 s), takes a 400-point Hann STFT with hop 160,
    the power in mel bands, log10 clamped to 8 below the maximum, scaled to about [-1, 1].
    """
    x = audio.float()
    if x.dim() == 1:
        x = x[None]
    if samples is not None:
        x = x[:, :samples] if x.shape[1] >= samples else torch.nn.functional.pad(x, (0, samples - x.shape[1]))
    window = torch.hann_window(N_FFT, device=x.device)
    spec = torch.stft(x, N_FFT, HOP, window=window, return_complex=True)
    power = (spec[..., :-1].abs() ** 2).contiguous()  # (B, freqs, frames): the last frame is dropped
    mel = mel_filters(n_mels).to(x.device).T @ power  # (B, n_mels, frames)
    logs = torch.clamp(mel, min=1e-10).log10()
    top = logs.amax(dim=(1, 2), keepdim=True)
    logs = torch.maximum(logs, top - 8.0)
    return (logs + 4.0) / 4.0
