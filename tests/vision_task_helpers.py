"""Tiny random vision task models (YOLOS, SegFormer, ViT + GPT-2 captioner) saved as folders, and images,
for the tests of `qkv detect|segment|caption` and their explanations."""

import json
from pathlib import Path

import numpy as np
import torch
from hf_models import T, save_family

CRAFTED = "<script>alert(1)</script>"  # a label that must never reach a page as markup
CAPTION_VOCAB = 40


def _widen(model, std: float) -> None:
    """Weights drawn wider than transformers' init, so that random models give varied outputs."""
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() > 1:
                p.normal_(0.0, std)


def word_tokenizer(folder: Path, vocab_size: int = CAPTION_VOCAB) -> None:
    """A word-level tokenizer.json (w3 ... w{vocab_size - 1}, <pad> <s> </s>) with its tokenizer_config.json."""
    from tokenizers import Tokenizer, models, pre_tokenizers

    vocab = {"<pad>": 0, "<s>": 1, "</s>": 2} | {f"w{i}": i for i in range(3, vocab_size)}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<pad>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.add_special_tokens(["<pad>", "<s>", "</s>"])
    tok.save(str(folder / "tokenizer.json"))
    (folder / "tokenizer_config.json").write_text(json.dumps({"pad_token": "<pad>", "eos_token": "</s>",
                                                              "bos_token": "<s>"}))


def yolos_folder(folder: Path) -> Path:
    hf = save_family(folder, "yolos", num_labels=3, id2label={0: CRAFTED, 1: "cat", 2: "dog $x$"})
    _widen(hf, 0.3)
    hf.save_pretrained(folder)
    T.YolosImageProcessorPil(size={"shortest_edge": 32, "longest_edge": 64}).save_pretrained(folder)
    return folder


def segformer_folder(folder: Path) -> Path:
    hf = save_family(folder, "segformer", id2label={0: "sky", 1: CRAFTED, 2: "road"})
    _widen(hf, 0.2)
    hf.save_pretrained(folder)
    T.SegformerImageProcessorPil(size={"height": 64, "width": 64}).save_pretrained(folder)
    return folder


def captioner_folder(folder: Path) -> Path:
    torch.manual_seed(0)
    encoder = T.ViTModel(T.ViTConfig(hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=48,
                                     image_size=16, patch_size=4))
    decoder = T.GPT2LMHeadModel(T.GPT2Config(n_embd=24, n_layer=2, n_head=4, vocab_size=CAPTION_VOCAB, n_positions=64,
                                             bos_token_id=1, eos_token_id=2, add_cross_attention=True,
                                             is_decoder=True))
    hf = T.VisionEncoderDecoderModel(encoder=encoder, decoder=decoder)
    _widen(hf, 0.25)
    hf.config.decoder_start_token_id, hf.config.pad_token_id = 5, 0
    hf.generation_config.decoder_start_token_id = 5
    hf.save_pretrained(folder)
    T.ViTImageProcessorPil(size={"height": 16, "width": 16}).save_pretrained(folder)
    word_tokenizer(folder)
    return folder


def build(root: Path) -> dict:
    """Model folders and two images of different sizes under ``root``."""
    from PIL import Image

    out = {}
    for name, make in (("yolos", yolos_folder), ("segformer", segformer_folder), ("captioner", captioner_folder)):
        (root / name).mkdir()
        out[name] = make(root / name)
    rng = np.random.default_rng(0)
    for name, (h, w) in (("a", (40, 56)), ("b", (37, 29))):
        out[name] = root / f"{name}.png"
        Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8)).save(out[name])
    return out
