"""`qkv.nn.quantized`: int8 weights with per-row scales, dynamic int8 activations, and `quantize`."""

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from qkv.models import CausalLM, CausalLMConfig
from qkv.nn import Linear
from qkv.nn.quantized import Int8Linear, quantize, quantize_rows


def _layer(K, N, bias, seed):
    torch.manual_seed(seed)
    lin = Linear(K, N, bias=bias)
    with torch.no_grad():
        lin.weight.mul_(torch.rand(N, 1) * 4)  # rows of different magnitudes: each needs its own scale
    return lin


@settings(max_examples=30, deadline=None)
@given(K=st.integers(1, 70), N=st.integers(1, 40), rows=st.integers(1, 20), bias=st.booleans(),
       seed=st.integers(0, 2**16))
def test_rows_round_trip_within_half_a_step(K, N, rows, bias, seed):
    w = _layer(K, N, bias, seed).weight.detach()
    q, s = quantize_rows(w)
    assert q.dtype == torch.int8 and q.abs().max() <= 127 and s.shape == (N,)
    assert ((q.float() * s[:, None] - w).abs() <= s[:, None] / 2 + 1e-7).all()


@settings(max_examples=40, deadline=None)
@given(K=st.integers(1, 70), N=st.integers(1, 40), rows=st.integers(1, 20), bias=st.booleans(),
       seed=st.integers(0, 2**16), lead=st.sampled_from([(), (2,), (1, 3)]))
def test_int8_products_equal_the_float64_reference(K, N, rows, bias, seed, lead):
    lin = _layer(K, N, bias, seed)
    x = torch.randn(*lead, rows, K, generator=torch.Generator().manual_seed(seed)) * 3
    q, s = quantize_rows(lin.weight)
    w64 = q.double() * s.double()[:, None]
    b64 = None if lin.bias is None else lin.bias.detach().double()
    exact = torch.nn.functional.linear(x.double(), lin.weight.detach().double(), b64)
    with torch.no_grad():
        # weight-only: the float input times the dequantized matrix
        got = Int8Linear.from_linear(lin, activations="none")(x)
        torch.testing.assert_close(got.double(), torch.nn.functional.linear(x.double(), w64, b64),
                                   rtol=1e-4, atol=1e-4)
        # dynamic: also the input rounded to int8 with one scale per row
        got = Int8Linear.from_linear(lin, activations="dynamic")(x)
    sx = x.double().abs().amax(-1, keepdim=True).clamp_min(1e-12) / 127
    if x.numel() // K > 1:  # several rows: torch._int_mm on the rows' own scales, exactly this arithmetic
        ref = torch.nn.functional.linear(torch.round(x.double() / sx) * sx, w64, b64)
        torch.testing.assert_close(got.double(), ref, rtol=1e-4, atol=1e-4)
    # any path (one row goes through FBGEMM's asymmetric uint8): within a step of the input's grid per term
    bound = sx * lin.weight.detach().double().abs().sum(1) + (s.double() / 2 * x.double().abs().sum(-1, True))
    assert ((got.double() - exact).abs() <= bound + 1e-4).all()


def test_dynamic_rows_do_not_depend_on_the_rest_of_the_batch():
    lin = _layer(48, 32, True, 0)
    layer = Int8Linear.from_linear(lin)
    x = torch.randn(6, 48)
    x[0] *= 100  # one row of large activations: it must not coarsen the others
    with torch.no_grad():
        together = layer(x)
        alone = torch.cat([layer(x[i : i + 2])[1:] for i in range(0, 5)])
    torch.testing.assert_close(together[1:6], alone, rtol=1e-5, atol=1e-5)


def test_autograd_and_float64_take_the_same_arithmetic():
    lin = _layer(16, 8, True, 1)
    layer = Int8Linear.from_linear(lin)
    x = torch.randn(5, 16, requires_grad=True)
    y = layer(x)  # grad enabled: the fallback path
    with torch.no_grad():
        torch.testing.assert_close(y, layer(x), rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(layer(x.double()).float(), layer(x), rtol=1e-5, atol=1e-5)
    y.sum().backward()  # straight through the rounding: d/dx = the dequantized matrix's column sums
    torch.testing.assert_close(x.grad, layer.weight.sum(0).expand(5, -1), rtol=1e-5, atol=1e-6)


def test_to_keeps_int8_weights_and_float32_scales():
    layer = Int8Linear.from_linear(_layer(16, 8, True, 2)).to(torch.bfloat16)
    assert layer.qweight.dtype == torch.int8 and layer.scale.dtype == torch.float32
    assert layer.bias.dtype == torch.float32
    with torch.no_grad():
        y = layer(torch.randn(3, 16, dtype=torch.bfloat16))
    assert y.dtype == torch.bfloat16 and y.shape == (3, 8)
    sd = layer.state_dict()
    assert set(sd) == {"qweight", "scale", "bias"}
    fresh = Int8Linear(16, 8)
    fresh.load_state_dict(sd)
    assert torch.equal(fresh.qweight, layer.qweight)


def test_quantize_swaps_every_linear_and_keeps_tied_embeddings_float():
    torch.manual_seed(0)
    model = CausalLM(CausalLMConfig(vocab_size=50, dim=32, n_layers=2, n_heads=4, ffn_dim=64, max_positions=32))
    emb = model.tokens.weight.detach().clone()
    model.quantize("int8", skip=("layers.0",) if hasattr(model, "layers") else ())
    assert model.quantized == ("int8", "dynamic")
    assert isinstance(model.lm_head, Int8Linear) and model.tokens.weight.dtype == torch.float32
    assert torch.equal(model.tokens.weight, emb)
    ids = torch.randint(0, 50, (1, 5))
    assert model.generate(ids, max_new_tokens=3, eos_token_id=[]).shape == (1, 8)


def test_quantize_refuses_by_name():
    model = CausalLM(CausalLMConfig(vocab_size=50, dim=32, n_layers=1, n_heads=4, ffn_dim=64, max_positions=32))
    with pytest.raises(ValueError, match="mode='int4'"):
        model.quantize("int4")
    with pytest.raises(ValueError, match="activations='static'"):
        model.quantize("int8", activations="static")
    with pytest.raises(ValueError, match="skip names \\['nope'\\]"):
        model.quantize("int8", skip=("nope",))
    with pytest.raises(ValueError, match="no linear layers"):
        quantize(torch.nn.Sequential(torch.nn.ReLU()))
    with pytest.raises(ValueError, match="input has 3 features"):
        Int8Linear(4, 2)(torch.randn(1, 3))
