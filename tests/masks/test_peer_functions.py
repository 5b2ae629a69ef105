"""Mask and score functions written for FlexAttention (scalar indices under vmap) work verbatim on every backend."""

import pytest
import torch

import qkv

BACKENDS = ["eager", "chunked", "sdpa", "auto"]


# -- peer functions, as their authors wrote them (attention-gym style) ------------------------------------------

INTERVALS = torch.tensor([[0, 5], [3, 9], [8, 12]])  # per image: the text positions that may see it
IMAGE_OF = torch.repeat_interleave(torch.arange(3), 4)  # kv position -> image index


def vision_cross_attention(b, h, q_idx, kv_idx):  # Flamingo (attention-gym): indexes a table with interval[0]
    image_idx = IMAGE_OF[kv_idx]
    interval = INTERVALS[image_idx]
    return (q_idx >= interval[0]) & (q_idx < interval[1])


def causal(b, h, q_idx, kv_idx):
    return q_idx >= kv_idx


DOC = torch.tensor([0, 0, 0, 1, 1, 2, 2, 2, 2, 3, 3, 3])


def document_causal(b, h, q_idx, kv_idx):
    return (DOC[q_idx] == DOC[kv_idx]) & (q_idx >= kv_idx)


def dilated_window(b, h, q_idx, kv_idx):
    diff = q_idx - kv_idx
    return (diff >= 0) & (diff < 8) & (diff % 2 == 0)


MASKS = [vision_cross_attention, causal, document_causal, dilated_window]

HEAD_TABLE = torch.tensor([[0.5, -1.0], [2.0, 0.25]])  # per head: (slope, offset)
REL = torch.randn(23, generator=torch.Generator().manual_seed(0), dtype=torch.float64)  # float64 table


def head_affine(score, b, h, q_idx, kv_idx):  # picks a head's row, then its entries: scalar style
    w = HEAD_TABLE[h]
    return score * w[0] + w[1]


def relative_bias_f64(score, b, h, q_idx, kv_idx):  # closes over a float64 table, inputs are float32
    return score + REL[q_idx - kv_idx + 11]


def alibi(score, b, h, q_idx, kv_idx):
    slope = torch.exp2(-((h + 1) * 8.0 / 2))
    return score + slope * (kv_idx - q_idx)


def soft_cap(score, b, h, q_idx, kv_idx):
    return 5.0 * torch.tanh(score / 5.0)


SCORE_MODS = [head_affine, relative_bias_f64, alibi, soft_cap]


def _elementwise_mask(fn, B, H, T):
    out = torch.zeros(B, H, T, T, dtype=torch.bool)
    for b in range(B):
        for h in range(H):
            for i in range(T):
                for j in range(T):
                    out[b, h, i, j] = bool(fn(torch.tensor(b), torch.tensor(h), torch.tensor(i), torch.tensor(j)))
    return out


def _reference(q, k, v, dense=None, mod=None):
    B, H, T, D = q.shape
    s = (q.double() @ k.double().transpose(-1, -2)) * D ** -0.5
    if mod is not None:
        s = torch.stack([torch.stack([torch.stack([torch.stack([
            mod(s[b, h, i, j], torch.tensor(b), torch.tensor(h), torch.tensor(i), torch.tensor(j)).double()
            for j in range(T)]) for i in range(T)]) for h in range(H)]) for b in range(B)])
    if dense is not None:
        s = s.masked_fill(~dense, float("-inf"))
    live = torch.isfinite(s).any(-1, keepdim=True)
    p = torch.softmax(torch.where(live, s, 0.0), -1) * live
    return p @ v.double(), p


def _qkv(dtype, seed):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(2, 2, 12, 8, generator=g, dtype=dtype) for _ in range(3)]


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("fn", MASKS, ids=lambda f: f.__name__)
def test_peer_masks(fn, backend):
    q, k, v = _qkv(torch.float64, 1)
    dense = _elementwise_mask(fn, 2, 2, 12)
    want, _ = _reference(q, k, v, dense)
    torch.testing.assert_close(qkv.attention(q, k, v, mask=fn, q_offset=0, backend=backend), want)
    assert torch.equal(qkv.masks.as_mask(fn).materialize(12, 12, batch=2, heads=2, q_offset=0), dense)


@pytest.mark.parametrize("backend", ["eager", "chunked", "auto"])
@pytest.mark.parametrize("mod", SCORE_MODS, ids=lambda f: f.__name__)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_peer_score_mods(mod, backend, dtype):
    q, k, v = _qkv(dtype, 2)
    dense = _elementwise_mask(causal, 2, 2, 12)
    want, p = _reference(q, k, v, dense, mod)
    out, weights = qkv.attention(q, k, v, mask=causal, score_mod=mod, q_offset=0, backend=backend,
                                 return_weights=True)
    assert out.dtype == dtype and weights.dtype == dtype  # one documented dtype: the inputs' (float32 for halves)
    tol = dict(atol=1e-5, rtol=1e-4) if dtype == torch.float32 else {}
    torch.testing.assert_close(out.double(), want, **tol)
    torch.testing.assert_close(weights.double(), p, **tol)
    val, idx = qkv.attention_weights(q, k, mask=causal, score_mod=mod, q_offset=0, topk=3)
    torch.testing.assert_close(val.double(), p.topk(3, dim=-1).values, **tol)


def test_flex_runs_peer_masks_verbatim():
    if not qkv.backends.available()["flex"].available:
        pytest.skip("FlexAttention is not available in this torch build")
    q, k, v = _qkv(torch.float32, 3)
    dense = _elementwise_mask(vision_cross_attention, 2, 2, 12)
    want, _ = _reference(q, k, v, dense)
    with torch.no_grad():
        out = qkv.attention(q, k, v, mask=vision_cross_attention, score_mod=relative_bias_f64, q_offset=0,
                            backend="eager")
        torch.testing.assert_close(qkv.attention(q, k, v, mask=vision_cross_attention, q_offset=0, backend="flex"),
                                   want.float(), atol=1e-5, rtol=1e-4)
    assert out.dtype == torch.float32


def test_functions_that_fail_both_ways_get_a_message_with_the_fix():
    def branchy(b, h, q_idx, kv_idx):
        if q_idx > kv_idx:  # data-dependent Python control flow works nowhere (FlexAttention refuses it too)
            return torch.tensor(True)
        return torch.tensor(False)

    q, k, v = _qkv(torch.float32, 4)
    with pytest.raises(TypeError, match="torch.where instead of `if`"):
        qkv.attention(q, k, v, mask=branchy, backend="eager")
