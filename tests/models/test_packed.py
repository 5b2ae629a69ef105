"""Packed text-encoder passes (`TextEncoder.packed_rows`, `embed_ids`): texts laid end to end in one
row, each attending only to itself, equal to running each text alone in float64."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from qkv.models import TextEncoder, TextEncoderConfig
from qkv.models.text_encoder import POOLING


def _model(seed: int, pooling: str, normalize: bool, type_vocab: int) -> TextEncoder:
    torch.manual_seed(seed)
    cfg = TextEncoderConfig(vocab_size=97, dim=24, n_layers=2, n_heads=3, ffn_dim=40, max_positions=48,
                            max_length=40, type_vocab_size=type_vocab, pooling=pooling, normalize=normalize,
                            dropout=0.0, attn_dropout=0.0)
    return TextEncoder(cfg).init_weights().eval()


def _alone(model: TextEncoder, ids: list[int], types: list[int] | None) -> torch.Tensor:
    """The float64 reference: the text run by itself through `forward` and `pool`."""
    x = torch.tensor([ids])
    tt = None if types is None else torch.tensor([types])
    with torch.no_grad():
        out = model(x, torch.ones_like(x), tt)
        return model.pool(out.last_hidden_state, torch.ones_like(x))[0]


@settings(max_examples=25, deadline=None)
@given(seed=st.integers(0, 2**16), pooling=st.sampled_from(POOLING), normalize=st.booleans(),
       type_vocab=st.sampled_from([0, 2]), lengths=st.lists(st.integers(1, 40), min_size=1, max_size=7),
       max_tokens=st.sampled_from([1, 16, 50, 4096]))
def test_embed_ids_equals_each_text_alone(seed, pooling, normalize, type_vocab, lengths, max_tokens):
    model = _model(seed % 7, pooling, normalize, type_vocab)
    g = torch.Generator().manual_seed(seed)
    ids = [torch.randint(1, 97, (n,), generator=g).tolist() for n in lengths]
    types = [torch.randint(0, 2, (n,), generator=g).tolist() for n in lengths] if type_vocab else None
    got = model.embed_ids(ids, types, max_tokens=max_tokens)
    ref = torch.stack([_alone(model.double(), x, None if types is None else types[i]) for i, x in enumerate(ids)])
    model.float()
    assert got.shape == (len(ids), 24) and got.dtype == torch.float32
    torch.testing.assert_close(got.double(), ref, atol=2e-5, rtol=1e-4)


def test_packed_rows_split_at_max_tokens_and_keep_long_texts_whole():
    model = _model(0, "mean", False, 2)
    ids = [[5] * 10, [6] * 10, [7] * 30, [8] * 3]
    rows = [(index.tolist(), hidden.shape[0], segments.tolist()) for index, hidden, segments in
            model.packed_rows(ids, max_tokens=25)]
    assert [r[0] for r in rows] == [[0, 1], [2], [3]]  # the 30-token text is longer than a row: alone
    assert [r[1] for r in rows] == [20, 30, 3]
    assert rows[0][2] == [0] * 10 + [1] * 10


def test_type_ids_change_the_embedding_as_in_forward():
    model = _model(1, "cls", False, 2).double()
    ids = [[3, 4, 5, 6], [7, 8, 9]]
    types = [[0, 0, 1, 1], [0, 1, 1]]
    got = model.embed_ids(ids, types).double()
    assert not torch.allclose(got, model.embed_ids(ids).double())
    torch.testing.assert_close(got[0], _alone(model, ids[0], types[0]), atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize(("ids", "types", "kw", "match"), [
    ([[1, 2], []], None, {}, "text 1 has 0 tokens"),
    ([[1] * 41], None, {}, "text 0 has 41 tokens; each text needs 1 to 40"),
    ([[1, 2]], [[0]], {}, "type_ids must hold one list per text"),
    ([[1, 2]], None, {"max_tokens": 0}, "max_tokens must be an int >= 1, got 0"),
])
def test_packed_rows_refuse_bad_input_by_name(ids, types, kw, match):
    with pytest.raises(ValueError, match=match):
        _model(0, "mean", False, 2).embed_ids(ids, types, **kw)


def test_rows_run_at_few_lengths_and_the_padding_changes_nothing():
    from qkv.models._base import shape_bucket

    sizes = {shape_bucket(n) for n in range(1, 4097)}
    assert len(sizes) <= 80 and all(n <= shape_bucket(n) <= n * 9 / 8 for n in range(1, 4097))
    model = _model(2, "mean", False, 2)
    seen = []
    model.encoder.register_forward_pre_hook(lambda mod, args: seen.append(args[0].shape[1]))
    ids = [[4] * 9, [5] * 8]  # 17 tokens: run as a row of 18, one padding token
    got = model.embed_ids(ids)
    assert seen == [shape_bucket(17)] == [18]
    torch.testing.assert_close(got, torch.stack([_alone(model, x, None) for x in ids]), atol=2e-5, rtol=1e-4)


def test_classify_ids_equals_classify_and_needs_the_head():
    from chat_helpers import tiny_tokenizer

    tok = tiny_tokenizer(None)
    torch.manual_seed(4)
    cfg = TextEncoderConfig(vocab_size=tok.vocab_size, dim=32, n_layers=2, n_heads=2, ffn_dim=48, max_positions=64,
                            max_length=32, pad_token_id=tok.pad_id, head="sequence_classification", num_labels=3)
    model = TextEncoder(cfg).init_weights().eval()
    model.tokenizer = tok
    texts = ["the sky is blue", "a", "hello there, how are you today?", "music under the green light"]
    ids, types = zip(*(tok.encode_with_types(t) for t in texts))
    got = model.classify_ids(ids, types)
    ref = torch.tensor([[r["scores"][str(c)] for c in range(3)] for r in model.classify(texts)])
    torch.testing.assert_close(got, ref, atol=1e-5, rtol=1e-4)
    with pytest.raises(ValueError, match="head='sequence_classification'"):
        _model(0, "mean", False, 2).classify_ids([[1, 2]])
