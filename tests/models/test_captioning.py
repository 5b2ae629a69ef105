"""Image captioning (ViT encoder + cross-attending GPT-2 decoder): the same logits, loss and generated tokens
as transformers' VisionEncoderDecoderModel on the same weights, loaded from its saved folder."""

import contextlib
import json
import shutil
import tempfile
from pathlib import Path

import numpy as np
import pytest
import torch

transformers = pytest.importorskip("transformers", reason="parity tests need transformers: pip install -e '.[test]'")

import qkv  # noqa: E402
from qkv.convert import ConversionError  # noqa: E402
from qkv.models import CaptionerConfig, ImageCaptioner  # noqa: E402
from vision_task_helpers import word_tokenizer  # noqa: E402

T = transformers
VOCAB = 60
ENC = dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=48, image_size=16,
           patch_size=4)
DEC = dict(n_embd=24, n_layer=2, n_head=4, vocab_size=VOCAB, n_positions=64, bos_token_id=1, eos_token_id=2)
# (encoder overrides, decoder overrides): widths that differ (enc_to_dec_proj) and that match (none)
SIZES = {
    "proj": ({}, {}),
    "same-width": (dict(hidden_size=24, num_attention_heads=2, num_hidden_layers=1, pooler=False),
                   dict(n_layer=3, n_head=2, activation_function="relu", n_inner=40)),
    "wide-decoder": (dict(image_size=[16, 24], patch_size=8, hidden_size=16, num_attention_heads=2),
                     dict(n_embd=48, n_head=6, tie_word_embeddings=False)),
}


def _hf(enc: dict, dec: dict, seed: int = 0, start: int = 5, pad: int = 0):
    """A random VisionEncoderDecoderModel; weights drawn wider than transformers' init so that greedy and beam
    search do not collapse onto one repeated token."""
    torch.manual_seed(seed)
    enc = dict(enc)
    pooler = enc.pop("pooler", True)  # transformers' captioner never reads it; checkpoints have it or not
    encoder = T.ViTModel(T.ViTConfig(**{**ENC, **enc}, attn_implementation="eager"), add_pooling_layer=pooler)
    decoder = T.GPT2LMHeadModel(T.GPT2Config(**{**DEC, **dec}, add_cross_attention=True, is_decoder=True,
                                             attn_implementation="eager"))
    hf = T.VisionEncoderDecoderModel(encoder=encoder, decoder=decoder).eval()
    with torch.no_grad():
        for name, p in hf.named_parameters():
            if p.dim() > 1:
                p.normal_(0.0, 0.25 if "wte" in name or "lm_head" in name else 0.1)
    hf.config.decoder_start_token_id, hf.config.pad_token_id = start, pad
    return hf


@contextlib.contextmanager
def _folder():
    path = Path(tempfile.mkdtemp(prefix="qkv-caption-"))
    try:
        yield path
    finally:
        shutil.rmtree(path, ignore_errors=True)


def _pair(enc=None, dec=None, generation: dict | None = None, **kw):
    """(transformers model, qkv model loaded from its saved folder); ``generation``: generation_config settings."""
    hf = _hf(enc or {}, dec or {}, **kw)
    for k, v in (generation or {}).items():
        setattr(hf.generation_config, k, v)
    with _folder() as path:
        hf.save_pretrained(path)
        model = qkv.load(path)
    return hf, model


def _pixels(hf, B: int, seed: int = 1) -> torch.Tensor:
    size = hf.config.encoder.image_size
    h, w = (size, size) if isinstance(size, int) else size
    return torch.randn(B, 3, h, w, generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("name", sorted(SIZES))
def test_logits_equal_transformers(name):
    enc, dec = SIZES[name]
    hf, model = _pair(enc, dec)
    assert isinstance(model, ImageCaptioner)
    assert (model.project is not None) == (hf.config.encoder.hidden_size != hf.config.decoder.n_embd)
    x = _pixels(hf, 3)
    ids = torch.randint(0, VOCAB, (3, 7), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        ref = hf(pixel_values=x, decoder_input_ids=ids, output_attentions=True)
        out = model(x, ids, return_weights=True)
    torch.testing.assert_close(out.logits, ref.logits, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(out.encoder_last_hidden_state, ref.encoder_last_hidden_state, rtol=1e-4, atol=1e-4)
    assert len(out.cross_attentions) == len(ref.cross_attentions) == hf.config.decoder.n_layer
    for a, b in zip(out.cross_attentions, ref.cross_attentions):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)
    for a, b in zip(out.attentions, ref.decoder_attentions):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)


def test_loss_with_labels_equals_transformers():
    """Labels shifted right behind config.json's decoder_start_token_id, -100 written as the pad id and ignored."""
    hf, model = _pair(start=5, pad=3)
    assert model.config.label_start_token_id == 5  # generation starts from bos (generation_config.json has none)
    x = _pixels(hf, 2)
    labels = torch.randint(0, VOCAB, (2, 6), generator=torch.Generator().manual_seed(3))
    labels[0, 4:], labels[1, 2] = -100, -100
    with torch.no_grad():
        ref = hf(pixel_values=x, labels=labels)
        out = model(x, labels=labels)
    torch.testing.assert_close(out.logits, ref.logits, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(out.loss, ref.loss, rtol=1e-5, atol=1e-5)
    assert torch.equal(model.shift_labels(labels)[:, 0], torch.full((2,), 5))


def _stops(model, x):
    """Tokens the free beams emit early, so that they end hypotheses mid-search."""
    free = model.generate(x, max_new_tokens=8, num_beams=3, num_return_sequences=3, eos_token_id=[])
    return sorted({int(free[0, 3]), int(free[4, 2])})


SETTINGS = [{"num_beams": 1}, {"num_beams": 3}, {"num_beams": 4, "num_return_sequences": 2, "length_penalty": 0.5},
            {"num_beams": 3, "early_stopping": True},
            {"num_beams": 2, "early_stopping": "never", "length_penalty": 2.0}]


@pytest.mark.parametrize("name", ["proj", "wide-decoder"])
def test_greedy_and_beam_tokens_equal_transformers(name):
    hf, model = _pair(*SIZES[name])
    x = _pixels(hf, 3)
    stops = _stops(model, x)
    ended = False
    for kw in SETTINGS:
        for eos in ([], stops):
            with torch.no_grad():
                ref = hf.generate(pixel_values=x, max_new_tokens=8, do_sample=False, pad_token_id=0,
                                  eos_token_id=eos or None, **kw)
            got = model.generate(x, max_new_tokens=8, pad_token_id=0, eos_token_id=eos, **kw)
            assert got.shape == ref.shape and torch.equal(got, ref), (kw, eos, got.tolist(), ref.tolist())
            ended |= bool(eos) and bool(torch.isin(got[:, 1:-1], torch.tensor(eos)).any())
    assert ended, "the chosen stop tokens never ended a caption early: the test lost its point"


def test_checkpoint_generation_settings_are_followed():
    """Start, stop and pad tokens and beam settings from the folder, with no options given."""
    hf, model = _pair(generation=dict(decoder_start_token_id=4, num_beams=3, length_penalty=0.7,
                                      early_stopping=True, max_new_tokens=9, pad_token_id=0))
    x = _pixels(hf, 2)
    eos = _stops(model, x)[0]
    hf.generation_config.eos_token_id = eos
    with _folder() as path:
        hf.save_pretrained(path)
        model = qkv.load(path)
    assert model.config.decoder_start_token_id == 4 and model.config.label_start_token_id == 5
    with torch.no_grad():
        ref = hf.generate(pixel_values=x)
    got = model.generate(x)
    assert got[0, 0] == 4 and torch.equal(got, ref), (got.tolist(), ref.tolist())
    greedy = model.generate(x, num_beams=1)
    with torch.no_grad():
        assert torch.equal(greedy, hf.generate(pixel_values=x, num_beams=1))


def test_tokens_without_generation_config_come_from_the_configs():
    hf = _hf({}, {}, start=7, pad=3)
    with _folder() as path:
        hf.save_pretrained(path)
        (path / "generation_config.json").unlink()
        model = qkv.load(path)
        with torch.no_grad():
            reloaded = T.VisionEncoderDecoderModel.from_pretrained(path).eval()
    c = model.config
    assert (c.decoder_start_token_id, c.eos_token_id, c.pad_token_id, c.label_start_token_id) == (7, 2, 3, None)
    x = _pixels(hf, 2)
    with torch.no_grad():
        ref = reloaded.generate(pixel_values=x, max_new_tokens=6)
    assert torch.equal(model.generate(x, max_new_tokens=6), ref)


def test_sampling_is_deterministic_by_seed():
    hf, model = _pair()
    x = _pixels(hf, 2)
    a = model.generate(x, max_new_tokens=10, do_sample=True, temperature=1.5, seed=11, eos_token_id=[])
    b = model.generate(x, max_new_tokens=10, do_sample=True, temperature=1.5, seed=11, eos_token_id=[])
    c = model.generate(x, max_new_tokens=10, do_sample=True, temperature=1.5, seed=12, eos_token_id=[])
    assert torch.equal(a, b) and not torch.equal(a, c)
    greedy = model.generate(x, max_new_tokens=10, eos_token_id=[])
    assert torch.equal(model.generate(x, max_new_tokens=10, do_sample=True, top_k=1, seed=3, eos_token_id=[]), greedy)
    many = model.generate(x, max_new_tokens=5, do_sample=True, seed=1, num_return_sequences=3, eos_token_id=[])
    assert many.shape == (6, 6)


def test_cached_decoding_equals_full_forward():
    hf, model = _pair()
    x = _pixels(hf, 2)
    ids = torch.randint(0, VOCAB, (2, 9), generator=torch.Generator().manual_seed(4))
    with torch.no_grad():
        full = model(x, ids).logits
        enc = model.encode(x)
        cache = qkv.nn.KVCache(model.config.decoder.n_layers)
        steps = [model(input_ids=ids[:, :3], encoder_output=enc, cache=cache).logits]
        steps += [model(input_ids=ids[:, t : t + 1], encoder_output=enc, cache=cache).logits for t in range(3, 9)]
    torch.testing.assert_close(torch.cat(steps, dim=1), full, atol=1e-5, rtol=1e-5)


def test_caption_images_with_the_folders_processor_and_tokenizer():
    from PIL import Image

    hf = _hf({}, {})
    proc = T.ViTImageProcessorPil(size={"height": 16, "width": 16}, image_mean=[0.4, 0.5, 0.6],
                                  image_std=[0.2, 0.25, 0.3])
    with _folder() as path:
        hf.save_pretrained(path)
        proc.save_pretrained(path)
        word_tokenizer(path, VOCAB)
        model = qkv.load(path)
        tok = T.PreTrainedTokenizerFast(tokenizer_file=str(path / "tokenizer.json"))
    rng = np.random.default_rng(0)
    images = [Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8)) for h, w in ((20, 30), (16, 16))]
    pixels = proc(images, return_tensors="pt")["pixel_values"]
    torch.testing.assert_close(model.preprocess(images), pixels, rtol=0, atol=1e-6)
    with torch.no_grad():
        ref = hf.generate(pixel_values=pixels, max_new_tokens=7, num_beams=2)
    want = [t.strip() for t in tok.batch_decode(ref[:, 1:], skip_special_tokens=True)]
    assert model.caption(images, max_new_tokens=7, num_beams=2) == want
    assert model.caption(images[0], max_new_tokens=7, num_beams=2) == want[0]
    both = model.caption(images[0], max_new_tokens=4, num_beams=3, num_return_sequences=2)
    assert isinstance(both, list) and len(both) == 2


def _saved_config(change) -> dict:
    hf = _hf({}, {})
    with _folder() as path:
        hf.save_pretrained(path)
        cfg = json.loads((path / "config.json").read_text())
        change(cfg)
        (path / "config.json").write_text(json.dumps(cfg))
        with pytest.raises(ConversionError) as e:
            qkv.load(path)
    return str(e.value)


@pytest.mark.parametrize("where,field", [(None, "attention_sink_tokens"), ("encoder", "attention_sink_tokens"),
                                         ("decoder", "attention_sink_tokens"), ("decoder", "scale_attn_weights"),
                                         ("decoder", "cross_attention_hidden_size")])
def test_unknown_or_unimplemented_fields_are_refused_by_name(where, field):
    value = {"scale_attn_weights": False, "cross_attention_hidden_size": 32}.get(field, 4)

    def change(cfg):
        (cfg if where is None else cfg[where])[field] = value

    message = _saved_config(change)
    assert f"{field}={value}" in message and "not implemented by qkv's" in message, message
    if where:
        assert f"({where})" in message, message


def test_other_pairs_are_refused_by_name():
    msg = _saved_config(lambda cfg: cfg["decoder"].update(add_cross_attention=False))
    assert "decoder.add_cross_attention" in msg
    msg = _saved_config(lambda cfg: cfg["decoder"].update(model_type="bert"))
    assert "decoder.model_type='bert'" in msg
    msg = _saved_config(lambda cfg: cfg.pop("encoder"))
    assert "'encoder'" in msg


def test_config_checks_and_native_round_trip():
    from dataclasses import asdict

    from qkv.models import CausalLMConfig, ViTConfig

    enc = ViTConfig(image_size=16, patch_size=4, dim=32, n_layers=1, n_heads=4, ffn_dim=48)
    dec = CausalLMConfig(vocab_size=VOCAB, dim=24, n_layers=1, n_heads=4, ffn_dim=48, max_positions=16)
    config = CaptionerConfig(enc, dec, decoder_start_token_id=1, eos_token_id=2)
    assert CaptionerConfig(**asdict(config)) == config
    with pytest.raises(ValueError, match="eos_token_id"):
        CaptionerConfig(enc, dec, eos_token_id=VOCAB)
    with pytest.raises(TypeError, match="decoder"):
        CaptionerConfig(enc, "gpt2")
    model = ImageCaptioner(config).init_weights().eval()
    x = torch.randn(1, 3, 16, 16)
    with pytest.raises(ValueError, match="max_new_tokens"):
        model.generate(x, max_new_tokens=16)
    with pytest.raises(ValueError, match="pixel_values"):
        model.generate(torch.randn(3, 16, 16))
    with pytest.raises(ValueError, match="pixel_values.*caption"):
        model.generate(["cat.png"])
    with pytest.raises(ValueError, match="pad_token_id"):
        model(x, labels=torch.zeros(1, 3, dtype=torch.long))
    with pytest.raises(TypeError, match="beams"):
        model.generate(x, beams=2)
    from qkv.train.checkpoint import save_pretrained

    with _folder() as path:
        save_pretrained(model, path)
        again = qkv.load(path)
    assert again.config == config
    assert torch.equal(again.generate(x, max_new_tokens=5), model.generate(x, max_new_tokens=5))
