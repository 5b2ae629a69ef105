"""Masks: each equals its definition, tile states are exact where promised and never wrong."""

import itertools

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st
from strategies import masks, primitive_masks

import qkv
from qkv.masks import EMPTY, FULL, PARTIAL


def brute(pred, B, H, Tq, Tk, q_offset):
    """Dense mask from a per-element Python predicate on absolute positions."""
    out = torch.zeros(B, H, Tq, Tk, dtype=torch.bool)
    for b, h, i, j in itertools.product(range(B), range(H), range(Tq), range(Tk)):
        out[b, h, i, j] = bool(pred(b, h, q_offset + i, j))
    return out


DEFINITIONS = {
    "causal": (lambda: qkv.masks.causal(), lambda b, h, q, k: k <= q),
    "window": (lambda: qkv.masks.sliding_window(3), lambda b, h, q, k: q - 3 <= k <= q),
    "window_lr": (lambda: qkv.masks.sliding_window(2, 3), lambda b, h, q, k: q - 2 <= k <= q + 3),
    "padding": (lambda: qkv.masks.padding([5, 9]), lambda b, h, q, k: k < [5, 9][b]),
    "key_padding": (
        lambda: qkv.masks.key_padding(torch.tensor([[0] * 5 + [1] * 11, [1] * 16])),
        lambda b, h, q, k: k >= 5 or b == 1,
    ),
    "key_padding_holes": (
        lambda: qkv.masks.key_padding(torch.tensor([[1, 0] * 8, [0, 1, 1, 1] * 4])),
        lambda b, h, q, k: [[1, 0] * 8, [0, 1, 1, 1] * 4][b][k] == 1,
    ),
    "document": (
        lambda: qkv.masks.document(torch.tensor([[0, 0, 0, 1, 1, 2, 2, 2, 2, 3, 3, 3, 3, 3, 3, 3], [5] * 6 + [7] * 10])),
        lambda b, h, q, k: [[0, 0, 0, 1, 1, 2, 2, 2, 2, 3, 3, 3, 3, 3, 3, 3], [5] * 6 + [7] * 10][b][q]
        == [[0, 0, 0, 1, 1, 2, 2, 2, 2, 3, 3, 3, 3, 3, 3, 3], [5] * 6 + [7] * 10][b][k],
    ),
    "document_scattered": (
        lambda: qkv.masks.document([0, 1, 0, 1, 1, 0, 2, 2, 0, 1, 1, 1, 0, 0, 2, 2]),
        lambda b, h, q, k: [0, 1, 0, 1, 1, 0, 2, 2, 0, 1, 1, 1, 0, 0, 2, 2][q] == [0, 1, 0, 1, 1, 0, 2, 2, 0, 1, 1, 1, 0, 0, 2, 2][k],
    ),
    "prefix": (lambda: qkv.masks.prefix_lm(4), lambda b, h, q, k: k <= q or k < 4),
    "prefix_batched": (lambda: qkv.masks.prefix_lm([2, 7]), lambda b, h, q, k: k <= q or k < [2, 7][b]),
    "global": (lambda: qkv.masks.global_tokens([0, 7]), lambda b, h, q, k: q in (0, 7) or k in (0, 7)),
    "strided": (lambda: qkv.masks.strided(3), lambda b, h, q, k: (q - k) % 3 == 0),
    "block_sparse": (
        lambda: qkv.masks.block_sparse(torch.tensor([[1, 0, 0, 1], [1, 1, 0, 0], [0, 1, 1, 0], [1, 0, 1, 1]], dtype=torch.bool), 4),
        lambda b, h, q, k: bool([[1, 0, 0, 1], [1, 1, 0, 0], [0, 1, 1, 0], [1, 0, 1, 1]][q // 4][k // 4]),
    ),
    "block_sparse_heads": (
        lambda: qkv.masks.block_sparse(torch.tensor([[[1, 0], [1, 1]], [[0, 1], [1, 0]]], dtype=torch.bool), 8),
        lambda b, h, q, k: bool([[[1, 0], [1, 1]], [[0, 1], [1, 0]]][h][q // 8][k // 8]),
    ),
    "function": (lambda: qkv.masks.from_function(lambda b, h, q, k: (q + k) % 3 != 0), lambda b, h, q, k: (q + k) % 3 != 0),
    "and": (lambda: qkv.masks.causal() & qkv.masks.sliding_window(4), lambda b, h, q, k: q - 4 <= k <= q),
    "or": (
        lambda: qkv.masks.sliding_window(1, 1) | qkv.masks.global_tokens([3]),
        lambda b, h, q, k: abs(q - k) <= 1 or 3 in (q, k),
    ),
    "not": (lambda: ~qkv.masks.causal(), lambda b, h, q, k: k > q),
    "mixed_fn": (lambda: qkv.masks.causal() & (lambda b, h, q, k: k % 2 == 0), lambda b, h, q, k: k <= q and k % 2 == 0),
}


@pytest.mark.parametrize("name", sorted(DEFINITIONS))
@pytest.mark.parametrize("tq,tk,q_offset", [(16, 16, None), (5, 16, None), (9, 13, 2), (16, 16, 0)])
def test_materialize_equals_definition(name, tq, tk, q_offset):
    make, pred = DEFINITIONS[name]
    off = tk - tq if q_offset is None else q_offset
    got = make().materialize(tq, tk, batch=2, heads=2, q_offset=q_offset)
    assert got.shape == (2, 2, tq, tk) and got.dtype == torch.bool
    assert torch.equal(got, brute(pred, 2, 2, tq, tk, off))


def _true_states(dense, q_tile, k_tile):
    """Exact tile states from a dense mask (B, H, Tq, Tk)."""
    B, H, Tq, Tk = dense.shape
    nq, nk = -(-Tq // q_tile), -(-Tk // k_tile)
    out = torch.empty(B, H, nq, nk, dtype=torch.int8)
    for i, j in itertools.product(range(nq), range(nk)):
        t = dense[:, :, i * q_tile : (i + 1) * q_tile, j * k_tile : (j + 1) * k_tile]
        out[:, :, i, j] = torch.where(t.flatten(2).all(-1), FULL, torch.where(t.flatten(2).any(-1), PARTIAL, EMPTY))
    return out


EXACT = {"causal", "window", "window_lr", "padding", "key_padding", "key_padding_holes", "document", "prefix", "prefix_batched", "global",
         "block_sparse", "block_sparse_heads", "function", "and", "document_scattered"}


@pytest.mark.parametrize("name", sorted(DEFINITIONS))
@pytest.mark.parametrize("q_tile,k_tile", [(1, 1), (4, 4), (3, 5), (8, 16), (64, 64)])
def test_tile_states(name, q_tile, k_tile):
    make, _ = DEFINITIONS[name]
    mask = make()
    dense = mask.materialize(16, 16, batch=2, heads=2)
    true = _true_states(dense, q_tile, k_tile)
    got = mask.tiles(16, 16, q_tile=q_tile, k_tile=k_tile, batch=2, heads=2)
    assert got.shape == true.shape
    if name in EXACT:
        assert torch.equal(got, true)
    # Never wrong: EMPTY means nothing visible, FULL means everything visible.
    assert not (got == EMPTY).logical_and(true != EMPTY).any()
    assert not (got == FULL).logical_and(true != FULL).any()


@given(st.data())
def test_random_masks_tile_states_are_sound(data):
    B, H = data.draw(st.integers(1, 2)), data.draw(st.integers(1, 2))
    Tq, Tk = data.draw(st.integers(1, 30)), data.draw(st.integers(1, 30))
    off = data.draw(st.integers(-3, 10))
    mask = data.draw(masks(B, H, Tq, Tk, off))
    if mask is None:
        return
    mask = qkv.masks.as_mask(mask)
    qt, kt = data.draw(st.integers(1, 9)), data.draw(st.integers(1, 9))
    dense = mask.materialize(Tq, Tk, batch=B, heads=H, q_offset=off)
    true = _true_states(dense, qt, kt)
    got = mask.tiles(Tq, Tk, q_tile=qt, k_tile=kt, batch=B, heads=H, q_offset=off)
    assert not (got == EMPTY).logical_and(true != EMPTY).any()
    assert not (got == FULL).logical_and(true != FULL).any()


@given(st.data())
def test_primitive_mask_is_vectorised_predicate(data):
    """Calling a mask on broadcast index tensors equals calling it one element at a time (FlexAttention's view)."""
    B, H, Tq, Tk = 2, 2, data.draw(st.integers(1, 12)), data.draw(st.integers(1, 12))
    off = data.draw(st.integers(0, 6))
    mask = qkv.masks.as_mask(data.draw(primitive_masks(B, H, Tq, Tk, off))).bind(off)
    dense = mask.materialize(Tq, Tk, batch=B, heads=H, q_offset=off)
    b, h, i, j = (data.draw(st.integers(0, n - 1)) for n in (B, H, Tq, Tk))
    one = mask(torch.tensor(b), torch.tensor(h), torch.tensor(off + i), torch.tensor(j))
    assert bool(one) == bool(dense[b, h, i, j])


def test_tensor_and_function_masks_combine():
    t = torch.rand(6, 6) > 0.5
    m = qkv.masks.causal() & t
    assert torch.equal(m.materialize(6, 6)[0, 0], t & torch.ones(6, 6, dtype=torch.bool).tril())
    m2 = (lambda b, h, q, k: q == k) | qkv.masks.from_tensor(t)
    assert torch.equal(m2.materialize(6, 6)[0, 0], t | torch.eye(6, dtype=torch.bool))


def test_tensor_mask_rows_follow_the_call():
    t = torch.rand(3, 8) > 0.3
    m = qkv.masks.from_tensor(t)
    for off in (0, 2, 5):
        assert torch.equal(m.materialize(3, 8, q_offset=off)[0, 0], t)
    pinned = qkv.masks.from_tensor(torch.rand(8, 8) > 0.5, q_offset=0)
    assert torch.equal(pinned.materialize(3, 8, q_offset=5)[0, 0], pinned.tensor[0, 0, 5:8])


@pytest.mark.parametrize(
    "make,match",
    [
        (lambda: qkv.masks.sliding_window(-3), "left=-3"),
        (lambda: qkv.masks.sliding_window(4, -1), "right=-1"),
        (lambda: qkv.masks.sliding_window(2.5), "must be an int"),
        (lambda: qkv.masks.strided(0), "stride=0"),
        (lambda: qkv.masks.block_sparse(torch.ones(2, 2, dtype=torch.bool), 0), "block_size=0"),
        (lambda: qkv.masks.block_sparse(torch.ones(2, 2), 4), "bool"),
        (lambda: qkv.masks.padding([3, -1]), ">= 0"),
        (lambda: qkv.masks.padding([1.5]), "integers"),
        (lambda: qkv.masks.document(torch.zeros(2, 2, 2, dtype=torch.long)), "dims"),
        (lambda: qkv.masks.from_tensor(torch.ones(4, 4)), "bool"),
        (lambda: qkv.masks.prefix_lm(-1), ">= 0"),
    ],
)
def test_bad_mask_arguments(make, match):
    with pytest.raises((ValueError, TypeError), match=match):
        make()


def test_masks_check_the_call():
    with pytest.raises(ValueError, match="document ids cover positions 0..3"):
        qkv.masks.document([0, 0, 1, 1]).materialize(6, 6)
    with pytest.raises(ValueError, match="batch size 3"):
        qkv.masks.padding([1, 2, 3]).materialize(4, 4, batch=2)
    with pytest.raises(ValueError, match="enlarge the layout"):
        qkv.masks.block_sparse(torch.ones(2, 2, dtype=torch.bool), 4).materialize(9, 9)
    with pytest.raises(TypeError, match="masks are boolean"):
        qkv.masks.from_function(lambda b, h, q, k: (q - k).float()).materialize(3, 3)


def test_repr_is_readable():
    m = qkv.masks.causal() & qkv.masks.sliding_window(8) | ~qkv.masks.strided(2)
    assert "causal()" in repr(m) and "sliding_window(8, 0)" in repr(m) and "~(strided(2))" in repr(m)


@given(st.data())
def test_classify_one_tile_is_exact(data):
    B, H = data.draw(st.integers(1, 2)), data.draw(st.integers(1, 2))
    mask = data.draw(masks(B, H, 24, 24, 0))
    if mask is None or isinstance(mask, torch.Tensor):
        return
    mask = qkv.masks.as_mask(mask)
    q0, k0 = data.draw(st.integers(0, 20)), data.draw(st.integers(0, 20))
    q1, k1 = data.draw(st.integers(q0 + 1, 24)), data.draw(st.integers(k0 + 1, 24))
    dense = mask.materialize(24, 24, batch=B, heads=H, q_offset=0)[:, :, q0:q1, k0:k1]
    want = FULL if dense.all() else PARTIAL if dense.any() else EMPTY
    assert mask.classify((q0, q1), (k0, k1), batch=B, heads=H) == want


@pytest.mark.parametrize("left, right", [(0, 0), (0, 3), (0, 1), (2, 0)])
def test_zero_width_windows_are_valid(left, right):
    """sliding_window(0) lets each query see itself (FlashAttention's window_size=(0, 0)); (0, r) adds r keys after."""
    m = qkv.masks.sliding_window(left, right)
    dense = m.materialize(6, 9, q_offset=2)[0, 0]
    q = torch.arange(6)[:, None] + 2
    k = torch.arange(9)[None]
    assert torch.equal(dense, (k >= q - left) & (k <= q + right))
    g = torch.Generator().manual_seed(left * 10 + right)
    qq, kk, vv = (torch.randn(1, 2, n, 8, generator=g, dtype=torch.float64) for n in (6, 9, 9))
    ref = qkv.attention(qq, kk, vv, mask=m, q_offset=2, backend="eager")
    for backend in ("chunked", "sdpa", "auto"):
        torch.testing.assert_close(qkv.attention(qq, kk, vv, mask=m, q_offset=2, backend=backend), ref)


def _sets_dense(mask, Tq, Tk, B, H, off):
    """The mask's `interval_sets` as a dense (B, H, Tq, Tk) bool tensor, or None."""
    mask = mask.bind(off)
    sets = mask.interval_sets(torch.arange(Tq) + off)
    if sets is None:
        return None
    lo, hi = sets
    assert lo.dim() == 4 and lo.shape == hi.shape and lo.shape[2] == Tq and lo.dtype == torch.int64
    k = torch.arange(Tk)
    return ((k >= lo[..., None]) & (k <= hi[..., None])).any(-2).expand(B, H, Tq, Tk)


@given(st.data())
def test_interval_sets_are_exact(data):
    """Wherever a mask offers interval sets (primitives, &, |, ~ of them), they say exactly what it says."""
    B, H = data.draw(st.integers(1, 2)), data.draw(st.integers(1, 2))
    Tq, Tk = data.draw(st.integers(1, 30)), data.draw(st.integers(1, 30))
    off = data.draw(st.integers(-3, 10))
    mask = data.draw(masks(B, H, Tq, Tk, off))
    if mask is None:
        return
    mask = qkv.masks.as_mask(mask)
    got = _sets_dense(mask, Tq, Tk, B, H, off)
    if got is not None:
        assert torch.equal(got, mask.materialize(Tq, Tk, batch=B, heads=H, q_offset=off))


def test_interval_sets_cover_the_structured_unions():
    m = qkv.masks
    layout = torch.rand(2, 3, 6, 6, generator=torch.Generator().manual_seed(0)) < 0.4
    union = [m.sliding_window(4, 4) | m.global_tokens([0, 1, 9]), m.block_sparse(layout, 5) & m.causal(),
             ~m.sliding_window(3), m.prefix_lm(7) | m.sliding_window(2), m.global_tokens([])]
    for mask in union:
        got = _sets_dense(mask, 30, 30, 2, 3, 0)
        assert got is not None, mask
        assert torch.equal(got, mask.materialize(30, 30, batch=2, heads=3, q_offset=0)), mask
    assert m.strided(3).interval_sets(torch.arange(8)) is None  # not a few intervals per row
    many = m.global_tokens(list(range(0, 2 * (qkv.masks.MAX_INTERVALS + 1), 2)))  # more runs than the cap
    assert many.interval_sets(torch.arange(8)) is None
