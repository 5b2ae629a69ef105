"""`qkv bench vision`: the vision-task models' forward against transformers, same weights, same batch.

- YOLOS-Tiny (`ObjectDetector` vs ``YolosForObjectDetection``): 100 [DET] tokens, position tables stored
  at 800 x 1333 and interpolated to the 512 x 688 input, as a fine-tuned checkpoint runs on smaller images.
- SegFormer-B0 (`SemanticSegmenter` vs ``SegformerForSemanticSegmentation``), 150 classes, 512 x 512.
- ViT-Base/16 + GPT-2 (`ImageCaptioner` vs ``VisionEncoderDecoderModel``): 224 x 224 images and 24
  teacher-forced caption tokens; the logits of every position.

Weights are random (transformers' init), written with ``save_pretrained`` and read with `qkv.load`, so
the converters are on the path too. transformers runs with its default attention (SDPA where the model
has it). ``check`` is the largest difference of the outputs, relative to the largest transformers value.
"""

from __future__ import annotations

import tempfile
from collections.abc import Callable

import torch

import qkv

from .bench import interleaved, rate_table

YOLOS_TINY = dict(hidden_size=192, num_hidden_layers=12, num_attention_heads=3, intermediate_size=768,
                  image_size=[800, 1333], num_detection_tokens=100, use_mid_position_embeddings=False)
SEGFORMER_B0 = dict(num_labels=150)  # transformers' SegformerConfig defaults are MiT-b0
VIT_BASE = dict()  # transformers' ViTConfig defaults are ViT-Base/16 at 224
GPT2_SMALL = dict(add_cross_attention=True, is_decoder=True)  # GPT2Config defaults are GPT-2 small


def _load(hf) -> qkv.models.Model:
    """qkv's model read from ``hf`` saved to a temporary folder (removed afterwards)."""
    with tempfile.TemporaryDirectory(prefix="qkv-bench-vision-") as d:
        hf.save_pretrained(d)
        return qkv.load(d).eval()


def _rel_diff(ours: list[torch.Tensor], theirs: list[torch.Tensor]) -> float:
    return max(float((a - b).abs().max() / b.abs().max()) for a, b in zip(ours, theirs))


def _row(case: str, baseline: str, ours: Callable, theirs: Callable, batch: int, unit: str, repeat: int) -> dict:
    """Check the outputs agree, warm both up, time them interleaved."""
    with torch.inference_mode():
        err = _rel_diff(ours(), theirs())  # also the warm-up run
        tq, tr = interleaved(ours, theirs, repeat)
    return {"case": case, "baseline": baseline, "qkv_s": tq, "baseline_s": tr, "speedup": tr / tq,
            "qkv_per_s": batch / tq, "baseline_per_s": batch / tr, "unit": unit, "check": f"max rel. diff {err:.1e}"}


def bench_detection(repeat: int = 3, batch: int = 1, image: tuple[int, int] = (512, 688), config: dict | None = None,
                    name: str = "YOLOS-Tiny") -> dict:
    import transformers as T

    torch.manual_seed(0)
    hf = T.YolosForObjectDetection(T.YolosConfig(**(YOLOS_TINY if config is None else config))).eval()
    model = _load(hf)
    x = torch.randn(batch, 3, *image)

    def ours():
        out = model(x)
        return [out.logits, out.pred_boxes]

    def theirs():
        out = hf(pixel_values=x)
        return [out.logits, out.pred_boxes]

    return _row(f"{name} detection forward, batch {batch}, {image[0]} x {image[1]}", "transformers Yolos",
                ours, theirs, batch, "images/s", repeat)


def bench_segmentation(repeat: int = 3, batch: int = 2, image: tuple[int, int] = (512, 512),
                       config: dict | None = None, name: str = "SegFormer-B0") -> dict:
    import transformers as T

    torch.manual_seed(0)
    hf = T.SegformerForSemanticSegmentation(T.SegformerConfig(**(SEGFORMER_B0 if config is None else config))).eval()
    model = _load(hf)
    x = torch.randn(batch, 3, *image)
    return _row(f"{name} segmentation forward, batch {batch}, {image[0]} x {image[1]}", "transformers Segformer",
                lambda: [model(x).logits], lambda: [hf(pixel_values=x).logits], batch, "images/s", repeat)


def bench_captioning(repeat: int = 3, batch: int = 2, tokens: int = 24, encoder: dict | None = None,
                     decoder: dict | None = None, name: str = "ViT-Base/16 + GPT-2") -> dict:
    import transformers as T

    torch.manual_seed(0)
    enc = T.ViTModel(T.ViTConfig(**(VIT_BASE if encoder is None else encoder)), add_pooling_layer=False)
    dec = T.GPT2LMHeadModel(T.GPT2Config(**(GPT2_SMALL if decoder is None else decoder)))
    hf = T.VisionEncoderDecoderModel(encoder=enc, decoder=dec).eval()
    hf.config.decoder_start_token_id = hf.config.pad_token_id = dec.config.bos_token_id
    model = _load(hf)
    size = enc.config.image_size
    x = torch.randn(batch, 3, size, size)
    ids = torch.randint(dec.config.vocab_size, (batch, tokens))
    return _row(f"{name} captioning forward, batch {batch}, {size} x {size}, {tokens} tokens",
                "transformers VisionEncoderDecoder", lambda: [model(x, ids).logits],
                lambda: [hf(pixel_values=x, decoder_input_ids=ids).logits], batch, "images/s", repeat)


def run(repeat: int = 3, progress: Callable[[str], None] | None = None) -> dict:
    say = progress or (lambda s: None)
    rows = []
    for what, fn in (("YOLOS-Tiny detection", bench_detection), ("SegFormer-B0 segmentation", bench_segmentation),
                     ("ViT-Base/16 + GPT-2 captioning", bench_captioning)):
        say(f"{what} forward vs transformers")
        rows.append(fn(repeat))
    env = {"torch": torch.__version__, "threads": torch.get_num_threads(), "qkv": qkv.__version__}
    return {"speed": rows, "env": env}


def format_table(result: dict, markdown: bool = False) -> str:
    return rate_table(result, markdown, digits=2)
