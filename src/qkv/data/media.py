"""Image and audio data: folders of class folders, scikit-learn's digits, mnist1d, and spoken words
synthesised offline with espeak-ng."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
import tempfile
from pathlib import Path

import numpy as np
import torch

from .core import DataError

IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".bmp", ".gif", ".webp"}
AUDIO_SUFFIXES = {".wav", ".flac", ".ogg"}


def class_folders(root: str | Path, suffixes: set[str]) -> tuple[list[Path], list[int], list[str]]:
    """Files under ``root/<class>/``: (paths, label ids, class names sorted)."""
    root = Path(root)
    if not root.is_dir():
        raise DataError(f"{root}: expected a folder with one sub-folder per class")
    classes = sorted(p.name for p in root.iterdir() if p.is_dir())
    if len(classes) < 2:
        raise DataError(f"{root}: found {len(classes)} class folder(s); need at least 2")
    paths, labels = [], []
    for i, c in enumerate(classes):
        files = sorted(f for f in (root / c).iterdir() if f.suffix.lower() in suffixes)
        if not files:
            raise DataError(f"{root / c}: no {'/'.join(sorted(suffixes))} files")
        paths += files
        labels += [i] * len(files)
    return paths, labels, classes


def image_folder(root: str | Path, image_size: int = 32) -> tuple[dict[str, torch.Tensor], list[str]]:
    """Images resized to ``image_size`` x ``image_size``, scaled to [-1, 1]: ({pixel_values, labels}, class names)."""
    from PIL import Image, UnidentifiedImageError

    paths, labels, classes = class_folders(root, IMAGE_SUFFIXES)
    images = []
    for p in paths:
        try:
            with Image.open(p) as im:
                arr = np.asarray(im.convert("RGB").resize((image_size, image_size), Image.BILINEAR), dtype=np.float32)
        except (UnidentifiedImageError, OSError) as e:
            raise DataError(f"{p}: not a readable image ({e})") from None
        images.append(torch.from_numpy(arr / 127.5 - 1.0).permute(2, 0, 1))
    return {"pixel_values": torch.stack(images), "labels": torch.tensor(labels)}, classes


def clip_features(wave: torch.Tensor, seconds: float = 1.0, n_mels: int = 40) -> torch.Tensor:
    """Log-mel features (1, n_mels, 100 * seconds) of a 16 kHz clip padded or cut to ``seconds``."""
    from ..models.audio import SAMPLE_RATE, log_mel

    return log_mel(wave, n_mels=n_mels, samples=int(SAMPLE_RATE * seconds))


def audio_folder(root: str | Path, seconds: float = 1.0, n_mels: int = 40) -> tuple[dict[str, torch.Tensor], list[str]]:
    """WAV/FLAC/OGG clips as log-mel features: ({pixel_values (N, 1, n_mels, frames), labels}, class names)."""
    from ..models.audio import load_audio

    paths, labels, classes = class_folders(root, AUDIO_SUFFIXES)
    feats = []
    for p in paths:
        try:
            wave = load_audio(p)
        except RuntimeError as e:
            raise DataError(f"{p}: not a readable audio file ({e})") from None
        if not bool(torch.isfinite(wave).all()):  # float WAVs can hold NaN: it would poison every weight
            raise DataError(f"{p}: holds NaN or infinite samples; re-export it or leave it out")
        feats.append(clip_features(wave, seconds, n_mels))
    return {"pixel_values": torch.stack(feats), "labels": torch.tensor(labels)}, classes


def digits() -> tuple[dict[str, torch.Tensor], list[str]]:
    """scikit-learn's handwritten digits: 1,797 images of 8 x 8, scaled to [-1, 1]."""
    try:
        from sklearn.datasets import load_digits
    except ImportError:
        raise DataError("the digits set ships with scikit-learn: pip install scikit-learn") from None
    d = load_digits()
    x = torch.tensor(d.images, dtype=torch.float32)[:, None] / 8.0 - 1.0
    return {"pixel_values": x, "labels": torch.tensor(d.target)}, [str(i) for i in range(10)]


def mnist1d(seed: int = 42) -> tuple[dict[str, dict[str, torch.Tensor]], list[str]]:
    """mnist1d (Greydanus, arXiv:2011.14439), generated with ``make_dataset``: 4,000 train and 1,000 test
    signals of 40 points; returns {"train": ..., "test": ...}."""
    try:
        from mnist1d.data import get_dataset_args, make_dataset
    except ImportError:
        raise DataError("the mnist1d set needs the mnist1d package: pip install --no-deps mnist1d") from None
    args = get_dataset_args()
    args.seed = seed
    d = make_dataset(args)

    def part(x, y):
        return {"pixel_values": torch.tensor(np.asarray(x), dtype=torch.float32)[:, None], "labels": torch.tensor(y)}

    return {"train": part(d["x"], d["y"]), "test": part(d["x_test"], d["y_test"])}, [str(i) for i in range(10)]


WORDS = ["zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine"]
VOICES = ["en-us", "en-gb", "en-gb-scotland", "en-gb-x-rp", "en-gb-x-gbclan", "en-029", "en-gb-x-gbcwmd"]
VARIANTS = ["", "+m1", "+m2", "+m3", "+m4", "+m5", "+f1", "+f2", "+f3", "+f4", "+klatt", "+croak"]


def spoken_words(test_voices: int = 2, speeds=(130, 175), pitches=(35, 65), cache: str | Path | None = None,
                 n_mels: int = 40) -> tuple[dict[str, dict[str, torch.Tensor]], list[str]]:
    """Ten spoken digits synthesised with espeak-ng across voices, variants, speeds and pitches.

    The last ``test_voices`` accents (all their variants) are held out: train and test share
    no voice. Features are log-mel (40 bands x 100 frames, 1 s); cached under ``cache``.
    """
    exe = shutil.which("espeak-ng")
    if exe is None:
        raise DataError("spoken-words synthesises speech with espeak-ng: apt-get install espeak-ng")
    key = hashlib.sha1(json.dumps([WORDS, VOICES, VARIANTS, test_voices, list(speeds), list(pitches), n_mels]).encode()).hexdigest()[:12]
    root = Path(cache or os.environ.get("QKV_CACHE", Path.home() / ".cache" / "qkv")) / f"spoken-words-{key}.pt"
    if root.exists():
        splits = torch.load(root, weights_only=True)
    else:
        splits = _synthesize(exe, test_voices, speeds, pitches, n_mels)
        root.parent.mkdir(parents=True, exist_ok=True)
        tmp = root.with_suffix(".tmp")
        torch.save(splits, tmp)
        os.replace(tmp, root)
    return splits, list(WORDS)


def _synthesize(exe, test_voices, speeds, pitches, n_mels):
    from ..models.audio import load_audio

    parts = {"train": ([], []), "test": ([], [])}
    with tempfile.TemporaryDirectory() as d:
        wav = Path(d) / "w.wav"
        for vi, voice in enumerate(VOICES):
            split = "test" if vi >= len(VOICES) - test_voices else "train"
            for variant in VARIANTS:
                for speed in speeds:
                    for pitch in pitches:
                        for label, word in enumerate(WORDS):
                            subprocess.run([exe, "-v", voice + variant, "-s", str(speed), "-p", str(pitch), "-w",
                                            str(wav), word], check=True, capture_output=True)
                            parts[split][0].append(clip_features(load_audio(wav), 1.0, n_mels))
                            parts[split][1].append(label)
    return {s: {"pixel_values": torch.stack(x), "labels": torch.tensor(y)} for s, (x, y) in parts.items()}
