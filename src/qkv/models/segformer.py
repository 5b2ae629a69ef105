"""Semantic segmentation with SegFormer (Xie et al., arXiv:2105.15203): a hierarchical transformer encoder
(Mix Transformer) and an all-MLP decode head.

Each stage embeds its input with an overlapping strided convolution (kernel wider than the stride), runs
pre-norm blocks of efficient self-attention, whose keys and values come from a spatially reduced copy of
the tokens (a ``sr``-strided convolution, PVT arXiv:2102.12122), and a Mix-FFN (a depthwise 3 x 3
convolution between the two projections gives position information: no position table, any image size),
then hands its feature map to the next stage. The head projects every stage's map to one width,
upsamples them to the first (1/4 resolution), fuses them (1 x 1 conv, BatchNorm, ReLU) and classifies
each pixel.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import ClassVar

import torch
import torch.nn.functional as F
from torch import nn

from ..functional import prepare, run
from ..nn import Linear, MultiHeadAttention
from ..nn.linear import fast_linear
from ..nn.feedforward import ACTIVATIONS
from . import _checks
from ._base import Model, ModelOutput
from .vision import _load_image, preprocess

IMAGENET_MEAN = [0.485, 0.456, 0.406]
IMAGENET_STD = [0.229, 0.224, 0.225]
_STAGE_LISTS = ("dims", "depths", "n_heads", "patch_sizes", "strides", "sr_ratios", "mlp_ratios")


@dataclass
class SegformerConfig:
    """Defaults are MiT-b0 with a 150-class (ADE20k) head at 512 x 512, as transformers' SegformerConfig.
    Every list holds one value per stage. ``num_labels=0``: the encoder alone (SegformerModel)."""

    channels: int = 3
    dims: list[int] = field(default_factory=lambda: [32, 64, 160, 256])  # stage widths
    depths: list[int] = field(default_factory=lambda: [2, 2, 2, 2])  # blocks per stage
    n_heads: list[int] = field(default_factory=lambda: [1, 2, 5, 8])
    patch_sizes: list[int] = field(default_factory=lambda: [7, 3, 3, 3])  # patch-embedding kernels (padding k // 2)
    strides: list[int] = field(default_factory=lambda: [4, 2, 2, 2])  # patch-embedding strides
    sr_ratios: list[int] = field(default_factory=lambda: [8, 4, 2, 1])  # keys/values from an sr x sr-strided conv
    mlp_ratios: list[float] = field(default_factory=lambda: [4, 4, 4, 4])  # Mix-FFN width = int(dim * ratio)
    activation: str = "gelu"
    norm_eps: float = 1e-5  # every LayerNorm (transformers' SegFormer never reads its layer_norm_eps)
    decoder_dim: int = 256  # the decode head's common width
    num_labels: int = 150
    labels: list[str] | None = None
    ignore_index: int = 255  # label value the loss skips
    dropout: float = 0.0  # after attention and inside the Mix-FFN
    attn_dropout: float = 0.0
    drop_path: float = 0.0  # stochastic depth (arXiv:1603.09382), rising linearly to this over all blocks
    head_dropout: float = 0.1  # before the pixel classifier
    # preprocessing for segment() (as SegformerImageProcessor does it)
    image_size: list[int] = field(default_factory=lambda: [512, 512])  # [height, width] images are resized to
    image_mean: list[float] = field(default_factory=lambda: list(IMAGENET_MEAN))
    image_std: list[float] = field(default_factory=lambda: list(IMAGENET_STD))
    resample: str = "bilinear"
    input: ClassVar[str] = "image"  # what `vision.preprocess` reads

    def __post_init__(self):
        _checks.check_types(self)
        _checks.sizes(self, "channels", "dims", "n_heads", "patch_sizes", "strides", "sr_ratios", "decoder_dim",
                      "image_size")
        _checks.sizes(self, "num_labels", lo=0)
        _checks.layers(self, "depths")
        _checks.positive(self, "mlp_ratios", "norm_eps", "image_std")
        _checks.fractions(self, "dropout", "attn_dropout", "drop_path", "head_dropout")
        _checks.choices(self, activation=tuple(ACTIVATIONS),
                        resample=("bilinear", "bicubic", "nearest", "lanczos"))
        n = len(self.dims)
        if not n or any(len(getattr(self, name)) != n for name in _STAGE_LISTS):
            said = ", ".join(f"{name}={getattr(self, name)}" for name in _STAGE_LISTS)
            raise ValueError(f"SegformerConfig: {said} must each hold one value per stage (the same length, >= 1)")
        for i, (d, h, r) in enumerate(zip(self.dims, self.n_heads, self.mlp_ratios)):
            if d % h:
                raise ValueError(f"SegformerConfig: stage {i}: dims[{i}]={d} is not divisible by n_heads[{i}]={h}; "
                                 f"choose a divisor of {d}")
            if int(d * r) < 1:
                raise ValueError(f"SegformerConfig: stage {i}: mlp_ratios[{i}]={r} gives a Mix-FFN of width 0")
        if len(self.image_size) != 2:
            raise ValueError(f"SegformerConfig: image_size={self.image_size} must be [height, width]")
        if min(len(self.image_mean), len(self.image_std)) < self.channels:
            raise ValueError(f"SegformerConfig: image_mean={self.image_mean} and image_std={self.image_std} need a "
                             f"value per channel (channels={self.channels})")
        _checks.labels(self)
        _checks.budget(self, self.parameter_estimate(), ("dims", "depths", "sr_ratios", "decoder_dim", "num_labels"))

    @property
    def n_stages(self) -> int:
        return len(self.dims)

    @property
    def size(self) -> tuple[int, int]:
        """(height, width) of preprocessed images."""
        return tuple(self.image_size)

    def ffn_dim(self, stage: int) -> int:
        return int(self.dims[stage] * self.mlp_ratios[stage])

    def parameter_estimate(self) -> int:
        """About how many parameters a model of this config holds (computed, nothing allocated)."""
        total, c_in = 0, self.channels
        for i, d in enumerate(self.dims):
            h, sr = self.ffn_dim(i), self.sr_ratios[i]
            block = 4 * d * d + (d * d * sr * sr if sr > 1 else 0) + 2 * d * h + 9 * h + 12 * d
            total += c_in * self.patch_sizes[i] ** 2 * d + self.depths[i] * block
            c_in = d
        if self.num_labels:
            dd = self.decoder_dim
            total += sum(self.dims) * dd + self.n_stages * dd * dd + dd * (self.num_labels + 5)
        return total


class ReducedAttention(MultiHeadAttention):
    """Efficient self-attention: queries from every token, keys and values from the tokens reduced by an
    ``sr`` x ``sr``-strided convolution and a LayerNorm (none when ``sr == 1``). Self-attention for
    `qkv.explain` (``is_cross`` False), with weights (B, H, N, N / sr^2)."""

    def __init__(self, dim: int, n_heads: int, sr: int, *, norm_eps: float, dropout: float):
        super().__init__(dim, n_heads, kv_dim=dim, dropout=dropout)  # separate q and fused kv projections
        self.is_cross = False
        self.sr = nn.Conv2d(dim, dim, kernel_size=sr, stride=sr) if sr > 1 else None
        self.sr_norm = nn.LayerNorm(dim, eps=norm_eps) if sr > 1 else None

    def forward(self, x: torch.Tensor, grid: tuple[int, int], return_weights: bool = False):
        """x (B, N, C) with N = h * w of ``grid`` -> (out (B, N, C), weights or None)."""
        B, N, C = x.shape
        context = x
        if self.sr is not None:
            image = x.transpose(1, 2).reshape(B, C, *grid)  # (B, C, h, w)
            context = self.sr_norm(self.sr(image).flatten(2).transpose(1, 2))  # (B, N / sr^2, C)
        q = self._heads(self.q(x), self.n_heads)  # (B, H, N, D)
        k, v = self.kv(context).split(C, dim=-1)
        k, v = self._heads(k, self.n_heads), self._heads(v, self.n_heads)  # (B, H, N', D)
        call = prepare(q, k, v, dropout_p=self.dropout if self.training else 0.0, return_weights=return_weights)
        if self.observer is not None:
            self.observer(self, call)
        result = run(call, self.backend)
        out, weights = result if return_weights else (result, None)
        return self.o(out.transpose(1, 2).reshape(B, N, C)), weights  # (B, N, C)


class MixFFN(nn.Module):
    """``down(drop(act(conv(up(x)))))``: a depthwise 3 x 3 convolution over the token grid between the two
    projections."""

    def __init__(self, dim: int, hidden: int, activation: str, dropout: float):
        super().__init__()
        self.up = Linear(dim, hidden)
        self.conv = nn.Conv2d(hidden, hidden, 3, padding=1, groups=hidden)
        self.act = ACTIVATIONS[activation]
        self.down = Linear(hidden, dim)
        self.drop = nn.Dropout(dropout)

    def forward(self, x: torch.Tensor, grid: tuple[int, int]) -> torch.Tensor:
        h = self.up(x)
        B, N, H = h.shape
        h = self.conv(h.transpose(1, 2).reshape(B, H, *grid)).flatten(2).transpose(1, 2)  # (B, N, hidden)
        return self.drop(self.down(self.drop(self.act(h))))


def drop_path(x: torch.Tensor, p: float, training: bool) -> torch.Tensor:
    """Stochastic depth: zero the branch of a random ``p`` of the batch rows, scale the rest by 1 / (1 - p)."""
    if p == 0.0 or not training:
        return x
    keep = torch.rand(x.shape[0], *(1,) * (x.dim() - 1), device=x.device) >= p
    return x * keep.to(x.dtype) / (1 - p)


class Block(nn.Module):
    """Pre-norm: x + attn(norm(x)), then x + mix_ffn(norm(x)); each branch under stochastic depth."""

    def __init__(self, c: SegformerConfig, stage: int, drop: float):
        super().__init__()
        d = c.dims[stage]
        self.attn_norm = nn.LayerNorm(d, eps=c.norm_eps)
        self.attn = ReducedAttention(d, c.n_heads[stage], c.sr_ratios[stage], norm_eps=c.norm_eps,
                                     dropout=c.attn_dropout)
        self.ffn_norm = nn.LayerNorm(d, eps=c.norm_eps)
        self.ffn = MixFFN(d, c.ffn_dim(stage), c.activation, c.dropout)
        self.drop = nn.Dropout(c.dropout)
        self.drop_path = drop

    def forward(self, x: torch.Tensor, grid: tuple[int, int], return_weights: bool = False):
        y, w = self.attn(self.attn_norm(x), grid, return_weights)
        x = x + drop_path(self.drop(y), self.drop_path, self.training)
        x = x + drop_path(self.ffn(self.ffn_norm(x), grid), self.drop_path, self.training)
        return x, w


class Stage(nn.Module):
    """Overlapping patch embedding (conv, LayerNorm), blocks, LayerNorm: (B, C_in, H, W) -> (B, C, h, w)."""

    def __init__(self, c: SegformerConfig, stage: int, drops: list[float]):
        super().__init__()
        k, c_in = c.patch_sizes[stage], c.channels if stage == 0 else c.dims[stage - 1]
        self.patch = nn.Conv2d(c_in, c.dims[stage], kernel_size=k, stride=c.strides[stage], padding=k // 2)
        self.patch_norm = nn.LayerNorm(c.dims[stage], eps=c.norm_eps)
        self.layers = nn.ModuleList(Block(c, stage, p) for p in drops)
        self.norm = nn.LayerNorm(c.dims[stage], eps=c.norm_eps)

    def forward(self, x: torch.Tensor, attentions: list | None = None) -> torch.Tensor:
        x = self.patch(x)  # (B, C, h, w)
        B, C, h, w = x.shape
        x = self.patch_norm(x.flatten(2).transpose(1, 2))  # (B, N, C)
        for layer in self.layers:
            x, weights = layer(x, (h, w), attentions is not None)
            if attentions is not None:
                attentions.append(weights)
        return self.norm(x).transpose(1, 2).reshape(B, C, h, w)  # (B, C, h, w)


class DecodeHead(nn.Module):
    """All-MLP head: each stage map projected to ``decoder_dim`` and upsampled (bilinear) to the first
    map's size; concatenated last stage first, fused by a 1 x 1 conv, BatchNorm and ReLU; a 1 x 1 conv
    classifies each pixel.

    Computed in an equal, cheaper order: the fuse conv's block for a stage is a per-pixel linear map, as is
    the projection, and both commute with the (spatial) upsampling, so each stage map goes through their
    product (C_i -> decoder_dim) at its own resolution and the upsampled results are summed. That skips the
    fuse conv over the 4 * decoder_dim concatenated channels at 1/4 resolution, most of SegFormer-B0's
    work. In eval mode the BatchNorm (an affine map per channel) is folded into the same products."""

    def __init__(self, c: SegformerConfig):
        super().__init__()
        self.proj = nn.ModuleList(Linear(d, c.decoder_dim) for d in c.dims)
        self.fuse = nn.Conv2d(c.decoder_dim * c.n_stages, c.decoder_dim, 1, bias=False)
        self.norm = nn.BatchNorm2d(c.decoder_dim)
        self.drop = nn.Dropout(c.head_dropout)
        self.classifier = nn.Conv2d(c.decoder_dim, c.num_labels, 1)

    def stage_maps(self) -> tuple[list[tuple[torch.Tensor, torch.Tensor]], bool]:
        """Per stage, (weight (decoder_dim, C_i), bias (decoder_dim,)) of fuse-block @ projection (BatchNorm
        folded in when it uses its running statistics), and whether it was."""
        n, dd = len(self.proj), self.fuse.out_channels
        fuse = self.fuse.weight.view(dd, n, dd)  # (out, stage block, in); blocks are last stage first
        bn = self.norm
        folded = not bn.training and bn.running_mean is not None
        if folded:
            scale = torch.rsqrt(bn.running_var + bn.eps)
            scale = scale * bn.weight if bn.weight is not None else scale
            shift = -bn.running_mean * scale + (bn.bias if bn.bias is not None else 0.0)
        out = []
        for i, proj in enumerate(self.proj):
            f = fuse[:, n - 1 - i]  # (dd, dd)
            w, b = f @ proj.weight, f @ proj.bias
            if folded:
                w, b = w * scale[:, None], b * scale + (shift if i == 0 else 0.0)  # stage 0 is never resized
            out.append((w, b))
        return out, folded

    def forward(self, maps: list[torch.Tensor]) -> torch.Tensor:
        """Stage maps (B, C_i, h_i, w_i) -> logits (B, num_labels, h_0, w_0)."""
        B, _, H, W = maps[0].shape
        linear = F.linear if torch.is_grad_enabled() else fast_linear
        products, folded = self.stage_maps()
        x = None
        for (weight, bias), m in zip(products, maps):
            h, w = m.shape[2:]
            y = linear(m.flatten(2).transpose(1, 2), weight, bias)  # (B, h * w, decoder_dim)
            y = y.view(B, h, w, -1).permute(0, 3, 1, 2)  # (B, decoder_dim, h, w), channels-last in memory
            if (h, w) != (H, W):
                y = F.interpolate(y, size=(H, W), mode="bilinear", align_corners=False)
            x = y if x is None else x.add_(y)  # in place: a fresh map of this size costs more than the sum
        x = self.drop(F.relu(x if folded else self.norm(x), inplace=True))  # (B, decoder_dim, H, W)
        k = self.classifier.weight.shape[0]
        logits = torch.matmul(self.classifier.weight.view(k, -1), x.flatten(2))  # (B, num_labels, H * W)
        return logits.add_(self.classifier.bias[:, None]).view(B, k, H, W)


@dataclass
class SegmentationOutput(ModelOutput):
    """`ModelOutput` plus ``loss`` (with labels). ``last_hidden_state`` is the last stage's map (B, C, h, w);
    ``hidden_states`` the map of every stage; ``attentions`` one (B, H, N, N') per block;
    ``logits`` (B, num_labels, H / 4, W / 4) for the default strides."""

    loss: torch.Tensor | None = None


class SemanticSegmenter(Model):
    """SegFormer: the hierarchical encoder and, with ``num_labels > 0``, the all-MLP decode head."""

    def __init__(self, config: SegformerConfig):
        super().__init__()
        self.config = c = config
        total = sum(c.depths)
        rates = [c.drop_path * i / max(total - 1, 1) for i in range(total)]  # linear over all blocks
        starts = [sum(c.depths[:i]) for i in range(c.n_stages)]
        self.stages = nn.ModuleList(Stage(c, i, rates[s:s + c.depths[i]]) for i, s in enumerate(starts))
        self.head = DecodeHead(c) if c.num_labels else None

    def forward(self, pixel_values: torch.Tensor, labels: torch.Tensor | None = None, return_weights: bool = False,
                return_hidden: bool = False) -> SegmentationOutput:
        """pixel_values (B, channels, H, W), normalised; labels (B, H', W') class ids (any size: the logits
        are upsampled to it) -> SegmentationOutput(last_hidden_state, logits, loss)."""
        if not isinstance(pixel_values, torch.Tensor) or pixel_values.dim() != 4:
            shape = tuple(pixel_values.shape) if isinstance(pixel_values, torch.Tensor) else type(pixel_values)
            raise ValueError(f"pixel_values must be a (B, channels, H, W) tensor, got {shape}")
        if pixel_values.shape[1] != self.config.channels:
            raise ValueError(f"pixel_values has {pixel_values.shape[1]} channels; this model reads "
                             f"channels={self.config.channels}")
        x = pixel_values.to(self.stages[0].patch.weight.dtype)
        attentions = [] if return_weights else None
        maps = []
        for stage in self.stages:
            x = stage(x, attentions)
            maps.append(x)
        out = SegmentationOutput(x, attentions=attentions, hidden_states=maps if return_hidden else None)
        if self.head is not None:
            out.logits = self.head(maps)
        if labels is not None:
            out.loss = self.loss(out.logits, labels)
        return out

    def loss(self, logits: torch.Tensor | None, labels: torch.Tensor) -> torch.Tensor:
        """Cross-entropy of ``logits`` upsampled (bilinear) to ``labels`` (B, H, W), skipping
        ``ignore_index``; one class: binary cross-entropy averaged over all pixels, invalid ones counted as 0."""
        if logits is None:
            raise ValueError("labels need a decode head (num_labels > 0); this SegFormer is the encoder alone")
        if not isinstance(labels, torch.Tensor) or labels.dim() != 3 or labels.shape[0] != logits.shape[0]:
            shape = tuple(labels.shape) if isinstance(labels, torch.Tensor) else type(labels)
            raise ValueError(f"labels must be a (B, H, W) tensor of class ids with B={logits.shape[0]}, got {shape}")
        up = F.interpolate(logits, size=labels.shape[-2:], mode="bilinear", align_corners=False)
        ignore = self.config.ignore_index
        if self.config.num_labels > 1:
            return F.cross_entropy(up, labels.long(), ignore_index=ignore)
        valid = ((labels >= 0) & (labels != ignore)).to(up.dtype)
        bce = F.binary_cross_entropy_with_logits(up[:, 0], labels.to(up.dtype), reduction="none")
        return (bce * valid).mean()

    def preprocess(self, images) -> torch.Tensor:
        """PIL images, (H, W, 3) arrays or image paths -> normalised (N, channels, *image_size)."""
        return preprocess(images, self.config)

    @torch.no_grad()
    def segment(self, images, batch_size: int = 8) -> list[torch.Tensor] | torch.Tensor:
        """A class map (H, W) of int64 ids per image, at that image's own size: the logits upsampled
        (bilinear) to it, then the arg-max class. One image (not a list) gives one map."""
        if self.head is None:
            raise ValueError("segment() needs a decode head (num_labels > 0); this SegFormer is the encoder alone")
        if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
            raise ValueError(f"batch_size={batch_size!r} must be an integer >= 1")
        single = not isinstance(images, (list, tuple))
        loaded = [_load_image(im) for im in ([images] if single else images)]
        maps = []
        for i in range(0, len(loaded), batch_size):
            chunk = loaded[i:i + batch_size]
            logits = self(self.preprocess(chunk).to(self.device)).logits
            for im, lg in zip(chunk, logits):
                up = F.interpolate(lg[None], size=(im.height, im.width), mode="bilinear", align_corners=False)
                maps.append(up[0].argmax(0).cpu())
        return maps[0] if single else maps
