"""Bad input is refused once, at the entry point, with a message naming the argument, what was seen and the fix."""

import pytest
import torch

import qkv


def t(*shape, dtype=torch.float32):
    return torch.randn(*shape, dtype=dtype)


Q, K, V = t(2, 4, 5, 8), t(2, 2, 7, 8), t(2, 2, 7, 8)

CASES = [
    # (kwargs overriding q/k/v/options, exception, words the message must contain)
    (dict(q=t(4, 5, 8)), ValueError, ["q must have 4 dims", "(4, 5, 8)", "unsqueeze(0)"]),
    (dict(k=t(2, 2, 7, 8, 1)), ValueError, ["k must have 4 dims", "(2, 2, 7, 8, 1)"]),
    (dict(q=[1.0]), TypeError, ["q must be a torch.Tensor"]),
    (dict(q=torch.ones(2, 4, 5, 8, dtype=torch.long)), TypeError, ["q has dtype torch.int64"]),
    (dict(k=t(3, 2, 7, 8), v=t(3, 2, 7, 8)), ValueError, ["batch sizes differ", "(3, 2, 7, 8)"]),
    (dict(k=t(2, 2, 7, 16), v=t(2, 2, 7, 16)), ValueError, ["head dims differ", "D=8", "D=16"]),
    (dict(v=t(2, 2, 6, 8)), ValueError, ["length", "(2, 2, 6, 8)"]),
    (dict(k=t(2, 3, 7, 8), v=t(2, 3, 7, 8)), ValueError, ["4 heads", "3", "Hq % Hkv"]),
    (dict(k=t(2, 2, 7, 8, dtype=torch.float64)), TypeError, ["share a dtype", "torch.float64", ".to(q.dtype)"]),
    (dict(mask=torch.ones(5, 7)), TypeError, ["mask has dtype torch.float32", "bias="]),
    (dict(mask=torch.ones(5, 6, dtype=torch.bool)), ValueError, ["mask of shape (5, 6)", "(B, Hq, Tq, Tk) = (2, 4, 5, 7)"]),
    (dict(mask=torch.ones(3, 4, 5, 7, dtype=torch.bool)), ValueError, ["not broadcastable"]),
    (dict(mask="causal"), TypeError, ["mask must be None, a qkv.masks.Mask"]),
    (dict(bias=t(5, 6)), ValueError, ["bias of shape (5, 6)", "(2, 4, 5, 7)"]),
    (dict(bias=torch.ones(5, 7, dtype=torch.long)), TypeError, ["bias has dtype torch.int64"]),
    (dict(backend="fast"), ValueError, ["unknown backend 'fast'", "chunked"]),
    (dict(backend="sdpa", return_weights=True), ValueError, ["backend='sdpa'", "return_weights=True", "chunked"]),
    (dict(backend="sdpa", return_lse=True), ValueError, ["return_lse=True"]),
    (dict(backend="sdpa", score_mod=qkv.scores.softcap(5.0)), ValueError, ["score_mod"]),
    (dict(dropout_p=1.0), ValueError, ["dropout_p must be a number in [0, 1)", "1.0"]),
    (dict(dropout_p=-0.1), ValueError, ["dropout_p"]),
    (dict(scale="big"), TypeError, ["scale must be a finite number"]),
    (dict(scale=float("nan")), TypeError, ["scale"]),
    (dict(q_offset=1.5), TypeError, ["q_offset must be an int"]),
    (dict(score_mod=3), TypeError, ["score_mod must be a function"]),
    (dict(mask=qkv.masks.padding([1, 2, 3])), ValueError, ["batch size 3", "batch 2"]),
    (dict(mask=qkv.masks.document([0, 0, 1])), ValueError, ["document ids cover positions 0..2"]),
    (dict(mask=lambda b, h, q, k: q - k), TypeError, ["masks are boolean"]),
    (dict(return_weights=1), TypeError, ["return_weights must be a bool"]),
]


@pytest.mark.parametrize("override,exc,words", CASES, ids=[", ".join(c[0]) for c in CASES])
def test_clear_errors(override, exc, words):
    args = dict(q=Q, k=K, v=V) | override
    q, k, v = args.pop("q"), args.pop("k"), args.pop("v")
    with pytest.raises(exc) as info:
        qkv.attention(q, k, v, **args)
    for w in words:
        assert w in str(info.value), f"{w!r} not in {str(info.value)!r}"


def test_device_mismatch_is_reported():
    if not torch.cuda.is_available():
        meta = torch.empty(2, 2, 7, 8, device="meta")
        with pytest.raises(ValueError, match="one device"):
            qkv.attention(Q, meta, meta)
        return
    with pytest.raises(ValueError, match="one device"):
        qkv.attention(Q, K.cuda(), V.cuda())


def test_attention_weights_errors():
    with pytest.raises(ValueError, match="topk must be an int in"):
        qkv.attention_weights(Q, K, topk=0)
    with pytest.raises(ValueError, match="topk must be an int in"):
        qkv.attention_weights(Q, K, topk=8)
    with pytest.raises(ValueError, match="rows must index query rows"):
        qkv.attention_weights(Q, K, rows=[0, 5])


def test_backend_that_cannot_run_backward_says_so():
    q = Q.clone().requires_grad_()
    with pytest.raises(ValueError, match="backward"):
        qkv.attention(q, K, V, backend="flex")


def test_register_validates():
    with pytest.raises(TypeError, match="unknown capabilities"):
        qkv.backends.register("x", lambda *a, **k: None, teleport=True)
    with pytest.raises(ValueError, match="'auto'"):
        qkv.backends.register("auto", lambda *a, **k: None)


def test_one_dimensional_key_masks_are_accepted():
    keep = torch.tensor([True, True, False, True, True, True, False])
    out = qkv.attention(Q, K, V, mask=keep)
    ref = qkv.attention(Q, K, V, mask=keep.expand(5, 7))
    torch.testing.assert_close(out, ref)
