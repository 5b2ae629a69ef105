"""Hypothesis strategies: random attention calls with masks, score mods and biases."""

from contextlib import contextmanager
from dataclasses import dataclass, field

import torch
from hypothesis import strategies as st

import qkv
from qkv.backends.chunked import plan as _plan


@contextmanager
def tiles(q_tile, k_tile):
    """Run the chunked backend with the given tile sizes (small tiles exercise many tiles on small inputs)."""
    old = _plan.Q_TILE, _plan.K_TILE
    _plan.Q_TILE, _plan.K_TILE = q_tile, k_tile
    try:
        yield
    finally:
        _plan.Q_TILE, _plan.K_TILE = old


def _bool_tensor(draw, shape, p_true=None):
    seed = draw(st.integers(0, 2**31 - 1))
    g = torch.Generator().manual_seed(seed)
    p = draw(st.floats(0.1, 0.95)) if p_true is None else p_true
    return torch.rand(shape, generator=g) < p


@st.composite
def primitive_masks(draw, B, H, Tq, Tk, q_offset):
    """One built-in mask (or function / tensor) valid for the call."""
    n = max(q_offset + Tq, Tk, 1)  # positions the call touches
    kinds = ["causal", "window", "padding", "prefix", "global", "strided", "function", "tensor"]
    if q_offset >= 0:
        kinds += ["document", "block_sparse"]
    kind = draw(st.sampled_from(kinds))
    m = qkv.masks
    if kind == "causal":
        return m.causal()
    if kind == "window":
        return m.sliding_window(draw(st.integers(0, 12)), draw(st.sampled_from([0, 0, 1, 4])))
    if kind == "padding":
        return m.padding(draw(st.lists(st.integers(0, Tk), min_size=B, max_size=B)))
    if kind == "prefix":
        if draw(st.booleans()):
            return m.prefix_lm(draw(st.integers(0, Tk)))
        return m.prefix_lm(draw(st.lists(st.integers(0, Tk), min_size=B, max_size=B)))
    if kind == "global":
        return m.global_tokens(draw(st.lists(st.integers(0, n + 2), min_size=0, max_size=3)))
    if kind == "strided":
        return m.strided(draw(st.integers(1, 7)))
    if kind == "function":
        mod = draw(st.integers(2, 4))
        return lambda b, h, q, k: ((q + 2 * k + h) % mod) != 0
    if kind == "tensor":
        shape = (draw(st.sampled_from([1, B])), draw(st.sampled_from([1, H])), Tq, Tk)
        return _bool_tensor(draw, shape)
    if kind == "document":
        nb = draw(st.sampled_from([1, B]))
        if draw(st.booleans()):  # packed: contiguous runs
            cuts = [sorted(draw(st.lists(st.integers(0, n), max_size=4))) for _ in range(nb)]
            ids = torch.tensor([[sum(p >= c for c in cs) for p in range(n)] for cs in cuts])
        else:
            ids = torch.tensor(draw(st.lists(st.lists(st.integers(0, 2), min_size=n, max_size=n), min_size=nb, max_size=nb)))
        return m.document(ids[0] if nb == 1 and draw(st.booleans()) else ids)
    bs = draw(st.integers(1, 8))
    nqb, nkb = -(-n // bs), -(-Tk // bs)
    shape = draw(st.sampled_from([(nqb, nkb), (H, nqb, nkb), (B, H, nqb, nkb)]))
    return m.block_sparse(_bool_tensor(draw, shape), bs)


@st.composite
def masks(draw, B, H, Tq, Tk, q_offset, depth=1):
    """None, a primitive, or a combination with &, |, ~."""
    choice = draw(st.sampled_from(["none", "prim", "prim", "and", "or", "not"] if depth else ["prim"]))
    if choice == "none":
        return None
    if choice == "prim":
        return draw(primitive_masks(B, H, Tq, Tk, q_offset))
    a = qkv.masks.as_mask(draw(primitive_masks(B, H, Tq, Tk, q_offset)))
    if choice == "not":
        return ~a
    b = draw(masks(B, H, Tq, Tk, q_offset, depth=depth - 1))
    return (a & b) if choice == "and" else (a | b)


@st.composite
def score_mods(draw, H):
    kind = draw(st.sampled_from(["none", "none", "alibi", "softcap", "both"]))
    slopes = torch.tensor(draw(st.lists(st.floats(0.01, 1.0), min_size=H, max_size=H)), dtype=torch.float64)
    if kind == "none":
        return None
    if kind == "alibi":
        return qkv.scores.alibi(slopes)
    if kind == "softcap":
        return qkv.scores.softcap(draw(st.floats(0.5, 20.0)))
    return qkv.scores.compose(qkv.scores.alibi(slopes), qkv.scores.softcap(5.0))


@dataclass
class Case:
    q: torch.Tensor
    k: torch.Tensor
    v: torch.Tensor
    mask: object
    score_mod: object
    bias: torch.Tensor | None
    scale: float | None
    q_offset: int | None
    tiles: tuple[int, int]
    kwargs: dict = field(default_factory=dict)

    @property
    def offset(self):
        return self.k.shape[2] - self.q.shape[2] if self.q_offset is None else self.q_offset

    def dense_mask(self):
        if self.mask is None:
            return None
        B, H, Tq = self.q.shape[:3]
        Tk = self.k.shape[2]
        return qkv.masks.as_mask(self.mask).materialize(Tq, Tk, batch=B, heads=H, q_offset=self.offset)

    def call_kwargs(self):
        return dict(mask=self.mask, score_mod=self.score_mod, bias=self.bias, scale=self.scale, q_offset=self.q_offset)


@st.composite
def cases(draw, *, max_t=40, dtype=torch.float64, extras=True, min_t=1):
    B = draw(st.integers(1, 2))
    Hkv = draw(st.sampled_from([1, 2]))
    Hq = Hkv * draw(st.sampled_from([1, 2, 3]))
    Tq = draw(st.integers(min_t, max_t))
    Tk = draw(st.integers(min_t, max_t))
    D = draw(st.sampled_from([4, 8, 16]))
    Dv = draw(st.sampled_from([D, D, D, 8, 5]))
    q_offset = draw(st.sampled_from([None, None, "random"]))
    off = Tk - Tq if q_offset is None else draw(st.integers(-4, Tk + 4))
    q_offset = None if q_offset is None else off
    mask = draw(masks(B, Hq, Tq, Tk, off))
    score_mod = draw(score_mods(Hq)) if extras else None
    bias = None
    if extras and draw(st.booleans()):
        shape = tuple(draw(st.sampled_from([1, n])) for n in (B, Hq, Tq, Tk))
        g = torch.Generator().manual_seed(draw(st.integers(0, 2**31 - 1)))
        bias = torch.randn(shape[-draw(st.integers(2, 4)):] if shape[:2] == (1, 1) else shape, generator=g, dtype=dtype)
    scale = draw(st.sampled_from([None, None, 0.3]))
    g = torch.Generator().manual_seed(draw(st.integers(0, 2**31 - 1)))
    q = torch.randn(B, Hq, Tq, D, generator=g, dtype=dtype)
    k = torch.randn(B, Hkv, Tk, D, generator=g, dtype=dtype)
    v = torch.randn(B, Hkv, Tk, Dv, generator=g, dtype=dtype)
    tile = (draw(st.sampled_from([1, 3, 8, 64])), draw(st.sampled_from([1, 4, 16, 64])))
    return Case(q, k, v, mask, score_mod, bias, scale, q_offset, tile)
