"""The vision transformer family (ViT, Dosovitskiy et al., arXiv:2010.11929): image patches as tokens."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from ..nn import BlockConfig, Linear, TransformerEncoder
from ._base import Model, ModelOutput


@dataclass
class ViTConfig:
    """Defaults are ViT-Base/16 at 224 x 224."""

    image_size: int = 224
    patch_size: int = 16
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

    def __post_init__(self):
        if self.image_size % self.patch_size:
            raise ValueError(f"image_size={self.image_size} is not a multiple of patch_size={self.patch_size}")
        if self.labels is not None and len(self.labels) != self.num_labels:
            raise ValueError(f"labels has {len(self.labels)} names but num_labels={self.num_labels}")

    @property
    def grid(self) -> int:
        return self.image_size // self.patch_size

    def block(self) -> BlockConfig:
        return BlockConfig(dim=self.dim, n_heads=self.n_heads, ffn_dim=self.ffn_dim, activation=self.activation,
                           norm="layer", norm_eps=self.norm_eps, prenorm=True, bias=True, qkv_bias=self.qkv_bias,
                           dropout=self.dropout, attn_dropout=self.attn_dropout)


class VisionTransformer(Model):
    """Patch embedding, class token, learned positions (interpolated for other image sizes), pre-norm
    encoder, final norm; an optional classifier on the class token."""

    def __init__(self, config: ViTConfig):
        super().__init__()
        self.config = c = config
        self.patch = nn.Conv2d(c.channels, c.dim, kernel_size=c.patch_size, stride=c.patch_size)
        self.cls = nn.Parameter(torch.zeros(1, 1, c.dim))
        self.pos = nn.Parameter(torch.empty(1, c.grid * c.grid + 1, c.dim).normal_(std=0.02))
        self.drop = nn.Dropout(c.dropout)
        self.encoder = TransformerEncoder(c.block(), c.n_layers, final_norm=True)
        self.pooler = Linear(c.dim, c.dim) if c.pooler else None
        self.classifier = Linear(c.dim, c.num_labels) if c.num_labels else None

    def positions(self, grid_h: int, grid_w: int) -> torch.Tensor:
        """Position vectors (1, 1 + gh*gw, C); the patch grid is bicubically resized for other image sizes."""
        g = self.config.grid
        if (grid_h, grid_w) == (g, g):
            return self.pos
        cls, patches = self.pos[:, :1], self.pos[:, 1:]
        grid = patches.reshape(1, g, g, -1).permute(0, 3, 1, 2)  # (1, C, g, g)
        grid = F.interpolate(grid, size=(grid_h, grid_w), mode="bicubic", align_corners=False)
        return torch.cat([cls, grid.permute(0, 2, 3, 1).reshape(1, grid_h * grid_w, -1)], dim=1)

    def forward(self, pixel_values: torch.Tensor, return_weights: bool = False,
                return_hidden: bool = False) -> ModelOutput:
        """pixel_values (B, 3, H, W), normalised -> ModelOutput(last_hidden_state (B, 1 + patches, C), logits)."""
        B = pixel_values.shape[0]
        x = self.patch(pixel_values.to(self.patch.weight.dtype))  # (B, C, gh, gw)
        gh, gw = x.shape[-2:]
        x = x.flatten(2).transpose(1, 2)  # (B, gh*gw, C)
        x = torch.cat([self.cls.expand(B, -1, -1), x], dim=1) + self.positions(gh, gw)
        out = self.encoder(self.drop(x), return_weights=return_weights, return_hidden=return_hidden)
        h = out.hidden
        result = ModelOutput(h, attentions=out.attentions, hidden_states=out.hidden_states)
        if self.pooler is not None:
            result.pooled = torch.tanh(self.pooler(h[:, 0]))
        if self.classifier is not None:
            result.logits = self.classifier(h[:, 0])
        return result

    def preprocess(self, images, size: int | None = None) -> torch.Tensor:
        """PIL images, (H, W, 3) uint8 arrays or image file paths -> normalised (N, 3, size, size)."""
        return preprocess(images, self.config, size)

    @torch.no_grad()
    def classify(self, images, top: int = 5) -> list[dict] | dict:
        """The ``top`` labels with probabilities for each image (one image gives one dict)."""
        if self.classifier is None:
            raise ValueError("classify() needs a classification head (num_labels > 0); this ViT has none")
        single = not isinstance(images, (list, tuple))
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
    """Resize (PIL, the checkpoint's filter), scale to [0, 1], normalise: what ViTImageProcessor does."""
    try:
        from PIL import Image
    except ImportError:
        raise ImportError("image input needs Pillow: pip install 'qkv[vision]' (or pip install pillow)") from None
    import numpy as np

    size = size or config.image_size
    filters = {"bilinear": Image.BILINEAR, "bicubic": Image.BICUBIC, "nearest": Image.NEAREST, "lanczos": Image.LANCZOS}
    out = []
    for image in images:
        im = _load_image(image).resize((size, size), filters[config.resample])
        x = torch.from_numpy(np.asarray(im, dtype=np.float32) / 255.0).permute(2, 0, 1)
        mean = torch.tensor(config.image_mean).view(3, 1, 1)
        std = torch.tensor(config.image_std).view(3, 1, 1)
        out.append((x - mean) / std)
    return torch.stack(out)
