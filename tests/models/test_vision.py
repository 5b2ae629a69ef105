"""ViT: same numbers as transformers on the same weights; preprocessing as ViTImageProcessor's."""

import numpy as np
import pytest
import torch

transformers = pytest.importorskip("transformers")
Image = pytest.importorskip("PIL.Image", reason="image tests need Pillow: pip install pillow")

import qkv  # noqa: E402

T = transformers


def _pair(tmp_path, cls, **cfg):
    torch.manual_seed(0)
    hf = cls(T.ViTConfig(**cfg, attn_implementation="eager")).eval()
    hf.save_pretrained(tmp_path)
    return hf, qkv.load(tmp_path)


TINY = dict(image_size=32, patch_size=8, hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
            intermediate_size=96)


@pytest.mark.parametrize("cls,cfg", [(T.ViTModel, TINY), (T.ViTForImageClassification, {**TINY, "num_labels": 7}),
                                     (T.ViTForImageClassification, {"num_labels": 10})],
                         ids=["tiny", "tiny-classifier", "vit-base-16"])
def test_vit_parity(tmp_path, cls, cfg):
    hf, model = _pair(tmp_path, cls, **cfg)
    size = cfg.get("image_size", 224)
    x = torch.randn(2, 3, size, size)
    with torch.no_grad():
        ref = hf(pixel_values=x, output_attentions=True, output_hidden_states=True)
        out = model(x, return_weights=True)
    if cls is T.ViTModel:  # transformers' hidden_states stop before the final norm; last_hidden_state is after it
        torch.testing.assert_close(out.last_hidden_state, ref.last_hidden_state, rtol=1e-4, atol=1e-5)
    for a, b in zip(out.attentions, ref.attentions):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)
    if cls is T.ViTModel:
        torch.testing.assert_close(out.pooled, ref.pooler_output, rtol=1e-4, atol=1e-5)
    else:
        torch.testing.assert_close(out.logits, ref.logits, rtol=1e-4, atol=1e-5)


def test_other_image_sizes_interpolate_positions(tmp_path):
    hf, model = _pair(tmp_path, T.ViTModel, **TINY)
    x = torch.randn(1, 3, 48, 40)
    with torch.no_grad():
        ref = hf(pixel_values=x, interpolate_pos_encoding=True).last_hidden_state
        out = model(x).last_hidden_state
    assert out.shape == (1, 1 + 6 * 5, 64)
    torch.testing.assert_close(out, ref, rtol=1e-4, atol=1e-5)


def test_preprocessing_equals_vit_image_processor(tmp_path):
    from transformers import ViTImageProcessorPil

    proc = ViTImageProcessorPil(size={"height": 32, "width": 32}, image_mean=[0.4, 0.5, 0.6], image_std=[0.2, 0.25, 0.3])
    proc.save_pretrained(tmp_path)
    _, model = _pair(tmp_path, T.ViTForImageClassification, **TINY, num_labels=3)
    model = qkv.load(tmp_path)
    rng = np.random.default_rng(0)
    images = [Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8)) for h, w in ((50, 70), (32, 32), (91, 13))]
    want = proc(images, return_tensors="pt")["pixel_values"]
    got = model.preprocess(images)
    torch.testing.assert_close(got, want, rtol=0, atol=1e-6)
    path = tmp_path / "img.png"
    images[0].save(path)
    torch.testing.assert_close(model.preprocess([str(path)]), want[:1], rtol=0, atol=1e-6)
    torch.testing.assert_close(model.preprocess([np.asarray(images[0])]), want[:1], rtol=0, atol=1e-6)
    result = model.classify(images[0], top=2)
    with torch.no_grad():
        probs = model(want[:1]).logits.softmax(-1)[0]
    assert result["label"] == f"LABEL_{int(probs.argmax())}" and abs(result["score"] - float(probs.max())) < 1e-6
    assert len(model.classify(images)) == 3


# --- stem="strided": stride-2 convolutions (BatchNorm, GELU) in place of the patch projection's big kernel ---

def _strided(**cfg):
    from qkv.models import ViTConfig, VisionTransformer

    torch.manual_seed(0)
    base = dict(image_size=64, patch_size=8, dim=32, n_layers=1, n_heads=4, ffn_dim=48, stem="strided")
    return VisionTransformer(ViTConfig(**{**base, **cfg})).eval()


@pytest.mark.parametrize("cfg,shape,grid", [({"image_size": 128}, (2, 3, 128, 128), (16, 16)),
                                            ({"image_size": [128, 32], "patch_size": [8, 2]}, (2, 3, 128, 32),
                                             (16, 16)),
                                            ({"image_size": [64], "patch_size": [4], "channels": 1, "input": "signal"},
                                             (2, 1, 64), (16,))],
                         ids=["square", "per-axis-patches", "1-d"])
def test_strided_stem_embeds_one_token_per_patch_and_is_shift_equivariant(cfg, shape, grid):
    model = _strided(**cfg)
    patch = model.config.patch
    x = torch.randn(shape)
    with torch.no_grad():
        emb = model.patch(model.stem(x))  # (B, C, *grid)
        assert tuple(emb.shape[2:]) == grid
        assert model(x).last_hidden_state.shape == (2, 1 + int(np.prod(grid)), 32)
        # moving the input by one patch moves the embeddings by one grid cell (away from the zero padding)
        moved = model.patch(model.stem(torch.roll(x, shifts=patch, dims=tuple(range(2, x.dim())))))
    edge = len(model.config.stem_widths())  # cells that see the wrapped-around border: about one per convolution
    inner = tuple(slice(edge + 1, -edge) for _ in grid)
    rolled = torch.roll(emb, shifts=(1,) * len(grid), dims=tuple(range(2, emb.dim())))
    torch.testing.assert_close(moved[(..., *inner)], rolled[(..., *inner)], rtol=1e-5, atol=1e-5)
    params = sum(p.numel() for p in model.parameters())
    assert abs(model.config.parameter_estimate() - params) <= 0.02 * params


def test_strided_stem_survives_save_and_load(tmp_path):
    from qkv.train.checkpoint import save_pretrained

    model = _strided(num_labels=5)
    model.train()
    with torch.no_grad():  # training-mode batches move the BatchNorm running statistics off their defaults
        for _ in range(3):
            model(torch.randn(4, 3, 64, 64) * 2 + 1)
    model.eval()
    save_pretrained(model, tmp_path)
    back = qkv.load(tmp_path).eval()
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        torch.testing.assert_close(back(x).logits, model(x).logits, rtol=0, atol=0)
    assert not torch.equal(model.stem[1].running_mean, torch.zeros_like(model.stem[1].running_mean))


def test_strided_stem_refuses_patches_that_are_not_powers_of_two():
    from qkv.models import ViTConfig

    with pytest.raises(ValueError, match=r"stem='strided'.*patch_size=6.*power of two"):
        ViTConfig(image_size=48, patch_size=6, dim=32, n_layers=1, n_heads=4, ffn_dim=48, stem="strided")
