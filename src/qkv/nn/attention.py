"""Multi-head attention and the key/value cache. The math is `qkv.attention`; this only projects and reshapes."""

from __future__ import annotations

import torch
from torch import nn

from .. import scores
from ..functional import prepare, run
from .linear import Linear
from .norms import make_norm
from .positions import RotaryEmbedding


class KVCache:
    """Keys and values kept across decoding steps, in preallocated buffers.

    One (B, Hkv, capacity, D) buffer pair per layer; each step writes its new
    keys in place (no concatenation, so a step costs O(new tokens)), and the
    capacity doubles when exceeded. ``length`` counts the positions stored; the
    model advances it once per forward pass, after every layer has appended.
    Cross-attention keys and values (computed once from the encoder output)
    live in ``cross``.
    """

    def __init__(self, n_layers: int, capacity: int = 256):
        self.n_layers = n_layers
        self.capacity = max(1, capacity)
        self.length = 0
        self.keys: list[torch.Tensor | None] = [None] * n_layers
        self.values: list[torch.Tensor | None] = [None] * n_layers
        self.cross: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}
        self.state: dict[str, torch.Tensor] = {}  # other per-sequence state a model carries between steps

    def append(self, layer: int, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Store k, v (B, Hkv, T, D) after the cached positions; return all keys and values so far."""
        end = self.length + k.shape[2]
        buf_k, buf_v = self.keys[layer], self.values[layer]
        if buf_k is None or buf_k.shape[2] < end or buf_k.shape[0] != k.shape[0]:
            cap = max(self.capacity, 1)
            while cap < end:
                cap *= 2
            new_k = k.new_empty(k.shape[0], k.shape[1], cap, k.shape[3])
            new_v = v.new_empty(v.shape[0], v.shape[1], cap, v.shape[3])
            if buf_k is not None and self.length:
                new_k[:, :, : self.length] = buf_k[:, :, : self.length]
                new_v[:, :, : self.length] = buf_v[:, :, : self.length]
            self.keys[layer], self.values[layer] = buf_k, buf_v = new_k, new_v
            self.capacity = cap
        buf_k[:, :, self.length : end] = k
        buf_v[:, :, self.length : end] = v
        return buf_k[:, :, :end], buf_v[:, :, :end]

    def advance(self, n: int) -> None:
        self.length += n

    def select(self, index: torch.Tensor) -> None:
        """Keep batch entries ``index`` (drop finished sequences, reorder beams): keys, values, the
        cross-attention keys and values and the batch-first ``state`` tensors."""
        for store in (self.keys, self.values):
            for i, t in enumerate(store):
                if t is not None:
                    store[i] = t.index_select(0, index)
        self.cross = {i: (k.index_select(0, index), v.index_select(0, index)) for i, (k, v) in self.cross.items()}
        self.state = {name: t.index_select(0, index) for name, t in self.state.items()}

    @property
    def batch_size(self) -> int:
        """Rows stored (0 before the first append)."""
        t = next((t for t in self.keys if t is not None), None)
        return 0 if t is None else t.shape[0]

    def nbytes(self) -> int:
        """Bytes held by the key/value buffers, capacity included (what freeing rows gives back)."""
        return sum(t.untyped_storage().nbytes() for store in (self.keys, self.values) for t in store if t is not None)

    def trim_left(self, n: int) -> None:
        """Drop the first ``n`` cached positions of every row (all-padding columns); views, no copy."""
        if not 0 <= n <= self.length:
            raise ValueError(f"trim_left: n={n} must be in [0, length={self.length}]")
        if n == 0:
            return
        for store in (self.keys, self.values):
            for i, t in enumerate(store):
                if t is not None:
                    store[i] = t[:, :, n:]
        self.length -= n
        self.capacity = max(1, self.capacity - n)

    def pad_left(self, n: int, capacity: int | None = None) -> None:
        """Insert ``n`` zero positions before the cached ones (left padding: mask them out); copies into
        fresh buffers of ``capacity`` positions (default: the new length plus the old spare room)."""
        if n < 0:
            raise ValueError(f"pad_left: n={n} must be >= 0")
        end = self.length + n
        cap = max(end, capacity if capacity is not None else self.capacity + n, 1)
        for store in (self.keys, self.values):
            for i, t in enumerate(store):
                if t is not None:
                    new = t.new_zeros(t.shape[0], t.shape[1], cap, t.shape[3])
                    new[:, :, n:end] = t[:, :, : self.length]
                    store[i] = new
        self.length, self.capacity = end, cap

    @classmethod
    def merge(cls, caches, capacity: int | None = None) -> KVCache:
        """One cache holding the rows of ``caches`` in order, each left-padded with zeros to the longest
        length (the caller masks the padding). ``capacity``: positions to allocate (default: the longest).
        ``state`` tensors (batch-first, same shape past the batch) and ``cross`` are concatenated."""
        caches = [c for c in caches if c.batch_size]
        if not caches:
            raise ValueError("merge: no cache holds any rows")
        n_layers = caches[0].n_layers
        if any(c.n_layers != n_layers for c in caches):
            raise ValueError(f"merge: caches have {[c.n_layers for c in caches]} layers; they must match")
        length = max(c.length for c in caches)
        cap = max(length, capacity or 0, 1)
        out = cls(n_layers, capacity=cap)
        out.length = length
        for name in ("keys", "values"):
            for i in range(n_layers):
                ts = [getattr(c, name)[i] for c in caches]
                if all(t is None for t in ts):
                    continue
                if any(t is None for t in ts):
                    raise ValueError(f"merge: layer {i} is cached in some caches and not in others")
                t0 = ts[0]
                buf = t0.new_zeros(sum(t.shape[0] for t in ts), t0.shape[1], cap, t0.shape[3])
                row = 0
                for c, t in zip(caches, ts):
                    buf[row : row + t.shape[0], :, length - c.length : length] = t[:, :, : c.length]
                    row += t.shape[0]
                getattr(out, name)[i] = buf
        for layer in caches[0].cross:
            pairs = [c.cross[layer] for c in caches]
            out.cross[layer] = (torch.cat([k for k, _ in pairs]), torch.cat([v for _, v in pairs]))
        for key in caches[0].state:
            out.state[key] = torch.cat([c.state[key] for c in caches])
        return out


class MultiHeadAttention(nn.Module):
    """Multi-head attention with grouped-query heads, optional q/k norm, rotary positions and a KV cache.

    Self-attention projects q, k, v with one fused `Linear` (one matrix product);
    cross-attention (``kv_dim`` given) projects q from the input and k, v from
    the context.
    """

    def __init__(self, dim: int, n_heads: int, n_kv_heads: int | None = None, head_dim: int | None = None, *,
                 bias: bool = True, out_bias: bool | None = None, kv_dim: int | None = None,
                 qk_norm: str | None = None, norm_eps: float = 1e-6, dropout: float = 0.0,
                 scale: float | None = None, softcap: float | None = None, norm_offset: float = 0.0):
        super().__init__()
        n_kv_heads = n_heads if n_kv_heads is None else n_kv_heads
        if n_heads <= 0 or n_kv_heads <= 0 or n_heads % n_kv_heads:
            raise ValueError(f"n_heads={n_heads} is not a positive multiple of n_kv_heads={n_kv_heads}; choose a divisor of {n_heads}")
        if head_dim is None:
            if dim % n_heads:
                raise ValueError(f"dim={dim} is not divisible by n_heads={n_heads}; pass head_dim explicitly")
            head_dim = dim // n_heads
        self.n_heads, self.n_kv_heads, self.head_dim = n_heads, n_kv_heads, head_dim
        self.is_cross = kv_dim is not None
        q_out, kv_out = n_heads * head_dim, n_kv_heads * head_dim
        if self.is_cross:
            self.q = Linear(dim, q_out, bias=bias)
            self.kv = Linear(kv_dim, 2 * kv_out, bias=bias)
        else:
            self.qkv = Linear(dim, q_out + 2 * kv_out, bias=bias)
        self.o = Linear(q_out, dim, bias=bias if out_bias is None else out_bias)
        self.q_norm = make_norm(qk_norm, head_dim, norm_eps, offset=norm_offset) if qk_norm else None
        self.k_norm = make_norm(qk_norm, head_dim, norm_eps, offset=norm_offset) if qk_norm else None
        self.dropout = dropout
        self.scale = scale
        # attention-logit soft-capping (Gemma 2): cap * tanh(score / cap), after the scale
        self.softcap = softcap
        self.score_mod = scores.softcap(softcap) if softcap is not None else None
        self.backend = "auto"
        # Called as observer(module, call) before attention, with the validated `qkv.backends.Call` of the
        # heads the attention sees (after rotary and cache); qkv.explain uses it to read the weights.
        self.observer = None

    def _heads(self, x: torch.Tensor, n: int) -> torch.Tensor:
        B, T = x.shape[:2]
        return x.view(B, T, n, self.head_dim).transpose(1, 2)  # (B, H, T, D)

    def forward(self, x: torch.Tensor, *, context: torch.Tensor | None = None, mask=None, bias=None,
                rotary: RotaryEmbedding | None = None, positions: torch.Tensor | None = None,
                cache: KVCache | None = None, layer: int = 0, return_weights: bool = False):
        """x (B, T, C) -> (out (B, T, C), weights (B, Hq, T, Tk) or None).

        ``mask``/``bias`` are passed to `qkv.attention` (query rows are the last T of
        the cached positions: bottom-right alignment). ``positions`` (B, T) or (T,)
        feed ``rotary``. Cross-attention reads ``context`` (B, S, C_kv) or, once
        cached, its keys and values from ``cache``.
        """
        B, T, _ = x.shape
        kv_width = self.n_kv_heads * self.head_dim
        if self.is_cross:
            q = self._heads(self.q(x), self.n_heads)
            if self.q_norm is not None:
                q = self.q_norm(q)
            if cache is not None and layer in cache.cross:
                k, v = cache.cross[layer]
            else:
                if context is None:
                    raise ValueError("cross-attention needs `context` (the encoder output) on its first call")
                k, v = self.kv(context).split(kv_width, dim=-1)
                k, v = self._heads(k, self.n_kv_heads), self._heads(v, self.n_kv_heads)
                if self.k_norm is not None:
                    k = self.k_norm(k)
                if cache is not None:
                    cache.cross[layer] = (k, v)
        else:
            q, k, v = self.qkv(x).split((self.n_heads * self.head_dim, kv_width, kv_width), dim=-1)
            q, k, v = self._heads(q, self.n_heads), self._heads(k, self.n_kv_heads), self._heads(v, self.n_kv_heads)
            if self.q_norm is not None:
                q, k = self.q_norm(q), self.k_norm(k)
            if rotary is not None:
                if positions is None:
                    start = 0 if cache is None else cache.length
                    positions = torch.arange(start, start + T, device=x.device)
                q, k = rotary(q, k, positions)
            if cache is not None:
                k, v = cache.append(layer, k, v)
        p = self.dropout if self.training else 0.0
        call = prepare(q, k, v, mask=mask, score_mod=self.score_mod, bias=bias, scale=self.scale, dropout_p=p,
                       return_weights=return_weights)
        if self.observer is not None:
            self.observer(self, call)  # reads the probabilities of this very call: validated and planned once
        result = run(call, self.backend)
        out, weights = result if return_weights else (result, None)
        out = out.transpose(1, 2).reshape(B, T, self.n_heads * self.head_dim)  # (B, T, Hq*D)
        return self.o(out), weights

    def extra_repr(self) -> str:
        return (f"heads={self.n_heads}, kv_heads={self.n_kv_heads}, head_dim={self.head_dim}, cross={self.is_cross}"
                + (f", softcap={self.softcap}" if self.softcap is not None else ""))
