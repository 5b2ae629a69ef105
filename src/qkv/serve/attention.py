"""Attention on request: the ``"qkv": {"attention": {...}}`` field of embeddings, completions and chat.

Request: ``{"layers": [int, ...], "heads": [int, ...], "topk": k, "full": bool}``, every key optional
(``"attention": true`` takes them all by default), with `qkv explain`'s meaning and defaults: all
layers (negative counts from the end), all heads, the full (heads, T, T) matrices when the input
has at most 512 positions (``full``: force either way), else the top-``k`` keys of every query
(default 16). Response: ``{"tokens", "texts", "n_heads", "layers": [{"layer", "heads", "weights"}
or {"layer", "heads", "topk_values", "topk_indices"}]}``, the ``tokens``, ``n_heads`` and
``layers`` of ``qkv explain --json`` on the same input.
"""

from __future__ import annotations

from .errors import bad_field

MAX_TOPK = 1024
_KEYS = ("layers", "heads", "topk", "full")


def spec(body: dict, n_layers: int, n_heads: int) -> dict | None:
    """The request's attention options as `qkv.explain.capture` arguments, or None when not asked for."""
    extra = body.get("qkv")
    if extra is None:
        return None
    if not isinstance(extra, dict):
        raise bad_field("qkv", f"must be an object such as {{\"attention\": {{\"topk\": 8}}}}, got {extra!r}")
    unknown = sorted(set(extra) - {"attention"})
    if unknown:
        raise bad_field("qkv", f"unknown field(s) {unknown}; this server knows 'attention'")
    want = extra.get("attention")
    if want is None or want is False:
        return None
    if want is True:
        want = {}
    if not isinstance(want, dict):
        raise bad_field("qkv.attention", f"must be true or an object with {list(_KEYS)}, got {want!r}")
    unknown = sorted(set(want) - set(_KEYS))
    if unknown:
        raise bad_field("qkv.attention", f"unknown field(s) {unknown}; known: {list(_KEYS)}")
    out: dict = {}
    for key, count in (("layers", n_layers), ("heads", n_heads)):
        v = want.get(key)
        if v is None:
            continue
        if isinstance(v, int) and not isinstance(v, bool):
            v = [v]
        if (not isinstance(v, list) or not v
                or any(isinstance(i, bool) or not isinstance(i, int) or not -count <= i < count for i in v)):
            raise bad_field(f"qkv.attention.{key}", f"must be a non-empty list of indices in [{-count}, {count}) "
                            f"(negative counts from the end), got {v!r}")
        out[key] = sorted({i % count for i in v})
    topk = want.get("topk")
    if topk is not None:
        if isinstance(topk, bool) or not isinstance(topk, int) or not 1 <= topk <= MAX_TOPK:
            raise bad_field("qkv.attention.topk", f"must be an integer in [1, {MAX_TOPK}], got {topk!r}")
        out["topk"] = topk
    full = want.get("full")
    if full is not None:
        if not isinstance(full, bool):
            raise bad_field("qkv.attention.full", f"must be true, false or null, got {full!r}")
        out["full"] = full
    return out


def token_texts(tokenizer, ids: list[int]) -> list[str]:
    """What each token stands for, as JSON can carry it: a byte that is not UTF-8 on its own (kept by
    ``token_texts`` as a surrogate escape) becomes U+FFFD."""
    return [_valid(t) for t in tokenizer.token_texts(ids)]


def _valid(text: str) -> str:
    return text.encode("utf-8", "surrogateescape").decode("utf-8", "replace")


def attention_dict(ex) -> dict:
    """An `qkv.explain.Explanation` as the response's attention object (``qkv explain --json``'s fields)."""
    d = ex.to_dict(include_rollout=False)
    out = {"tokens": d["tokens"], "texts": [_valid(ex.text(i)) for i in range(ex.length)], "n_heads": d["n_heads"],
           "layers": d["layers"]}
    if ex.notes:
        out["notes"] = ex.notes
    return out
