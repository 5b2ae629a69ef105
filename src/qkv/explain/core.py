"""`Explanation`: what a model attended to for one input (text, image or audio), ready to render."""

from __future__ import annotations

import hashlib
from collections.abc import Sequence
from dataclasses import dataclass, field

import torch

from .aggregate import head_stats, rollout
from .capture import DEFAULT_TOPK, FULL_LIMIT, AttentionMaps, capture


@dataclass
class Explanation:
    kind: str  # "text", "image" or "audio"
    tokens: list[str]  # what each position is: token strings, patch names, frame times
    maps: list[AttentionMaps]  # self-attention per captured layer
    rollout: torch.Tensor | None = None  # (T, T)
    model: str = ""
    n_heads: int = 0
    grid: tuple[int, int] | None = None  # image: patch rows and columns (position 0 is the class token)
    image: object = None  # image: the resized PIL image the model saw
    spectrogram: object = None  # audio: (n_mels, frames) log-mel features the model saw
    frame_seconds: float = 0.0  # audio: seconds per encoder position
    notes: list[str] = field(default_factory=list)
    texts: list[str] | None = None  # text: what each token stands for (decoded); None: the tokens themselves
    output: object = None  # keep_output=True: (the model's output of the captured pass, its attention mask)
    embedding: object = None  # explain_texts(embed=True): the text's sentence vector (C,)

    @property
    def length(self) -> int:
        return len(self.tokens)

    def text(self, i: int) -> str:
        """What position ``i`` stands for: the decoded token text (``tokens[i]`` when not decoded)."""
        return self.tokens[i] if self.texts is None else self.texts[i]

    def layer(self, index: int) -> AttentionMaps:
        """The maps of layer ``index`` (negative counts from the last captured layer's end)."""
        return self._maps(self.resolve_layer(index))

    def _maps(self, index: int) -> AttentionMaps:
        for m in self.maps:
            if m.layer == index:
                return m
        raise ValueError(f"layer {index} was not captured; captured: {[m.layer for m in self.maps]}")

    def resolve_layer(self, layer: int | str | None) -> int | str | None:
        """``layer`` checked and made non-negative (``None`` and ``"rollout"`` pass through)."""
        if layer is None or layer == "rollout":
            return layer
        if isinstance(layer, str) and layer.lstrip("-").isdigit():
            layer = int(layer)
        n = self._n_layers()
        if isinstance(layer, bool) or not isinstance(layer, int) or not -n <= layer < n:
            raise ValueError(f"layer={layer!r} is out of range: the explanation has layers 0..{n - 1} "
                             "(negative counts from the end), or use 'rollout'")
        index = layer % n
        if index not in [m.layer for m in self.maps]:
            raise ValueError(f"layer {index} was not captured; captured: {[m.layer for m in self.maps]}; "
                             "capture it with layers=[...] (--layers)")
        return index

    def resolve_head(self, head: int | None) -> int | None:
        """``head`` checked and made non-negative (``None``, the mean of heads, passes through)."""
        if head is None:
            return None
        n = self.n_heads or max((max(m.heads, default=-1) + 1 for m in self.maps), default=0)
        if isinstance(head, bool) or not isinstance(head, int) or not -n <= head < n:
            raise ValueError(f"head={head!r} is out of range: the model has {n} heads (0..{n - 1}); "
                             "leave it out for the mean of heads")
        index = head % n
        kept = sorted({h for m in self.maps for h in m.heads})
        if index not in kept:
            raise ValueError(f"head {index} was not captured; captured: {kept}")
        return index

    def _n_layers(self) -> int:
        return max((m.layer for m in self.maps), default=-1) + 1

    def view(self, layer: int | str | None = None, head: int | None = None, k: int = DEFAULT_TOPK):
        """Top-``k`` (values, indices) (T, k) per query for a layer's head (``head=None``: head average),
        or for the rollout (``layer="rollout"``). ``layer=None`` is the last layer."""
        if layer == "rollout":
            if self.rollout is None:
                raise ValueError("no rollout: it needs every layer's head average (inputs up to 8192 positions)")
            n = min(k, self.rollout.shape[-1])
            val, idx = self.rollout.topk(n, dim=-1)
            return val, idx
        m = self.maps[-1] if layer is None else self.layer(layer)
        return m.topk(self.resolve_head(head), k)

    def row(self, i: int, layer: int | str | None = None, head: int | None = None) -> torch.Tensor:
        """Dense attention (T,) of query ``i`` over all keys for one view."""
        if layer == "rollout":
            return self.rollout[i]
        m = self.maps[-1] if layer is None else self.layer(layer)
        head = self.resolve_head(head)
        if head is None and m.mean is not None:
            return m.mean[i]
        if head is not None and m.dense is not None:
            return m.head(head)[i]
        val, idx = m.topk(head, 64)
        out = torch.zeros(m.tk)
        ok = idx[i] >= 0
        out[idx[i][ok]] = val[i][ok]
        return out

    def stats(self) -> list[dict]:
        return head_stats(self.maps)

    def to_dict(self, layer: int | None = None, head: int | None = None, include_rollout: bool = True) -> dict:
        """JSON-ready: tokens, and per captured layer the weights of each head (full matrices when
        captured in full, else top-k values and key indices), filtered by ``layer`` / ``head``."""
        layer, head = self.resolve_layer(layer), self.resolve_head(head)
        layers = []
        for m in self.maps:
            if layer is not None and m.layer != layer:
                continue
            heads = m.heads if head is None else [head]
            entry: dict = {"layer": m.layer, "heads": heads}
            if m.dense is not None:
                entry["weights"] = [m.head(h).tolist() for h in heads]
            else:
                pos = [m.heads.index(h) for h in heads]
                entry["topk_values"] = [m.top_values[i].tolist() for i in pos]
                entry["topk_indices"] = [m.top_index[i].tolist() for i in pos]
            layers.append(entry)
        out = {"model": self.model, "kind": self.kind, "tokens": self.tokens, "n_heads": self.n_heads,
               "layers": layers}
        if include_rollout and self.rollout is not None:
            out["rollout"] = self.rollout.tolist()
        if self.notes:
            out["notes"] = self.notes
        return out


def _finish(kind, tokens, cap, model, name, **extra) -> Explanation:
    means = [m.mean for m in cap.maps]
    roll = rollout(means) if means and all(t is not None for t in means) and cap.maps[0].tq == cap.maps[0].tk else None
    n_heads = next((m.n_heads for m in model.modules() if hasattr(m, "n_heads") and hasattr(m, "is_cross")), 0)
    return Explanation(kind, tokens, cap.maps, roll, name, n_heads, **extra)


def _fallback_ids(text: str, vocab_size: int) -> tuple[list[int], list[str]]:
    """Whitespace words mapped to ids by a stable hash, for models saved without a tokenizer."""
    words = text.split()
    ids = [int.from_bytes(hashlib.blake2b(w.encode(), digest_size=8).digest(), "little") % vocab_size for w in words]
    return ids, words


def explain_text(model, text: str, *, layers: Sequence[int] | None = None, heads: Sequence[int] | None = None,
                 full: bool | None = None, topk: int = DEFAULT_TOPK, name: str = "",
                 keep_output: bool = False) -> Explanation:
    """Attention of a text model (TextEncoder, CausalLM, or a Seq2Seq encoder) over ``text``.

    ``keep_output``: keep the pass's output and mask in ``.output`` (a server embeds and explains a
    text in one forward pass)."""
    if not callable(getattr(model, "text_pass", None)):
        raise ValueError(f"explain_text reads text models (TextEncoder, CausalLM, Seq2Seq); this is a "
                         f"{type(model).__name__}: use explain_image or explain_audio (--image / --audio)")
    notes = []
    tok = getattr(model, "tokenizer", None)
    if tok is not None:
        enc = tok.encode_batch([text], max_length=getattr(model.config, "max_length", None), device=model.device)
        ids, mask = enc["input_ids"], enc["attention_mask"]
        tokens = [tok.tok.id_to_token(i) or "" for i in ids[0].tolist()]
        texts = tok.token_texts(ids[0].tolist())
    else:
        raw, tokens = _fallback_ids(text, model.config.vocab_size)
        texts = None
        ids = torch.tensor([raw], device=model.device)
        mask = torch.ones_like(ids)
        notes.append("the model has no tokenizer: words were mapped to ids by hash")
    if not tokens:
        raise ValueError("the text has no tokens to explain")
    with torch.no_grad(), capture(model, layers=layers, heads=heads, full=full, topk=topk) as cap:
        out = model.text_pass(ids, mask)
    result = _finish("text", tokens, cap, model, name, texts=texts)
    if keep_output:
        result.output = (out, mask)
    result.notes += notes
    return result


def explain_texts(model, texts: Sequence[str], *, layers: Sequence[int] | None = None,
                  heads: Sequence[int] | None = None, full: bool | None = None, topk: int = DEFAULT_TOPK,
                  name: str = "", embed: bool = False) -> list[Explanation]:
    """`explain_text` of each of ``texts``, in few passes: a `TextEncoder` with a tokenizer runs them
    packed (`TextEncoder.packed_rows`, rows of at most ``FULL_LIMIT`` tokens, each text attending only
    to itself) and each text's maps are its block of its row's; a text alone in its row, and every
    other model, goes through `explain_text` itself. The maps equal `explain_text`'s up to float
    rounding (a packed row is another kernel call). ``embed``: also set each result's ``embedding``
    (the sentence vector, ``model.pool`` of its hidden states), as `TextEncoder.embed_ids` gives it."""
    texts = list(texts)
    tok = getattr(model, "tokenizer", None)
    if tok is None or not callable(getattr(model, "packed_rows", None)) or len(texts) < 2:
        return [_explained_alone(model, t, embed, layers=layers, heads=heads, full=full, topk=topk, name=name)
                for t in texts]
    from ..models.text_encoder import pack

    ids, types = zip(*(tok.encode_with_types(t) for t in texts))
    limit = model.config.max_length
    results: list[Explanation | None] = [None] * len(texts)
    fits = [i for i, x in enumerate(ids) if 0 < len(x) <= limit]  # others: explain_text truncates or refuses
    for row in pack([len(ids[i]) for i in fits], FULL_LIMIT):
        row = [fits[j] for j in row]
        if len(row) == 1:  # nothing to share the pass with
            continue
        with torch.no_grad(), capture(model, layers=layers, heads=heads, full=full, topk=topk) as cap:
            _, hidden, segments = next(model.packed_rows([ids[i] for i in row], [types[i] for i in row],
                                                         max_tokens=FULL_LIMIT))
            vectors = model.pool_packed(hidden, segments, len(row)).float().cpu() if embed else None
        start = 0
        for j, i in enumerate(row):
            n = len(ids[i])
            part = type(cap)()
            part.maps = [_block(m, start, n, topk) for m in cap.maps]
            results[i] = _finish("text", [tok.tok.id_to_token(t) or "" for t in ids[i]], part, model, name,
                                 texts=tok.token_texts(ids[i]))
            if embed:
                results[i].embedding = vectors[j]
            start += n
    return [r if r is not None else _explained_alone(model, t, embed, layers=layers, heads=heads, full=full,
                                                     topk=topk, name=name) for r, t in zip(results, texts)]


def _explained_alone(model, text: str, embed: bool, **spec) -> Explanation:
    ex = explain_text(model, text, keep_output=embed, **spec)
    if embed:
        out, mask = ex.output
        ex.embedding = model.pool(out.last_hidden_state, mask)[0].float().cpu()
        ex.output = None
    return ex


def _block(m: AttentionMaps, start: int, n: int, topk: int) -> AttentionMaps:
    """The maps of the text at positions ``start:start+n`` of a packed row (keys renumbered from 0)."""
    end = start + n
    out = AttentionMaps(m.name, m.layer, m.kind, m.heads, n, n)
    if m.mean is not None:
        out.mean = m.mean[start:end, start:end].clone()
    if m.dense is not None:
        out.dense = m.dense[:, start:end, start:end].clone()
    else:  # the row's top keys: the text's own come first (every other key has probability 0)
        k = min(topk, n)
        out.top_values = m.top_values[:, start:end, :k].clone()
        idx = m.top_index[:, start:end, :k]
        out.top_index = torch.where(idx >= 0, idx - start, -1)
    return out


def explain_image(model, image, *, layers=None, heads=None, full: bool | None = None, topk: int = DEFAULT_TOPK,
                  name: str = "") -> Explanation:
    """Attention of a VisionTransformer over one image (path, PIL image or array)."""
    c = getattr(model, "config", None)
    if not hasattr(model, "preprocess") or not hasattr(c, "input"):
        raise ValueError(f"explain_image reads vision transformers; this is a {type(model).__name__}: give --model "
                         "a ViT folder (config.json + model.safetensors), or pass text instead of --image")
    if c.input != "image" or len(c.size) != 2 or c.pool != "cls":
        raise ValueError(f"explain_image reads image ViTs with a class token; this model has input={c.input!r}, "
                         f"pool={c.pool!r}, image_size={c.image_size}. For other inputs, run the model inside "
                         "qkv.explain.capture(model) and read the maps")
    pixels = model.preprocess([image]).to(model.device)
    with torch.no_grad(), capture(model, layers=layers, heads=heads, full=full, topk=topk) as cap:
        model(pixels)
    rows, cols = c.grid_shape
    tokens = ["[CLS]"] + [f"patch ({r}, {col})" for r in range(rows) for col in range(cols)]
    from ..models.vision import _load_image

    shown = _load_image(image).resize((c.size[1], c.size[0]))
    return _finish("image", tokens, cap, model, name, grid=(rows, cols), image=shown)


def explain_audio(model, audio, sample_rate: int | None = None, *, layers=None, heads=None,
                  full: bool | None = None, topk: int = DEFAULT_TOPK, name: str = "") -> Explanation:
    """Attention of a SpeechRecognizer's encoder over a clip's 30 s window (1,500 positions of 20 ms)."""
    if not (hasattr(model, "features") and hasattr(model, "encode")):
        raise ValueError(f"explain_audio reads speech recognizers (Whisper); this is a {type(model).__name__}: "
                         "give --model a Whisper folder or leave --model out for whisper-tiny.en")
    feats = model.features(audio, sample_rate)
    with torch.no_grad(), capture(model, layers=layers, heads=heads, full=full, topk=topk) as cap:
        model.encode(feats)
    n = cap.maps[0].tq if cap.maps else 0
    step = 30.0 / max(n, 1)
    tokens = [f"{i * step:.2f}s" for i in range(n)]
    return _finish("audio", tokens, cap, model, name, spectrogram=feats[0].cpu().numpy(), frame_seconds=step)
