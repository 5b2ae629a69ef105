"""Positional information: rotary, sinusoidal, learned, ALiBi slopes, T5 relative buckets."""

from __future__ import annotations

import math

import torch
from torch import nn


class RotaryEmbedding(nn.Module):
    """Rotary position embedding (RoFormer, arXiv:2104.09864).

    Rotates the first ``dim`` features of each query and key head by angles
    ``position * base**(-2i/dim)``. ``interleaved=False`` pairs feature ``i``
    with ``i + dim/2`` (GPT-NeoX / Llama "half-split" layout); ``interleaved=True``
    pairs ``2i`` with ``2i+1`` (GPT-J / original layout). ``scaling`` divides
    positions (linear position interpolation, arXiv:2306.15595). ``llama3``
    ``(factor, low_freq_factor, high_freq_factor, original_max_positions)``
    rescales the frequencies as Llama 3.1 does (see `llama3_frequencies`).
    """

    def __init__(self, dim: int, base: float = 10000.0, interleaved: bool = False, scaling: float = 1.0,
                 llama3: tuple[float, float, float, int] | None = None):
        super().__init__()
        if dim <= 0 or dim % 2:
            raise ValueError(f"rotary dim must be a positive even number, got {dim}")
        self.dim = dim
        self.base = base
        self.interleaved = interleaved
        self.scaling = scaling
        self.llama3 = llama3
        inv_freq = 1.0 / (base ** (torch.arange(0, dim, 2, dtype=torch.int64).float() / dim))
        if llama3 is not None:
            inv_freq = llama3_frequencies(inv_freq, *llama3)
        self.register_buffer("inv_freq", inv_freq / scaling, persistent=False)

    def angles(self, positions: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """cos and sin, (..., T, dim) in float32, for integer positions (..., T)."""
        freqs = positions.float()[..., None] * self.inv_freq  # (..., T, dim/2)
        if self.interleaved:
            emb = freqs.repeat_interleave(2, dim=-1)
        else:
            emb = torch.cat((freqs, freqs), dim=-1)
        return emb.cos(), emb.sin()

    def rotate(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        """Rotate x (B, H, T, head_dim) with cos/sin broadcastable to (B, 1, T, dim)."""
        d = self.dim
        xr, rest = (x, None) if d == x.shape[-1] else (x[..., :d], x[..., d:])
        if self.interleaved:
            pairs = xr.unflatten(-1, (d // 2, 2))
            turned = torch.stack((-pairs[..., 1], pairs[..., 0]), dim=-1).flatten(-2)
        else:
            half = d // 2
            turned = torch.cat((-xr[..., half:], xr[..., :half]), dim=-1)
        out = xr * cos.to(x.dtype) + turned * sin.to(x.dtype)
        return out if rest is None else torch.cat((out, rest), dim=-1)

    def forward(self, q: torch.Tensor, k: torch.Tensor, positions: torch.Tensor):
        """Rotate q (B, Hq, T, D) and k (B, Hkv, T, D) at positions (B, T) or (T,)."""
        cos, sin = self.angles(positions)
        if cos.dim() == 2:
            cos, sin = cos[None], sin[None]
        cos, sin = cos[:, None], sin[:, None]  # (B, 1, T, dim)
        return self.rotate(q, cos, sin), self.rotate(k, cos, sin)

    def extra_repr(self) -> str:
        return (f"dim={self.dim}, base={self.base}, interleaved={self.interleaved}"
                + (f", scaling={self.scaling}" if self.scaling != 1.0 else "")
                + (f", llama3={self.llama3}" if self.llama3 is not None else ""))


def llama3_frequencies(inv_freq: torch.Tensor, factor: float, low_freq_factor: float, high_freq_factor: float,
                       original_max_positions: int) -> torch.Tensor:
    """Llama 3.1's frequency rescaling (arXiv:2407.21783): wavelengths shorter than
    ``original_max_positions / high_freq_factor`` are kept, longer than ``original / low_freq_factor``
    divided by ``factor``, and those between interpolated smoothly. The same float32 operations, in the
    same order, as transformers' ``_compute_llama3_parameters``."""
    low_freq_wavelen = original_max_positions / low_freq_factor
    high_freq_wavelen = original_max_positions / high_freq_factor
    wavelen = 2 * math.pi / inv_freq
    scaled = torch.where(wavelen > low_freq_wavelen, inv_freq / factor, inv_freq)
    smooth = (original_max_positions / wavelen - low_freq_factor) / (high_freq_factor - low_freq_factor)
    smoothed = (1 - smooth) * scaled / factor + smooth * scaled
    medium = ~(wavelen < high_freq_wavelen) * ~(wavelen > low_freq_wavelen)
    return torch.where(medium, smoothed, scaled)


class SinusoidalPositions(nn.Module):
    """Fixed sinusoidal positions (Vaswani et al., arXiv:1706.03762) added to embeddings.

    ``layout="interleaved"``: sin on even features, cos on odd (the paper);
    ``"concat"``: all sines then all cosines (tensor2tensor, Whisper).
    """

    def __init__(self, dim: int, max_positions: int = 8192, base: float = 10000.0, layout: str = "interleaved"):
        super().__init__()
        if layout not in ("interleaved", "concat"):
            raise ValueError(f"layout={layout!r} must be 'interleaved' or 'concat'")
        half = dim // 2
        pos = torch.arange(max_positions, dtype=torch.float64)[:, None]
        if layout == "concat":
            inv = torch.exp(-math.log(base) / max(half - 1, 1) * torch.arange(half, dtype=torch.float64))
            table = torch.cat((torch.sin(pos * inv), torch.cos(pos * inv)), dim=1)
        else:
            inv = torch.exp(-math.log(base) * torch.arange(0, dim, 2, dtype=torch.float64) / dim)
            table = torch.zeros(max_positions, dim, dtype=torch.float64)
            table[:, 0::2] = torch.sin(pos * inv)
            table[:, 1::2] = torch.cos(pos * inv[: dim // 2])
        self.register_buffer("table", table.float(), persistent=False)

    def forward(self, positions: torch.Tensor) -> torch.Tensor:
        """Position vectors (..., dim) for integer positions (...)."""
        return self.table[positions]


class LearnedPositions(nn.Module):
    """A learned table of position vectors; ``offset`` shifts indices (BART stores positions from 2)."""

    def __init__(self, max_positions: int, dim: int, offset: int = 0):
        super().__init__()
        self.offset = offset
        self.weight = nn.Parameter(torch.empty(max_positions + offset, dim).normal_(std=0.02))

    def forward(self, positions: torch.Tensor) -> torch.Tensor:
        limit = self.weight.shape[0] - self.offset
        if positions.numel() and int(positions.max()) >= limit:
            raise ValueError(f"position {int(positions.max())} is beyond the {limit} learned positions of this model")
        return nn.functional.embedding(positions + self.offset, self.weight)


def alibi_slopes(n_heads: int) -> torch.Tensor:
    """Per-head ALiBi slopes (Press et al., arXiv:2108.12409): a geometric sequence, interleaved
    for head counts that are not powers of two (as BLOOM and MPT do)."""
    def powers(n):
        start = 2 ** (-(2 ** -(math.log2(n) - 3)))
        return [start**i for i in range(1, n + 1)]

    if n_heads <= 0:
        raise ValueError(f"n_heads must be positive, got {n_heads}")
    closest = 2 ** math.floor(math.log2(n_heads))
    slopes = powers(closest)
    if closest < n_heads:
        slopes += powers(2 * closest)[0::2][: n_heads - closest]
    return torch.tensor(slopes)


class RelativePositionBias(nn.Module):
    """T5's bucketed relative position bias (Raffel et al., arXiv:1910.10683): one learned scalar
    per head and bucket of ``k_pos - q_pos``, exact for small distances, log-spaced up to ``max_distance``."""

    def __init__(self, n_heads: int, num_buckets: int = 32, max_distance: int = 128, bidirectional: bool = True):
        super().__init__()
        self.num_buckets = num_buckets
        self.max_distance = max_distance
        self.bidirectional = bidirectional
        self.embedding = nn.Embedding(num_buckets, n_heads)

    def bucket(self, relative: torch.Tensor) -> torch.Tensor:
        n = self.num_buckets
        out = torch.zeros_like(relative)
        if self.bidirectional:
            n //= 2
            out += (relative > 0).long() * n
            relative = relative.abs()
        else:
            relative = -torch.clamp(relative, max=0)
        exact = n // 2
        large = exact + (
            torch.log(relative.float() / exact) / math.log(self.max_distance / exact) * (n - exact)
        ).long()
        large = torch.clamp(large, max=n - 1)
        return out + torch.where(relative < exact, relative, large)

    def forward(self, tq: int, tk: int, q_offset: int | None = None, device=None) -> torch.Tensor:
        """The bias (1, H, tq, tk) for queries at ``q_offset + i`` (default ``tk - tq``) and keys ``0..tk-1``."""
        off = tk - tq if q_offset is None else q_offset
        device = self.embedding.weight.device if device is None else device
        q = torch.arange(tq, device=device)[:, None] + off
        k = torch.arange(tk, device=device)[None, :]
        values = self.embedding(self.bucket(k - q))  # (tq, tk, H)
        return values.permute(2, 0, 1)[None]
