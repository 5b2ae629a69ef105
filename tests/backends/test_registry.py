"""The registry: what is listed, what auto picks, and user backends."""

import torch

import qkv


def test_available_lists_every_backend_with_capabilities():
    av = qkv.backends.available()
    assert {"eager", "sdpa", "chunked", "flex"} <= set(av)
    assert av["eager"].weights and av["eager"].backward and torch.float64 in av["eager"].dtypes
    assert av["chunked"].weights and av["chunked"].lse and av["chunked"].backward
    assert not av["sdpa"].weights and not av["sdpa"].score_mod
    flex = av["flex"]
    assert flex.available or flex.reason  # absence is reported, not raised


def _call(mask, T=512, Tq=None, **kw):
    Tq = T if Tq is None else Tq
    q, k = torch.randn(1, 8, Tq, 64), torch.randn(1, 8, T, 64)
    return qkv.functional.prepare(q, k, k, mask=mask, return_weights=kw.get("w", False))


def test_auto_choices():
    choose = qkv.backends.choose
    tiled = "native" if qkv.backends.available()["native"].available else "chunked"  # interval masks, CPU fp32
    assert choose(_call(None))[0] == "sdpa"
    assert choose(_call(qkv.masks.causal()))[0] == "sdpa"
    assert choose(_call(qkv.masks.causal() & qkv.masks.sliding_window(64)))[0] == tiled
    assert choose(_call(qkv.masks.causal(), Tq=256))[0] == tiled  # bottom-right causal: a quarter is skipped
    assert choose(_call(qkv.masks.causal(), Tq=32))[0] == "sdpa"  # nearly dense: SDPA with the mask
    assert choose(_call(qkv.masks.causal(), w=True))[0] == tiled
    assert choose(_call(qkv.masks.strided(3) & qkv.masks.causal(), Tq=256))[0] == "chunked"  # no intervals
    assert choose(_call(qkv.masks.strided(3)))[0] == "sdpa"  # nothing to skip: dense mask to SDPA


def test_native_is_listed_and_can_be_asked_for():
    native = qkv.backends.available()["native"]
    assert native.backward and native.weights and native.lse and not native.score_mod and not native.bias
    assert native.available or native.reason
    if native.available:
        q = torch.randn(1, 2, 40, 8)
        torch.testing.assert_close(qkv.attention(q, q, q, mask=qkv.masks.causal(), backend="native"),
                                   qkv.attention(q, q, q, mask=qkv.masks.causal(), backend="eager"))
    q = torch.randn(1, 2, 40, 8)
    try:
        qkv.attention(q, q, q, mask=qkv.masks.strided(3), backend="native")
    except ValueError as e:
        assert "key intervals" in str(e) or "native kernel" in str(e)
    else:
        raise AssertionError("native served a mask without intervals")


def test_user_backend_is_called():
    seen = {}

    def mine(q, k, v, *, mask, score_mod, bias, scale, q_offset, dropout_p, return_weights, return_lse):
        seen["mask"] = mask
        out, w, lse = qkv.attention(q, k, v, mask=mask, score_mod=score_mod, bias=bias, scale=scale,
                                    q_offset=q_offset, dropout_p=dropout_p, backend="eager", return_weights=True,
                                    return_lse=True)
        return out * 1, w if return_weights else None, lse if return_lse else None

    qkv.backends.register("mine", mine, supports_weights=True)
    try:
        q = torch.randn(1, 2, 4, 8)
        out, w = qkv.attention(q, q, q, mask=qkv.masks.causal(), backend="mine", return_weights=True)
        assert isinstance(seen["mask"], qkv.masks.Mask)
        torch.testing.assert_close(out, qkv.attention(q, q, q, mask=qkv.masks.causal()))
        assert qkv.backends.available()["mine"].weights
    finally:
        qkv.backends.unregister("mine")
    assert "mine" not in qkv.backends.available()
