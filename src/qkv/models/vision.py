"""The vision transformer family (ViT, Dosovitskiy et al., arXiv:2010.11929): image patches as tokens."""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from ..nn import BlockConfig, Linear, RotaryEmbedding, TransformerEncoder
from . import _checks
from ._base import Model, ModelOutput


@dataclass
class ViTConfig:
    """Defaults are ViT-Base/16 at 224 x 224. ``image_size`` and ``patch_size`` may also be
    [height, width] (spectrograms) or [length] (1-D signals, patched by a 1-D convolution)."""

    image_size: int | list[int] = 224
    patch_size: int | list[int] = 16
    channels: int = 3
    dim: int = 768
    n_layers: int = 12
    n_heads: int = 12
    ffn_dim: int = 3072
    activation: str = "gelu"
    norm_eps: float = 1e-12
    qkv_bias: bool = True
    dropout: float = 0.0
    attn_dropout: float = 0.0
    pooler: bool = False  # the tanh pooler of a bare ViTModel
    num_labels: int = 0  # > 0: a classification head on the class token
    labels: list[str] | None = None
    # preprocessing (as the checkpoint's image processor says)
    image_mean: list[float] = field(default_factory=lambda: [0.5, 0.5, 0.5])
    image_std: list[float] = field(default_factory=lambda: [0.5, 0.5, 0.5])
    resample: str = "bilinear"  # PIL filter used to resize
    # variants for training from scratch on small data (the defaults are ViT as published)
    # "conv": two 3-wide convolutions (GELU) at full resolution before the patch projection; "strided": 3-wide
    # stride-2 convolutions (BatchNorm, GELU) halving the image log2(patch) times, widths doubling to ``dim``,
    # then a 1 x 1 projection (Xiao et al. 2021, "Early convolutions help transformers see better"; patch 2^k)
    stem: str = "patch"
    positions: str = "learned"  # "learned" table, or "rotary" over the flattened patch index
    pool: str = "cls"  # "cls": class token; "mean": mean of the patch tokens (no class token)
    input: str = "image"  # what classify() reads: "image" files/arrays, "audio" clips (log-mel), "signal" arrays

    def __post_init__(self):
        _checks.check_types(self)
        _checks.sizes(self, "image_size", "patch_size", "channels", "dim", "n_heads", "ffn_dim")
        _checks.sizes(self, "num_labels", lo=0)
        _checks.layers(self, "n_layers")
        _checks.positive(self, "norm_eps", "image_std")
        _checks.fractions(self, "dropout", "attn_dropout")
        _checks.choices(self, stem=("patch", "conv", "strided"), positions=("learned", "rotary"),
                        pool=("cls", "mean"), input=("image", "audio", "signal"),
                        resample=("bilinear", "bicubic", "nearest", "lanczos"))
        size, patch = self.size, self.patch
        if len(size) not in (1, 2) or len(patch) != len(size):
            raise ValueError(f"image_size={self.image_size} and patch_size={self.patch_size} must both be 1-D or 2-D")
        if any(s % p for s, p in zip(size, patch)):
            raise ValueError(f"image_size={self.image_size} is not a multiple of patch_size={self.patch_size}")
        if self.input == "image" and min(len(self.image_mean), len(self.image_std)) < self.channels:
            raise ValueError(f"ViTConfig: image_mean={self.image_mean} and image_std={self.image_std} need a value "
                             f"per channel (channels={self.channels})")
        if self.stem == "strided" and any(p & (p - 1) or p < 2 for p in patch):
            raise ValueError(f"ViTConfig: stem='strided' halves the image until one pixel is a patch, so "
                             f"patch_size={self.patch_size} must be a power of two >= 2; use stem='conv' otherwise")
        _checks.labels(self)
        _checks.heads(self, self.dim, self.n_heads, None)
        self.block()  # validates the activation
        _checks.budget(self, self.parameter_estimate(),
                       ("image_size", "patch_size", "channels", "dim", "n_layers", "ffn_dim", "num_labels"))

    def parameter_estimate(self) -> int:
        """About how many parameters a model of this config holds (computed, nothing allocated)."""
        d = self.dim
        patches = math.prod(s // p for s, p in zip(self.size, self.patch))
        k = 3 ** len(self.size)
        if self.stem == "conv":
            stem, patch = self.channels * k * d // 2 + k * (d // 2) ** 2, d // 2 * math.prod(self.patch) * d
        elif self.stem == "strided":
            widths = [self.channels, *self.stem_widths()]
            stem, patch = sum(a * b * k + 2 * b for a, b in zip(widths, widths[1:])), d * d
        else:
            stem, patch = 0, self.channels * math.prod(self.patch) * d
        block = _checks.block_parameters(d, self.n_heads, d // self.n_heads, self.n_heads, self.ffn_dim,
                                         self.activation)
        pos = (patches + 1) * d if self.positions == "learned" else 0
        return stem + patch + pos + self.n_layers * block + (d * d if self.pooler else 0) + d * self.num_labels

    @property
    def size(self) -> tuple[int, ...]:
        s = self.image_size
        return (s, s) if isinstance(s, int) else tuple(s)

    @property
    def patch(self) -> tuple[int, ...]:
        p = self.patch_size
        return (p,) * len(self.size) if isinstance(p, int) else tuple(p)

    def stem_widths(self) -> list[int]:
        """Output channels of the ``stem='strided'`` convolutions: doubling, the last one ``dim``."""
        steps = max(p.bit_length() - 1 for p in self.patch)
        return [max(self.dim >> (steps - 1 - i), 8) for i in range(steps)]

    @property
    def grid_shape(self) -> tuple[int, ...]:
        return tuple(s // p for s, p in zip(self.size, self.patch))

    @property
    def grid(self) -> int:
        """Patches per side of a square image."""
        return self.grid_shape[0]

    def block(self) -> BlockConfig:
        return BlockConfig(dim=self.dim, n_heads=self.n_heads, ffn_dim=self.ffn_dim, activation=self.activation,
                           norm="layer", norm_eps=self.norm_eps, prenorm=True, bias=True, qkv_bias=self.qkv_bias,
                           dropout=self.dropout, attn_dropout=self.attn_dropout)


def patch_embedding(c: ViTConfig) -> tuple[nn.Module | None, nn.Module]:
    """The modules that turn pixels into patch vectors, as ``c.stem`` says: (stem or None, patch
    projection) for 2-D (Conv2d) or 1-D (Conv1d) inputs. ``patch``: one convolution of the patch's size
    and stride; ``conv``: two 3 x 3 convolutions at full resolution first; ``strided``: 3 x 3 stride-2
    convolutions (BatchNorm, GELU) halving each axis until a pixel is a patch, then a 1 x 1 projection."""
    conv = nn.Conv2d if len(c.size) == 2 else nn.Conv1d
    norm = nn.BatchNorm2d if len(c.size) == 2 else nn.BatchNorm1d
    channels, stem = c.channels, None
    if c.stem == "conv":
        width = c.dim // 2
        stem = nn.Sequential(conv(channels, width, 3, padding=1), nn.GELU(),
                             conv(width, width, 3, padding=1), nn.GELU())
        channels = width
    elif c.stem == "strided":
        layers, halvings = [], [p.bit_length() - 1 for p in c.patch]
        for i, width in enumerate(c.stem_widths()):
            stride = tuple(2 if i < h else 1 for h in halvings)
            layers += [conv(channels, width, 3, stride=stride, padding=1, bias=False), norm(width), nn.GELU()]
            channels = width
        stem = nn.Sequential(*layers)
    kernel = 1 if c.stem == "strided" else c.patch  # the strided stem leaves one pixel a patch
    return stem, conv(channels, c.dim, kernel_size=kernel, stride=kernel)


class VisionTransformer(Model):
    """Patch embedding, class token, learned positions (interpolated for other image sizes), pre-norm
    encoder, final norm; an optional classifier on the class token."""

    def __init__(self, config: ViTConfig):
        super().__init__()
        self.config = c = config
        self.stem, self.patch = patch_embedding(c)
        self.cls = nn.Parameter(torch.zeros(1, 1, c.dim)) if c.pool == "cls" else None
        n = 1
        for g in c.grid_shape:
            n *= g
        first = 1 if c.pool == "cls" else 0
        self.pos = nn.Parameter(torch.empty(1, n + first, c.dim).normal_(std=0.02)) if c.positions == "learned" else None
        self.rotary = RotaryEmbedding(c.dim // c.n_heads) if c.positions == "rotary" else None
        self.drop = nn.Dropout(c.dropout)
        self.encoder = TransformerEncoder(c.block(), c.n_layers, final_norm=True)
        self.pooler = Linear(c.dim, c.dim) if c.pooler else None
        self.classifier = Linear(c.dim, c.num_labels) if c.num_labels else None

    def positions(self, grid: tuple[int, ...]) -> torch.Tensor:
        """Position vectors (1, 1 + patches, C); the patch grid is resized (bicubic / linear) for other sizes."""
        stored = self.config.grid_shape
        if tuple(grid) == stored:
            return self.pos
        first = 1 if self.cls is not None else 0
        cls, patches = self.pos[:, :first], self.pos[:, first:]
        table = patches.reshape(1, *stored, -1).movedim(-1, 1)  # (1, C, *grid)
        mode = "bicubic" if len(stored) == 2 else "linear"
        table = F.interpolate(table, size=tuple(grid), mode=mode, align_corners=False)
        return torch.cat([cls, table.flatten(2).transpose(1, 2)], dim=1)

    def forward(self, pixel_values: torch.Tensor, return_weights: bool = False,
                return_hidden: bool = False) -> ModelOutput:
        """pixel_values (B, channels, H, W) or (B, channels, L), normalised -> ModelOutput(last_hidden_state
        (B, 1 + patches, C), logits)."""
        B = pixel_values.shape[0]
        x = pixel_values.to(self.patch.weight.dtype)
        if self.stem is not None:
            x = self.stem(x)
        x = self.patch(x)  # (B, C, *grid)
        grid = tuple(x.shape[2:])
        x = x.flatten(2).transpose(1, 2)  # (B, patches, C)
        if self.cls is not None:
            x = torch.cat([self.cls.expand(B, -1, -1), x], dim=1)
        if self.pos is not None:
            x = x + self.positions(grid)
        out = self.encoder(self.drop(x), rotary=self.rotary, return_weights=return_weights, return_hidden=return_hidden)
        h = out.hidden
        result = ModelOutput(h, attentions=out.attentions, hidden_states=out.hidden_states)
        summary = h[:, 0] if self.cls is not None else h.mean(1)
        if self.pooler is not None:
            result.pooled = torch.tanh(self.pooler(summary))
        if self.classifier is not None:
            result.logits = self.classifier(summary)
        return result

    def preprocess(self, images, size: int | None = None) -> torch.Tensor:
        """PIL images, (H, W, 3) uint8 arrays or image file paths -> normalised (N, 3, size, size);
        audio clips or signals for models trained on them (see `preprocess`)."""
        return preprocess(images, self.config, size)

    @torch.no_grad()
    def classify(self, images, top: int = 5) -> list[dict] | dict:
        """The ``top`` labels with probabilities for each image, clip or signal (one input gives one dict)."""
        if self.classifier is None:
            raise ValueError("classify() needs a classification head (num_labels > 0); this ViT has none")
        single = not isinstance(images, list) and not (isinstance(images, tuple) and self.config.input != "audio")
        x = self.preprocess([images] if single else list(images)).to(self.device)
        probs = self(x).logits.float().softmax(-1).cpu()
        names = self.config.labels or [str(i) for i in range(self.config.num_labels)]
        k = min(top, len(names))
        out = []
        for p in probs:
            val, idx = p.topk(k)
            out.append({"label": names[int(idx[0])], "score": float(val[0]),
                        "top": [(names[int(i)], float(v)) for v, i in zip(val, idx)]})
        return out[0] if single else out


def _load_image(image):
    from PIL import Image

    if isinstance(image, (str, Path)):
        with Image.open(image) as im:
            return im.convert("RGB")
    if isinstance(image, Image.Image):
        return image.convert("RGB")
    import numpy as np

    arr = np.asarray(image)
    if arr.ndim == 2:
        arr = np.stack([arr] * 3, axis=-1)
    if arr.ndim != 3 or arr.shape[-1] not in (3, 4):
        raise ValueError(f"image arrays must be (H, W, 3) or (H, W, 4), got shape {arr.shape}")
    if arr.dtype != np.uint8:
        if arr.max() <= 1.0:
            arr = arr * 255.0
        arr = np.clip(arr.round(), 0, 255).astype(np.uint8)
    return Image.fromarray(arr[..., :3])


def preprocess(images: Sequence, config: ViTConfig, size: int | None = None) -> torch.Tensor:
    """Model inputs for ``config.input``. Images: resize (PIL, the checkpoint's filter), scale to [0, 1],
    normalise (what ViTImageProcessor does); one channel reads them as grey. Audio (paths, arrays at
    16 kHz, or (array, rate) pairs): log-mel features of the configured bands and frames (10 ms each).
    Signals: arrays of the configured length."""
    if config.input == "audio":
        from .audio import HOP, SAMPLE_RATE, load_audio, log_mel

        bands, frames = config.size
        out = []
        for clip in images:
            wave = load_audio(*clip) if isinstance(clip, tuple) else load_audio(clip)
            out.append(log_mel(wave, n_mels=bands, samples=frames * HOP))
        return torch.stack(out)
    if config.input == "signal":
        out = []
        for x in images:
            x = torch.as_tensor(x, dtype=torch.float32)
            x = x[None] if x.dim() == 1 else x
            if tuple(x.shape) != (config.channels, *config.size):
                raise ValueError(f"signal of shape {tuple(x.shape)}; this model reads ({config.channels}, {config.size[0]})")
            out.append(x)
        return torch.stack(out)
    try:
        from PIL import Image
    except ImportError:
        raise ImportError("image input needs Pillow: pip install 'qkv[vision]' (or pip install pillow)") from None
    import numpy as np

    height, width = (size, size) if size else config.size
    filters = {"bilinear": Image.BILINEAR, "bicubic": Image.BICUBIC, "nearest": Image.NEAREST, "lanczos": Image.LANCZOS}
    channels = config.channels
    mean = torch.tensor(config.image_mean[:channels]).view(channels, 1, 1)
    std = torch.tensor(config.image_std[:channels]).view(channels, 1, 1)
    out = []
    for image in images:
        im = _load_image(image)
        im = (im.convert("L") if channels == 1 else im).resize((width, height), filters[config.resample])
        x = torch.from_numpy(np.asarray(im, dtype=np.float32).reshape(height, width, channels) / 255.0)
        out.append((x.permute(2, 0, 1) - mean) / std)
    return torch.stack(out)
