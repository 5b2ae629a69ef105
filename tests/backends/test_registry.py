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
    return qkv.functional._validate(q, k, k, mask=mask, score_mod=None, bias=None, scale=None, q_offset=None,
                                    dropout_p=0.0, return_weights=kw.get("w", False), return_lse=False)


def test_auto_choices():
    choose = qkv.backends.choose
    assert choose(_call(None))[0] == "sdpa"
    assert choose(_call(qkv.masks.causal()))[0] == "sdpa"
    assert choose(_call(qkv.masks.causal() & qkv.masks.sliding_window(64)))[0] == "chunked"
    assert choose(_call(qkv.masks.causal(), Tq=256))[0] == "chunked"  # bottom-right causal: a quarter is skipped
    assert choose(_call(qkv.masks.causal(), Tq=32))[0] == "sdpa"  # nearly dense: SDPA with the mask
    assert choose(_call(qkv.masks.causal(), w=True))[0] == "chunked"
    assert choose(_call(qkv.masks.strided(3)))[0] == "sdpa"  # nothing to skip: dense mask to SDPA


def test_user_backend_is_called():
    seen = {}

    def mine(q, k, v, *, mask, score_mod, bias, scale, q_offset, dropout_p, return_weights, return_lse):
        seen["mask"] = mask
        out, w, lse = qkv.backends.get("eager").fn(q, k, v, mask=mask, score_mod=score_mod, bias=bias, scale=scale,
                                                   q_offset=q_offset, dropout_p=dropout_p,
                                                   return_weights=return_weights, return_lse=return_lse)
        return out * 1, w, lse

    qkv.backends.register("mine", mine, supports_weights=True)
    try:
        q = torch.randn(1, 2, 4, 8)
        out, w = qkv.attention(q, q, q, mask=qkv.masks.causal(), backend="mine", return_weights=True)
        assert isinstance(seen["mask"], qkv.masks.Mask)
        torch.testing.assert_close(out, qkv.attention(q, q, q, mask=qkv.masks.causal()))
        assert qkv.backends.available()["mine"].weights
    finally:
        qkv.backends._registry._REGISTRY.pop("mine")
