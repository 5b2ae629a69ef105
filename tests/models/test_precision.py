"""Lower precision on every family: ``model.quantize("int8")`` and ``model.to(torch.bfloat16)`` give outputs
close to the same model in float32 (the quality each precision promises), on random transformers
checkpoints loaded with `qkv.load`."""

import copy

import pytest
import torch
from hf_models import FAMILIES, family_outputs, save_family

import qkv
from qkv.nn.quantized import Int8Linear

# ||low - fp32|| / ||fp32 - its mean over the batch and positions||: the error against how much the outputs
# vary (a random model at transformers' default init barely depends on its layers, so its weights are drawn
# wider here: errors in any layer show). Measured: int8 0.02-0.09, weight-only int8 0.01-0.05, bf16 0.01-0.04.
TOLERANCE = {"int8": 0.15, "int8-weights": 0.1, "bfloat16": 0.08}
WIDE = {"bart": {"init_std": 0.2}, "whisper": {"init_std": 0.2}, "t5": {}}  # t5: its default init already varies


def relative_error(got, want):
    want = want.float()
    return ((got.float() - want).norm() / (want - want.mean(0, keepdim=True)).norm()).item()


def _variant(model, precision):
    m = copy.deepcopy(model)
    if precision == "int8":
        return m.quantize("int8")
    if precision == "int8-weights":
        return m.quantize("int8", activations="none")
    return m.to(torch.bfloat16)


@pytest.fixture(scope="module")
def loaded(tmp_path_factory):
    cache = {}

    def get(family):
        if family not in cache:
            folder = tmp_path_factory.mktemp(family)
            hf = save_family(folder, family, **WIDE.get(family, {"initializer_range": 0.2}))
            cache[family] = (hf, qkv.load(folder).eval())
        return cache[family]

    return get


@pytest.mark.parametrize("precision", list(TOLERANCE))
@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_lower_precision_stays_close_to_float32(loaded, family, precision):
    hf, model = loaded(family)
    _, want = family_outputs(family, hf, model)
    low = _variant(model, precision)
    if precision.startswith("int8"):
        layers = [m for m in low.modules() if isinstance(m, Int8Linear)]
        assert layers and not any(type(m) is torch.nn.Linear for m in low.modules())
        assert low.quantized == ("int8", "dynamic" if precision == "int8" else "none")
    else:
        assert {p.dtype for p in low.parameters()} == {torch.bfloat16}
    _, got = family_outputs(family, hf, low)
    assert got.shape == want.shape and torch.isfinite(got.float()).all()
    err = relative_error(got, want)
    assert err <= TOLERANCE[precision], f"{family} {precision}: relative error {err:.4f}"


def test_the_measure_sees_a_broken_layer(loaded):
    hf, model = loaded("llama")
    _, want = family_outputs("llama", hf, model)
    low = _variant(model, "int8")
    layer = next(m for m in low.modules() if isinstance(m, Int8Linear))
    layer.scale.mul_(1.5)  # one layer's scales off by half
    _, got = family_outputs("llama", hf, low)
    assert relative_error(got, want) > TOLERANCE["int8"]
