"""Layers against their definitions and against transformers' implementations where one exists."""

import math

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given
from hypothesis import strategies as st

import qkv
from qkv.nn import (
    FeedForward,
    KVCache,
    Linear,
    MultiHeadAttention,
    RelativePositionBias,
    RMSNorm,
    RotaryEmbedding,
    SinusoidalPositions,
    alibi_slopes,
)


def test_rotary_is_a_rotation_that_encodes_relative_position():
    rot = RotaryEmbedding(16, base=100.0)
    q, k = torch.randn(1, 2, 1, 16), torch.randn(1, 2, 1, 16)
    scores = []
    for m, n in [(3, 1), (10, 8), (57, 55)]:
        qm, _ = rot(q, q, torch.tensor([m]))
        _, kn = rot(k, k, torch.tensor([n]))
        torch.testing.assert_close(qm.norm(dim=-1), q.norm(dim=-1))
        scores.append((qm * kn).sum(-1))
    torch.testing.assert_close(scores[0], scores[1], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(scores[0], scores[2], atol=1e-5, rtol=1e-5)


def test_rotary_layouts_are_a_feature_permutation():
    half, inter = RotaryEmbedding(8), RotaryEmbedding(8, interleaved=True)
    x = torch.randn(2, 3, 5, 8)
    perm = torch.tensor([0, 4, 1, 5, 2, 6, 3, 7])  # half-split -> interleaved order
    pos = torch.arange(5)
    a, _ = half(x, x, pos)
    b, _ = inter(x[..., perm], x[..., perm], pos)
    torch.testing.assert_close(a[..., perm], b)


def test_partial_rotary_leaves_the_rest():
    rot = RotaryEmbedding(4)
    x = torch.randn(1, 1, 3, 10)
    y, _ = rot(x, x, torch.arange(3))
    torch.testing.assert_close(y[..., 4:], x[..., 4:])
    assert not torch.allclose(y[..., :4], x[..., :4])


def test_rotary_matches_transformers_llama():
    tr = pytest.importorskip("transformers")
    from transformers.models.llama.modeling_llama import LlamaRotaryEmbedding, apply_rotary_pos_emb

    cfg = tr.LlamaConfig(hidden_size=64, num_attention_heads=4, rope_theta=5000.0)
    ref = LlamaRotaryEmbedding(cfg)
    q, k = torch.randn(2, 4, 7, 16), torch.randn(2, 2, 7, 16)
    pos = torch.tensor([[0, 1, 2, 3, 4, 5, 6], [9, 10, 11, 12, 13, 14, 15]])
    cos, sin = ref(q, pos)
    want = apply_rotary_pos_emb(q, k, cos, sin)
    got = RotaryEmbedding(16, base=5000.0)(q, k, pos)
    for g, w in zip(got, want):
        torch.testing.assert_close(g, w)


def test_relative_position_buckets_match_transformers_t5():
    pytest.importorskip("transformers")
    from transformers.models.t5.modeling_t5 import T5Attention

    rel = torch.arange(-300, 300)[None, :] - torch.arange(0, 40)[:, None]
    for bidirectional in (True, False):
        ours = RelativePositionBias(4, 32, 128, bidirectional).bucket(rel)
        want = T5Attention._relative_position_bucket(rel, bidirectional=bidirectional, num_buckets=32, max_distance=128)
        assert torch.equal(ours, want)


def test_alibi_slopes():
    torch.testing.assert_close(alibi_slopes(8), torch.tensor([2.0 ** -(i + 1) for i in range(8)]))
    s12 = alibi_slopes(12)
    torch.testing.assert_close(s12[:8], alibi_slopes(8))
    torch.testing.assert_close(s12[8:], alibi_slopes(16)[0::2][:4])


def test_sinusoidal_positions_follow_the_paper():
    table = SinusoidalPositions(16, max_positions=50)(torch.arange(50))
    pos, i = 37, 3
    assert math.isclose(table[pos, 2 * i].item(), math.sin(pos / 10000 ** (2 * i / 16)), abs_tol=1e-6)
    assert math.isclose(table[pos, 2 * i + 1].item(), math.cos(pos / 10000 ** (2 * i / 16)), abs_tol=1e-6)
    concat = SinusoidalPositions(16, max_positions=50, layout="concat")(torch.arange(50))
    assert math.isclose(concat[pos, 8 + i].item(), math.cos(pos * math.exp(-math.log(10000) / 7 * i)), abs_tol=1e-6)


def test_rmsnorm_and_gated_feedforward():
    x = torch.randn(3, 5, 8)
    norm = RMSNorm(8, eps=1e-6)
    norm.weight.data.uniform_(0.5, 1.5)
    torch.testing.assert_close(norm(x), x / x.pow(2).mean(-1, keepdim=True).add(1e-6).sqrt() * norm.weight)
    ff = FeedForward(8, 12, "swiglu", bias=False)
    gate, up = ff.up.weight[:12], ff.up.weight[12:]
    torch.testing.assert_close(ff(x), (F.silu(x @ gate.T) * (x @ up.T)) @ ff.down.weight.T)
    with pytest.raises(ValueError, match="activation"):
        FeedForward(8, 12, "sparkle")


@given(rows=st.integers(1, 9), inp=st.integers(1, 80), out=st.integers(1, 300), bias=st.booleans())
def test_linear_fast_path_equals_linear(rows, inp, out, bias):
    lin = Linear(inp, out, bias=bias)
    x = torch.randn(rows, inp)
    with torch.no_grad():
        y = lin(x)
    assert y.is_contiguous() and y.shape == (rows, out)
    torch.testing.assert_close(y, F.linear(x, lin.weight, lin.bias), atol=1e-5, rtol=1e-5)


def test_grouped_query_attention_equals_repeated_kv_heads():
    torch.manual_seed(0)
    gqa = MultiHeadAttention(32, 4, n_kv_heads=2)
    mha = MultiHeadAttention(32, 4)
    W = gqa.qkv.weight.data
    q, k, v = W[:32], W[32:48], W[48:64]
    rep = lambda w: w.view(2, 8, 32).repeat_interleave(2, 0).reshape(32, 32)  # noqa: E731
    mha.qkv.weight.data = torch.cat([q, rep(k), rep(v)])
    b = gqa.qkv.bias.data
    repb = lambda x: x.view(2, 8).repeat_interleave(2, 0).reshape(32)  # noqa: E731
    mha.qkv.bias.data = torch.cat([b[:32], repb(b[32:48]), repb(b[48:64])])
    mha.o.load_state_dict(gqa.o.state_dict())
    x = torch.randn(2, 6, 32)
    torch.testing.assert_close(gqa(x, mask=qkv.masks.causal())[0], mha(x, mask=qkv.masks.causal())[0])


def test_kv_cache_grows_and_selects():
    cache = KVCache(1, capacity=2)
    ks = [torch.randn(3, 2, 1, 4) for _ in range(5)]
    for t in ks:
        k_all, v_all = cache.append(0, t, t * 2)
        cache.advance(1)
    torch.testing.assert_close(k_all, torch.cat(ks, dim=2))
    torch.testing.assert_close(v_all, torch.cat(ks, dim=2) * 2)
    cache.select(torch.tensor([2, 0]))
    assert cache.keys[0].shape[0] == 2
    torch.testing.assert_close(cache.keys[0][:, :, :5], torch.cat(ks, dim=2)[[2, 0]])


def test_attention_module_errors_name_the_fix():
    with pytest.raises(ValueError, match="divisor"):
        MultiHeadAttention(32, 4, n_kv_heads=3)
    with pytest.raises(ValueError, match="head_dim"):
        MultiHeadAttention(30, 4)
    cross = MultiHeadAttention(32, 4, kv_dim=16)
    with pytest.raises(ValueError, match="context"):
        cross(torch.randn(1, 2, 32))


def test_kv_cache_capacity_doubles():
    cache = KVCache(1, capacity=4)
    sizes = []
    for _ in range(9):
        cache.append(0, torch.zeros(1, 1, 1, 2), torch.zeros(1, 1, 1, 2))
        cache.advance(1)
        sizes.append(cache.keys[0].shape[2])
    assert sizes == [4, 4, 4, 4, 8, 8, 8, 8, 16]


def test_vit_without_qkv_bias_keeps_its_other_biases():
    from qkv.models import ViTConfig, VisionTransformer

    keys = VisionTransformer(ViTConfig(image_size=16, patch_size=8, dim=32, n_layers=1, n_heads=4, ffn_dim=64,
                                       qkv_bias=False)).state_dict()
    assert "encoder.layers.0.attn.qkv.bias" not in keys
    assert {"encoder.layers.0.attn.o.bias", "encoder.layers.0.ffn.up.bias"} <= set(keys)


@given(rows=st.integers(1, 40), inp=st.integers(1, 64), out=st.integers(1, 96), bias=st.booleans(),
       lead=st.sampled_from([(), (2,), (2, 3)]))
def test_linear_training_path_gradients(rows, inp, out, bias, lead):
    lin = Linear(inp, out, bias=bias)
    ref = torch.nn.Linear(inp, out, bias=bias)
    ref.load_state_dict(lin.state_dict())
    x = torch.randn(*lead, rows, inp, requires_grad=True)
    x2 = x.detach().clone().requires_grad_()
    g = torch.randn(*lead, rows, out)
    lin(x).backward(g)
    ref(x2).backward(g)
    torch.testing.assert_close(x.grad, x2.grad, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(lin.weight.grad, ref.weight.grad, atol=1e-4, rtol=1e-5)
    if bias:
        torch.testing.assert_close(lin.bias.grad, ref.bias.grad, atol=1e-4, rtol=1e-5)
