"""Terminal and PNG views of an `Explanation`."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from .core import Explanation
from .tokens import pieces, shown, terminal_safe


def _label(ex: Explanation, layer, head) -> str:
    if layer == "rollout":
        return "rollout"
    layer, head = ex.resolve_layer(layer), ex.resolve_head(head)
    return f"layer {layer if layer is not None else 'last'} · {'mean of heads' if head is None else f'head {head}'}"


def _styled(text: str, style: str | None):
    """A rich Text of one token: its visible form, stand-ins dimmed so they cannot pass for real text."""
    from rich.text import Text

    out = Text()
    for part, stand_in in pieces(text):
        extra = "dim italic" if stand_in else ""
        out.append(part, style=" ".join(s for s in (style, extra) if s) or None)
    return out


def terminal(ex: Explanation, token: int | str | None = None, layer=None, head: int | None = None, console=None) -> int:
    """Print the tokens shaded by how much ``token`` attends to each ("light bulbs"); returns its index.

    Token text is printed as plain text (never as rich markup) with controls, zero-width and
    bidirectional characters shown as visible stand-ins (`qkv.explain.tokens`).
    """
    from rich.console import Console
    from rich.text import Text

    label = _label(ex, layer, head)
    i = find_token(ex, token)
    weights = ex.row(i, layer, head).numpy()
    top = float(weights.max()) if weights.size else 1.0
    text = Text()
    for j in range(ex.length):
        a = weights[j] / top if top > 0 else 0.0
        shade = int(255 - 200 * a)
        style = f"on rgb(255,{shade},{max(0, shade - 60)})" if a > 0.02 else ""
        if j == i:
            style += " bold underline"
        piece = ex.text(j)
        if j and not (piece[:1] == " " and piece.strip()):  # byte-level and SentencePiece words carry a space
            text.append(" ")
        text.append_text(_styled(piece, style.strip() or None))
    console = console or Console()
    title = Text(f"{terminal_safe(ex.model)}: what \u201c", style="bold")
    title.append_text(_styled(ex.text(i), "bold"))
    title.append(f"\u201d (position {i}) attends to, {label}", style="bold")
    console.print(title)
    console.print(text)
    order = np.argsort(-weights)[:5]
    line = Text("top: ")
    for n, j in enumerate(order):
        line.append(", " if n else "")
        line.append_text(_styled(ex.text(int(j)), None))
        line.append(f" {weights[j]:.3f}")
    console.print(line)
    return i


def _special(token: str) -> bool:
    return token.startswith(("[", "<")) and token.endswith(("]", ">"))


def _word(text: str) -> str:
    """A token's text as a word to match: case-folded, without spaces and WordPiece's ``##``."""
    return text.strip().removeprefix("##").casefold()


def find_token(ex: Explanation, token: int | str | None) -> int:
    """A position from an index or a token's text (first match, case-insensitive, spaces and ``##``
    ignored, on the decoded text: ``bank`` finds GPT-2's ``Ġbank``); default: the first real token."""
    if token is None:
        real = [i for i, t in enumerate(ex.tokens) if not _special(t)]
        return real[0] if real else 0
    if isinstance(token, int) or (isinstance(token, str) and token.strip().lstrip("-").isdecimal()):
        i = int(token)
        if not -len(ex.tokens) <= i < len(ex.tokens):
            raise ValueError(f"token index {i} is out of range for {len(ex.tokens)} positions")
        return i % len(ex.tokens)
    want = _word(token)
    for i in range(ex.length):
        if _word(ex.text(i)) == want or ex.tokens[i] == token:
            return i
    sample = [shown(ex.text(i)) for i in range(min(ex.length, 40))]
    raise ValueError(f"no token {token!r} in the input; tokens: {sample}")


def _plain(text: str) -> str:
    """A label matplotlib draws literally: visible stand-ins, ``$`` escaped (it would start mathtext)."""
    return shown(text).replace("$", r"\$")


def png(ex: Explanation, path: str | Path, token: int | str | None = None, layer=None, head: int | None = None) -> Path:
    """A heatmap: token x token for text, a patch map over the image, a frame band over the spectrogram."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    path = Path(path)
    title = f"{_plain(ex.model)} · {_label(ex, layer, head)}"
    if ex.kind == "text":
        n = ex.length
        matrix = torch.stack([ex.row(i, layer, head) for i in range(n)]).numpy() if n <= 2048 else None
        if matrix is None:  # long inputs: the rows of a stride, so the figure stays readable
            rows = list(range(0, n, max(1, n // 512)))
            matrix = torch.stack([ex.row(i, layer, head) for i in rows]).numpy()
        size = min(14, 3 + 0.18 * min(n, 64))
        fig, ax = plt.subplots(figsize=(size, size))
        ax.imshow(matrix, cmap="Oranges", interpolation="nearest", aspect="auto")
        if n <= 64:
            labels = [_plain(ex.text(i)) for i in range(n)]
            ax.set_xticks(range(n), labels, rotation=90, fontsize=8)
            ax.set_yticks(range(n), labels, fontsize=8)
        ax.set_xlabel("attends to (key)")
        ax.set_ylabel("query")
    elif ex.kind == "image":
        i = 0 if token is None else find_token(ex, token)
        w = ex.row(i, layer, head).numpy()[1:].reshape(ex.grid)
        fig, ax = plt.subplots(figsize=(6, 6))
        ax.imshow(ex.image)
        ax.imshow(w, cmap="inferno", alpha=0.55, extent=(0, ex.image.size[0], ex.image.size[1], 0),
                  interpolation="bilinear")
        ax.set_axis_off()
        title += f" · from {_plain(ex.text(i))}"
    else:
        w = (ex.rollout if layer == "rollout" and ex.rollout is not None
             else torch.stack([ex.row(i, layer, head) for i in range(ex.length)])).sum(0).numpy()
        fig, (a1, a2) = plt.subplots(2, 1, figsize=(12, 5), sharex=True, gridspec_kw={"height_ratios": [3, 1]})
        a1.imshow(ex.spectrogram, origin="lower", aspect="auto", cmap="magma",
                  extent=(0, ex.length * ex.frame_seconds, 0, ex.spectrogram.shape[0]))
        a1.set_ylabel("mel band")
        a2.plot(np.arange(ex.length) * ex.frame_seconds, w, color="tab:orange")
        a2.set_xlabel("seconds")
        a2.set_ylabel("attention received")
    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
