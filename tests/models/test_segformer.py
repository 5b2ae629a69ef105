"""SegFormer: same numbers as transformers on the same weights (logits, attentions, stage maps, loss);
segment() as SegformerImageProcessor's post-processing; config fields refused by name."""

import json
import shutil

import numpy as np
import pytest
import torch

transformers = pytest.importorskip("transformers")
Image = pytest.importorskip("PIL.Image", reason="image tests need Pillow: pip install pillow")

import qkv  # noqa: E402
from qkv.convert import ConversionError  # noqa: E402
from qkv.convert.huggingface import config_from_hf  # noqa: E402
from qkv.convert.huggingface._fields import Only, Read  # noqa: E402
from qkv.convert.huggingface._tables import SEGFORMER  # noqa: E402
from qkv.models import SegformerConfig, SemanticSegmenter  # noqa: E402

T = transformers

TINY = dict(num_encoder_blocks=2, depths=[1, 1], sr_ratios=[2, 1], hidden_sizes=[8, 16], patch_sizes=[7, 3],
            strides=[4, 2], num_attention_heads=[1, 2], mlp_ratios=[4, 4], decoder_hidden_size=16, num_labels=3)
CONFIGS = {
    "two-stages": TINY,
    "three-stages": dict(num_encoder_blocks=3, depths=[1, 2, 1], sr_ratios=[4, 2, 1], hidden_sizes=[8, 16, 24],
                         patch_sizes=[7, 3, 3], strides=[4, 2, 2], num_attention_heads=[1, 2, 3], mlp_ratios=[4, 2, 3],
                         decoder_hidden_size=12, num_labels=5, hidden_act="relu"),
    "b0-shape": dict(num_encoder_blocks=4, depths=[2, 1, 1, 2], sr_ratios=[8, 4, 2, 1], hidden_sizes=[8, 16, 20, 32],
                     patch_sizes=[7, 3, 3, 3], strides=[4, 2, 2, 2], num_attention_heads=[1, 2, 5, 8],
                     decoder_hidden_size=24, num_labels=7),
    "odd-strides": dict(num_encoder_blocks=3, depths=[1, 1, 2], sr_ratios=[3, 2, 1], hidden_sizes=[12, 16, 16],
                        patch_sizes=[5, 5, 3], strides=[2, 3, 1], num_attention_heads=[3, 4, 2], mlp_ratios=[2, 4, 1],
                        decoder_hidden_size=8, num_labels=4, hidden_act="gelu_new"),
}


@pytest.fixture
def folder(tmp_path):
    path = tmp_path / "segformer"
    yield path
    shutil.rmtree(path, ignore_errors=True)


def _save(folder, cls=T.SegformerForSemanticSegmentation, seed=0, **cfg):
    """A random transformers SegFormer (BatchNorm statistics randomised too, so they matter) saved in ``folder``."""
    torch.manual_seed(seed)
    hf = cls(T.SegformerConfig(**cfg, attn_implementation="eager")).eval()
    if hasattr(hf, "decode_head"):
        bn = hf.decode_head.batch_norm
        with torch.no_grad():
            bn.running_mean.normal_()
            bn.running_var.uniform_(0.5, 2.0)
            bn.weight.normal_()
            bn.bias.normal_()
    hf.save_pretrained(folder)
    return hf


def _pair(folder, cls=T.SegformerForSemanticSegmentation, **cfg):
    hf = _save(folder, cls, **cfg)
    return hf, qkv.load(folder)


@pytest.mark.parametrize("name,size", [("two-stages", (64, 48)), ("three-stages", (40, 72)),
                                       ("b0-shape", (96, 64)), ("odd-strides", (37, 53))],
                         ids=["two-stages", "three-stages", "b0-shape", "odd-strides"])
def test_logits_attentions_and_stage_maps_equal_transformers(folder, name, size):
    hf, model = _pair(folder, **CONFIGS[name])
    assert isinstance(model, SemanticSegmenter)
    x = torch.randn(2, 3, *size)
    with torch.no_grad():
        ref = hf(pixel_values=x, output_attentions=True, output_hidden_states=True)
        out = model(x, return_weights=True, return_hidden=True)
    assert out.logits.shape == ref.logits.shape
    torch.testing.assert_close(out.logits, ref.logits, rtol=1e-4, atol=1e-4)
    assert len(out.attentions) == len(ref.attentions) == sum(CONFIGS[name]["depths"])
    for a, b in zip(out.attentions, ref.attentions):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)
    assert len(out.hidden_states) == len(ref.hidden_states)
    for a, b in zip(out.hidden_states, ref.hidden_states):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-4)


def test_default_size_logits_are_a_quarter_of_the_image(folder):
    hf, model = _pair(folder, **CONFIGS["b0-shape"])
    x = torch.randn(1, 3, 128, 96)
    with torch.no_grad():
        ref, out = hf(pixel_values=x).logits, model(x).logits
    assert out.shape == (1, 7, 32, 24)
    torch.testing.assert_close(out, ref, rtol=1e-4, atol=1e-4)


def test_encoder_alone_equals_segformer_model(folder):
    hf, model = _pair(folder, T.SegformerModel, **{k: v for k, v in CONFIGS["three-stages"].items()
                                                   if k != "num_labels"})
    assert model.head is None
    x = torch.randn(2, 3, 48, 40)
    with torch.no_grad():
        ref = hf(pixel_values=x, output_hidden_states=True)
        out = model(x, return_hidden=True)
    assert out.logits is None
    torch.testing.assert_close(out.last_hidden_state, ref.last_hidden_state, rtol=1e-4, atol=1e-4)
    for a, b in zip(out.hidden_states, ref.hidden_states):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-4)
    with pytest.raises(ValueError, match="num_labels > 0"):
        model.segment(Image.new("RGB", (8, 8)))


@pytest.mark.parametrize("ignore_index", [255, -100])
def test_loss_equals_transformers_with_ignored_pixels(folder, ignore_index):
    hf, model = _pair(folder, **CONFIGS["three-stages"], semantic_loss_ignore_index=ignore_index)
    g = torch.Generator().manual_seed(3)
    x = torch.randn(2, 3, 40, 56, generator=g)
    labels = torch.randint(0, 5, (2, 40, 56), generator=g)
    labels[torch.rand(labels.shape, generator=g) < 0.3] = ignore_index
    with torch.no_grad():
        ref, out = hf(pixel_values=x, labels=labels), model(x, labels=labels)
    torch.testing.assert_close(out.loss, ref.loss, rtol=1e-5, atol=1e-6)
    small = labels[:, ::3, ::2]  # labels at another size than the image: the logits are upsampled to them
    with torch.no_grad():
        torch.testing.assert_close(model(x, labels=small).loss, hf(pixel_values=x, labels=small).loss,
                                   rtol=1e-5, atol=1e-6)


def test_binary_loss_equals_transformers(folder):
    hf, model = _pair(folder, **{**TINY, "num_labels": 1})
    g = torch.Generator().manual_seed(4)
    x = torch.randn(2, 3, 32, 48, generator=g)
    labels = torch.randint(0, 2, (2, 32, 48), generator=g)
    labels[:, :5] = 255
    with torch.no_grad():
        torch.testing.assert_close(model(x, labels=labels).loss, hf(pixel_values=x, labels=labels).loss,
                                   rtol=1e-5, atol=1e-6)


def test_loss_trains_every_parameter_and_labels_are_checked(folder):
    _, model = _pair(folder, **TINY, drop_path_rate=0.2, hidden_dropout_prob=0.1)
    model.train()
    x = torch.randn(2, 3, 32, 32)
    model(x, labels=torch.randint(0, 3, (2, 32, 32))).loss.backward()
    assert all(p.grad is not None for p in model.parameters())
    with pytest.raises(ValueError, match="labels must be a"):
        model(x, labels=torch.zeros(2, 32, dtype=torch.long))
    with pytest.raises(ValueError, match="channels"):
        model(torch.randn(1, 4, 32, 32))


@pytest.mark.parametrize("backend", ["sdpa", "chunked"])
def test_backends_agree(folder, backend):
    _, model = _pair(folder, **CONFIGS["b0-shape"])
    x = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        want = model(x).logits
        got = model.set_backend(backend)(x).logits
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-5)


def test_segment_equals_post_process_semantic_segmentation(folder):
    from transformers import SegformerImageProcessorPil

    hf = _save(folder, **CONFIGS["three-stages"])
    proc = SegformerImageProcessorPil(size={"height": 48, "width": 64}, image_mean=[0.4, 0.5, 0.6],
                                      image_std=[0.2, 0.25, 0.3])
    proc.save_pretrained(folder)
    model = qkv.load(folder)
    assert model.config.image_size == [48, 64] and model.config.image_mean == [0.4, 0.5, 0.6]
    rng = np.random.default_rng(0)
    images = [Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8)) for h, w in ((50, 70), (48, 64),
                                                                                             (91, 13))]
    inputs = proc(images, return_tensors="pt")["pixel_values"]
    torch.testing.assert_close(model.preprocess(images), inputs, rtol=0, atol=1e-6)
    with torch.no_grad():
        outputs = hf(pixel_values=inputs)
    want = proc.post_process_semantic_segmentation(outputs, target_sizes=[(im.height, im.width) for im in images])
    got = model.segment(images, batch_size=2)
    assert len(got) == 3
    for g, w, im in zip(got, want, images):
        assert g.shape == (im.height, im.width) and g.dtype == torch.int64
        assert torch.equal(g, w)
    path = folder / "img.png"
    images[2].save(path)
    assert torch.equal(model.segment(str(path)), want[2])  # one image (a path) gives one map


def test_segformer_config_validation():
    with pytest.raises(ValueError, match="one value per stage"):
        SegformerConfig(depths=[2, 2, 2])
    with pytest.raises(ValueError, match=r"dims\[1\]=64 is not divisible by n_heads\[1\]=3"):
        SegformerConfig(n_heads=[1, 3, 5, 8])
    with pytest.raises(ValueError, match="sr_ratios"):
        SegformerConfig(sr_ratios=[8, 4, 2, 0])
    with pytest.raises(TypeError, match="depths"):
        SegformerConfig(depths=[2, 2.5, 2, 2])


def _hf_config(**overrides) -> dict:
    return {**T.SegformerConfig(**TINY).to_dict(), **overrides}


def test_every_field_transformers_writes_is_in_the_table():
    cfg = _hf_config()
    assert not sorted(k for k in cfg if k not in SEGFORMER)
    family, config = config_from_hf(cfg)
    assert family == "segmentation" and config.dims == [8, 16] and config.norm_eps == 1e-5


def test_unknown_field_is_refused_by_name(folder):
    _save(folder, **TINY)
    cfg = json.loads((folder / "config.json").read_text())
    cfg["attention_sink_tokens"] = 4
    (folder / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(ConversionError, match=r"field attention_sink_tokens=4 is not implemented by qkv's SegFormer"):
        qkv.load(folder)


@pytest.mark.parametrize("name", [n for n, r in SEGFORMER.items() if isinstance(r, Only)])
def test_fixed_fields_refuse_other_values(name):
    rule = SEGFORMER[name]
    other = {bool: lambda v: not v, dict: lambda v: {"0": [1]}, type(None): lambda v: 7}[type(rule.values[0])]
    with pytest.raises(ConversionError, match=rf"\b{name}=.*not implemented by qkv's SegFormer"):
        config_from_hf(_hf_config(**{name: other(rule.values[0])}))


_WRONG = {"int": "3", "float": [0.1], "ids": {"a": 1}, "floats": "0.5", "str": 3, "bool": "yes"}


@pytest.mark.parametrize("name", [n for n, r in SEGFORMER.items() if isinstance(r, Read) and r.kind in _WRONG])
def test_implemented_fields_are_type_checked(name):
    with pytest.raises(ConversionError, match=rf"\b{name}\b"):
        config_from_hf(_hf_config(**{name: _WRONG[SEGFORMER[name].kind]}))


def test_unsupported_settings_are_refused_by_name(folder):
    with pytest.raises(ConversionError, match="hidden_sizes.*one value per stage"):
        config_from_hf(_hf_config(hidden_sizes=[8, 16, 32]))
    with pytest.raises(ConversionError, match="architectures.*SegformerForImageClassification"):
        config_from_hf(_hf_config(architectures=["SegformerForImageClassification"]))
    with pytest.raises(ConversionError, match="num_attention_heads"):
        config_from_hf(_hf_config(num_attention_heads=[3, 2]))  # 8 is not divisible by 3
    for bad, field in (({"do_normalize": False}, "do_normalize"), ({"size": {"shortest_edge": 64}}, "size"),
                       ({"rescale_factor": 1.0}, "rescale_factor"), ({"resample": 9}, "resample")):
        with pytest.raises(ConversionError, match=rf"preprocessor_config.json field {field}="):
            config_from_hf(_hf_config(), extra=bad)
    _save(folder, **TINY)
    from safetensors.torch import load_file, save_file

    sd = load_file(folder / "model.safetensors")
    sd["decode_head.extra.weight"] = torch.zeros(1)
    save_file(sd, folder / "model.safetensors")
    with pytest.raises(ConversionError, match="decode_head.extra.weight"):
        qkv.load(folder)


def test_qkv_save_round_trip_and_explain_capture(folder, tmp_path):
    from qkv.explain.capture import capture
    from qkv.train.checkpoint import save_pretrained

    _, model = _pair(folder, **TINY)
    saved = tmp_path / "native"
    save_pretrained(model, saved)
    again = qkv.load(saved)
    x = torch.randn(1, 3, 32, 40)
    with torch.no_grad(), capture(again) as cap:
        out = again(x, return_weights=True)
    # the round trip is exact; asking for weights takes another attention kernel (float rounding apart)
    with torch.no_grad():
        torch.testing.assert_close(again(x).logits, model(x).logits, rtol=0, atol=0)
        torch.testing.assert_close(out.logits, model(x).logits, rtol=1e-5, atol=1e-6)
    assert [(m.kind, m.tq, m.tk) for m in cap.maps] == [("self", 80, 20), ("self", 20, 20)]
    torch.testing.assert_close(cap.maps[0].dense, out.attentions[0][0], rtol=1e-5, atol=1e-6)
    shutil.rmtree(saved, ignore_errors=True)
