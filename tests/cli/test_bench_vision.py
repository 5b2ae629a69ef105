"""`qkv bench vision` on tiny configs: each row times both sides and their outputs agree."""

import pytest

pytest.importorskip("transformers", reason="the vision bench needs transformers: pip install -e '.[test]'")

from qkv.cli import bench_vision  # noqa: E402


def _check(row: dict) -> None:
    assert row["qkv_s"] > 0 and row["baseline_s"] > 0
    assert abs(row["speedup"] - row["baseline_s"] / row["qkv_s"]) < 1e-9
    assert float(row["check"].removeprefix("max rel. diff ")) < 1e-4, row["check"]


def test_tiny_rows_agree_and_render():
    rows = [
        bench_vision.bench_detection(repeat=1, image=(48, 64), config=dict(
            hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=48, image_size=[64, 96],
            patch_size=16, num_detection_tokens=5, num_labels=4, use_mid_position_embeddings=False)),
        bench_vision.bench_segmentation(repeat=1, image=(64, 48), config=dict(
            num_encoder_blocks=2, depths=[1, 1], sr_ratios=[2, 1], hidden_sizes=[8, 16], patch_sizes=[7, 3],
            strides=[4, 2], num_attention_heads=[1, 2], mlp_ratios=[4, 4], decoder_hidden_size=16, num_labels=3)),
        bench_vision.bench_captioning(repeat=1, tokens=5, encoder=dict(
            hidden_size=32, num_hidden_layers=1, num_attention_heads=2, intermediate_size=48, image_size=32,
            patch_size=8), decoder=dict(n_embd=24, n_layer=1, n_head=2, vocab_size=50, n_positions=16, bos_token_id=1,
                                        eos_token_id=2, add_cross_attention=True, is_decoder=True)),
    ]
    for row in rows:
        _check(row)
    table = bench_vision.format_table({"speed": rows}, markdown=True)
    assert table.count("\n") == 4 and "max rel. diff" in table
