"""Explanations of vision task models: where each detection, segment class and caption word looked.

- `explain_detections` (YOLOS, `ObjectDetector`): for each detection, its [DET] token's attention over
  the patches in the last layer (mean of heads), or the attention rollout (arXiv:2005.00928) to it.
- `explain_segments` (SegFormer, `SemanticSegmenter`): for each predicted class, the mean attention of
  its pixels' query positions over the keys of one block (the spatially reduced grid), head mean.
- `explain_caption` (`ImageCaptioner`): for each generated token, the last decoder layer's
  cross-attention over the encoder patches (mean of heads), read at the step that generated it.

Each returns a `TaskExplanation`: the image, and one `Panel` per detection / class / token holding a
weight grid laid over the whole image. Weights are the model's own probabilities: a detection's grid
sums to 1 minus what its token gave the class and [DET] tokens (``extra["cls"]``, ``extra["det_tokens"]``),
a caption token's to 1 minus ``extra["cls"]``; a segment class's grid sums to 1 (its keys are all patches).
Render with `png` (one heatmap panel per item) or `html` (a self-contained page, `render_html`'s escaping).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from .aggregate import rollout as _rollout


@dataclass
class Panel:
    """One detection, segment class or caption token."""

    title: str  # label, class name or token text (user strings: escape before showing)
    weights: np.ndarray  # (rows, cols) attention over the key grid, laid over the whole image
    box: list[float] | None = None  # detection: [x0, y0, x1, y1] in image pixels, clamped inside the image
    extra: dict = field(default_factory=dict)  # score, label_id, pixels, token_id, attention off the grid

    def to_dict(self) -> dict:
        out = {"title": self.title, "grid": list(self.weights.shape), "weights": self.weights.round(6).tolist()}
        if self.box is not None:
            out["box"] = self.box
        return out | self.extra


@dataclass
class TaskExplanation:
    kind: str  # "detection", "segmentation" or "caption"
    image: object  # the original PIL image (RGB)
    panels: list[Panel]
    model: str = ""
    view: str = ""  # which attention: "last layer, mean of heads", "rollout", "block 3 (stage 1)", ...
    mask: np.ndarray | None = None  # segmentation: (H, W) int64 class map
    text: str | None = None  # caption: the caption
    notes: list[str] = field(default_factory=list)

    def to_dict(self) -> dict:
        out = {"model": self.model, "kind": self.kind, "view": self.view, "width": self.image.width,
               "height": self.image.height, "panels": [p.to_dict() for p in self.panels]}
        if self.text is not None:
            out["caption"] = self.text
        if self.notes:
            out["notes"] = self.notes
        return out


def _image(image):
    from ..models.vision import _load_image

    return _load_image(image)


def _needs(model, method: str, what: str, fn: str) -> None:
    if not callable(getattr(model, method, None)):
        raise ValueError(f"{fn} reads {what}; this is a {type(model).__name__}")


def clamp_box(box, width: int, height: int) -> list[float]:
    """[x0, y0, x1, y1] cut to the image: 0 <= x0 <= x1 <= width, 0 <= y0 <= y1 <= height."""
    x0, y0, x1, y1 = (float(v) for v in box)
    x0, x1 = sorted((min(max(x0, 0.0), float(width)), min(max(x1, 0.0), float(width))))
    y0, y1 = sorted((min(max(y0, 0.0), float(height)), min(max(y1, 0.0), float(height))))
    return [x0, y0, x1, y1]


@torch.no_grad()
def explain_detections(model, image, *, threshold: float = 0.5, rollout: bool = False,
                       name: str = "") -> TaskExplanation:
    """Per detection scoring above ``threshold`` (as ``model.detect``), its [DET] token's attention over the
    patch grid: the last layer's head mean, or with ``rollout`` the rollout over all layers."""
    _needs(model, "detect", "object detectors (YOLOS)", "explain_detections")
    from ..models.detection import post_process

    im = _image(image)
    x = model.preprocess(im).to(model.device)
    out = model(x, return_weights=True)
    c = model.config
    dets = post_process(out.logits, out.pred_boxes, threshold, [(im.height, im.width)], c.labels)[0]
    scores = out.logits[0].float().softmax(-1)[:, :-1].max(-1).values  # (Q,)
    kept = (scores > threshold).nonzero().flatten().tolist()  # post_process's order: detection-token order
    rows, cols = x.shape[2] // c.patch_size, x.shape[3] // c.patch_size
    P = rows * cols
    means = [a[0].float().mean(0).cpu() for a in out.attentions]  # (T, T) per layer
    A = _rollout(means) if rollout else means[-1]
    panels = []
    for det, j in zip(dets, kept):
        row = A[1 + P + j]  # the [DET] token j: after the class token and the patches
        extra = {"label": det["label"], "label_id": det["label_id"], "score": det["score"], "token": j,
                 "cls": float(row[0]), "det_tokens": float(row[1 + P:].sum())}
        panels.append(Panel(det["label"], row[1:1 + P].reshape(rows, cols).numpy(),
                            clamp_box(det["box"], im.width, im.height), extra))
    view = "rollout over all layers" if rollout else "last layer, mean of heads"
    ex = TaskExplanation("detection", im, panels, name, view)
    if not panels:
        ex.notes.append(f"no detection scored above threshold={threshold}")
    return ex


def _block_stage(depths, block: int) -> tuple[int, int]:
    n = sum(depths)
    if isinstance(block, bool) or not isinstance(block, int) or not -n <= block < n:
        raise ValueError(f"block={block!r} is out of range: the model has blocks 0..{n - 1} over its stages "
                         f"(depths={list(depths)}); negative counts from the end")
    b = block % n
    return b, int(np.searchsorted(np.cumsum(depths), b, side="right"))


@torch.no_grad()
def explain_segments(model, image, *, block: int = -1, name: str = "") -> TaskExplanation:
    """Per class of the predicted map (``model.segment``), the mean attention of its pixels' query positions
    over the keys of ``block`` (counted over all stages; default the last), head mean. Each pixel maps to the
    query cell of the block's grid it falls in; the grid of keys is the block's spatially reduced one."""
    _needs(model, "segment", "semantic segmenters (SegFormer)", "explain_segments")
    c = model.config
    b, stage = _block_stage(c.depths, block)
    im = _image(image)
    x = model.preprocess([im]).to(model.device)
    out = model(x, return_weights=True, return_hidden=True)
    up = F.interpolate(out.logits, size=(im.height, im.width), mode="bilinear", align_corners=False)
    classes = up[0].argmax(0).cpu()  # (H, W), as segment() computes it
    h, w = out.hidden_states[stage].shape[2:]
    sr = c.sr_ratios[stage]
    kh, kw = (h // sr, w // sr) if sr > 1 else (h, w)
    A = out.attentions[b][0].float().mean(0).cpu()  # (N, N'), N = h * w queries
    if A.shape != (h * w, kh * kw):
        raise RuntimeError(f"block {b}: attention {tuple(A.shape)} does not match its grid {(h, w)} -> {(kh, kw)}")
    ys = torch.arange(im.height) * h // im.height
    xs = torch.arange(im.width) * w // im.width
    cell = (ys[:, None] * w + xs[None, :]).flatten()  # (H * W,) the query position of each pixel
    flat = classes.flatten()
    names = c.labels or [str(i) for i in range(c.num_labels)]
    panels = []
    for k in flat.unique().tolist():
        counts = torch.bincount(cell[flat == k], minlength=h * w).float()  # pixels of class k per query cell
        weights = (counts @ A) / counts.sum()  # (N',) the mean over the class's pixels of their query rows
        share = float(counts.sum()) / flat.numel()
        panels.append(Panel(names[k], weights.reshape(kh, kw).numpy(), None,
                            {"label": names[k], "label_id": k, "pixels": int(counts.sum()),
                             "fraction": round(share, 6)}))
    view = f"block {b} (stage {stage}, keys {kh} x {kw}), mean of heads"
    return TaskExplanation("segmentation", im, panels, name, view, mask=classes.numpy())


def caption_tokens(model, image, **options) -> tuple[list[int], str]:
    """(token ids after the start token up to the first stop token, caption text) for one image, with
    ``options`` of ``model.generate`` (None values ignored); what ``model.caption`` returns as text."""
    _needs(model, "caption", "image captioners (ViT encoder + GPT-2 decoder)", "caption_tokens")
    from ..models.generation import cut, prepare

    options = {k: v for k, v in options.items() if v is not None}
    pixels = model.preprocess([_image(image)]).to(model.device)
    ids = model.generate(pixels, **options)
    _, _, _, _, gen = prepare(model, pixels, None, "right", **options)
    new = cut(ids[0, 1:].tolist(), gen)
    tok = model._require_tokenizer("captions")
    return new, tok.decode(new).strip()


@torch.no_grad()
def explain_caption(model, image, *, name: str = "", **options) -> TaskExplanation:
    """Caption ``image`` (``options``: those of ``model.generate``) and, per generated token, the last decoder
    layer's cross-attention over the encoder's patch grid (mean of heads) at the step that chose it."""
    _needs(model, "caption", "image captioners (ViT encoder + GPT-2 decoder)", "explain_caption")
    im = _image(image)
    new, text = caption_tokens(model, im, **options)
    start = model.config.start_token_id
    pixels = model.preprocess([im]).to(model.device)
    rows, cols = model.config.encoder.grid_shape
    panels = []
    if new:
        ids = torch.tensor([[start] + new[:-1]], device=model.device)  # query t chose token new[t]
        out = model(pixels, ids, return_weights=True)
        cross = out.cross_attentions[-1][0].float().mean(0).cpu()  # (T, 1 + patches)
        texts = model.tokenizer.token_texts(new)
        for t, (tid, word) in enumerate(zip(new, texts)):
            panels.append(Panel(word, cross[t, 1:].reshape(rows, cols).numpy(), None,
                                {"token_id": tid, "position": t, "cls": float(cross[t, 0])}))
    ex = TaskExplanation("caption", im, panels, name, "last decoder layer cross-attention, mean of heads",
                         text=text)
    if not panels:
        ex.notes.append("the caption is empty: no token to explain")
    return ex


# --- rendering ---------------------------------------------------------------------------------------

MAX_PANELS = 36  # more make an unreadable figure; the HTML page shows them all


def _plain(text: str) -> str:
    from .render import _plain as plain

    return plain(text)


def _panel_title(ex: TaskExplanation, p: Panel) -> str:
    if ex.kind == "detection":
        return f"{p.title} {p.extra['score']:.2f}"
    if ex.kind == "segmentation":
        return f"{p.title} ({100 * p.extra['fraction']:.1f}%)"
    return f"{p.extra['position']}: {p.title}"


def png(ex: TaskExplanation, path: str | Path) -> Path:
    """One heatmap panel per detection / class / token over the image (at most MAX_PANELS), as PNG."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.patches import Rectangle

    path = Path(path)
    panels = ex.panels[:MAX_PANELS]
    n = max(1, len(panels))
    ncols = min(4, n)
    nrows = -(-n // ncols)
    W, H = ex.image.size
    pw = 3.2
    fig, axes = plt.subplots(nrows, ncols, figsize=(pw * ncols, pw * H / W * nrows + 0.9), squeeze=False)
    for ax in axes.flat:
        ax.set_axis_off()
    for ax, p in zip(axes.flat, panels):
        ax.imshow(ex.image)
        ax.imshow(p.weights, cmap="inferno", alpha=0.55, extent=(0, W, H, 0), interpolation="nearest")
        if p.box is not None:
            x0, y0, x1, y1 = p.box
            ax.add_patch(Rectangle((x0, y0), x1 - x0, y1 - y0, fill=False, edgecolor="cyan", linewidth=1.5))
        ax.set_title(_plain(_panel_title(ex, p)), fontsize=9)
    if not panels:
        axes.flat[0].imshow(ex.image)
        axes.flat[0].set_title(_plain("; ".join(ex.notes) or "nothing to explain"), fontsize=9)
    lines = [f"{ex.model} · {ex.kind} · {ex.view}"]
    if len(ex.panels) > len(panels):
        lines[0] += f" · first {len(panels)} of {len(ex.panels)}"
    if ex.text is not None:
        lines.append(f"\u201c{ex.text[:120]}\u201d")
    fig.suptitle("\n".join(_plain(line) for line in lines), fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=100, format="png")
    plt.close(fig)
    return path


def page_data(ex: TaskExplanation) -> dict:
    """What the HTML page carries: the image, and per panel its title, grid, weights and details."""
    from .render_html import _png_data_url

    panels = []
    for p in ex.panels:
        top = float(p.weights.max()) if p.weights.size else 0.0
        panels.append({"title": _panel_title(ex, p), "rows": p.weights.shape[0], "cols": p.weights.shape[1],
                       "weights": [round(float(v), 6) for v in p.weights.flatten()], "top": top, "box": p.box,
                       "details": {k: v for k, v in p.extra.items() if isinstance(v, (int, float, str))}})
    return {"title": f"{ex.model} · {ex.kind} · {ex.view}", "caption": ex.text, "notes": ex.notes,
            "width": ex.image.width, "height": ex.image.height, "image": _png_data_url(ex.image),
            "panels": panels}


def html(ex: TaskExplanation, path: str | Path | None = None) -> str:
    """A self-contained page (no network): one card per detection / class / token, its heatmap drawn over the
    image; hover a cell for its weight. Every string travels in a JSON block (`safe_json`) and is shown
    with ``textContent``, never as markup."""
    from .render_html import safe_json

    page = _TEMPLATE.replace("/*DATA*/", safe_json(page_data(ex)))
    if path is not None:
        Path(path).write_text(page, encoding="utf-8")
    return page


_TEMPLATE = r"""<!DOCTYPE html>
<html lang="en"><head><meta charset="utf-8">
<meta http-equiv="Content-Security-Policy"
 content="default-src 'none'; img-src data:; style-src 'unsafe-inline'; script-src 'unsafe-inline'">
<title>qkv explain</title>
<style>
body{font:14px/1.5 system-ui,sans-serif;margin:0;color:#222;background:#fafafa}
header{position:sticky;top:0;background:#fff;border-bottom:1px solid #ddd;padding:8px 14px;z-index:5}
header h1{font-size:15px;margin:0;font-weight:600}
#caption{margin:4px 0 0;font-size:15px;white-space:pre-wrap}
#notes{color:#666}
main{display:flex;flex-wrap:wrap;gap:14px;padding:14px}
.card{background:#fff;border:1px solid #ddd;border-radius:4px;padding:6px}
.card h2{font-size:13px;margin:0 0 4px;font-weight:600;white-space:pre;unicode-bidi:isolate;overflow:hidden;
 text-overflow:ellipsis;max-width:320px}
.card canvas{display:block}
.card .info{font-size:12px;color:#555;min-height:1.5em}
</style></head><body>
<header><h1 id="title"></h1><p id="caption"></p><div id="notes"></div></header>
<main id="cards"></main>
<script type="application/json" id="qkv-data">/*DATA*/</script>
<script>
"use strict";
const D = JSON.parse(document.getElementById("qkv-data").textContent);
document.getElementById("title").textContent = D.title;
if (D.caption !== null) document.getElementById("caption").textContent = D.caption;
for (const n of D.notes) {
  const p = document.createElement("p"); p.textContent = n; document.getElementById("notes").appendChild(p);
}
const img = new Image();
const scale = Math.min(320 / D.width, 320 / D.height, 8);
const W = Math.max(1, Math.round(D.width * scale)), H = Math.max(1, Math.round(D.height * scale));
function card(p) {
  const box = document.createElement("div"); box.className = "card";
  const h = document.createElement("h2"); h.textContent = p.title; h.title = p.title; box.appendChild(h);
  const c = document.createElement("canvas"); c.width = W; c.height = H; box.appendChild(c);
  const info = document.createElement("div"); info.className = "info";
  const details = Object.entries(p.details)
    .map(([k, v]) => k + " " + (typeof v === "number" ? +v.toFixed(4) : v)).join(" · ");
  info.textContent = details; box.appendChild(info);
  const g = c.getContext("2d"); g.drawImage(img, 0, 0, W, H);
  const cw = W / p.cols, ch = H / p.rows;
  for (let r = 0; r < p.rows; r++) for (let q = 0; q < p.cols; q++) {
    const a = p.top > 0 ? p.weights[r * p.cols + q] / p.top : 0;
    g.fillStyle = "rgba(255,90,0," + (0.05 + 0.75 * a).toFixed(3) + ")"; g.fillRect(q * cw, r * ch, cw, ch);
  }
  if (p.box) {
    const [x0, y0, x1, y1] = p.box.map(v => v * scale);
    g.strokeStyle = "#00bcd4"; g.lineWidth = 2; g.strokeRect(x0, y0, x1 - x0, y1 - y0);
  }
  c.addEventListener("mousemove", e => {
    const b = c.getBoundingClientRect();
    const q = Math.min(p.cols - 1, Math.floor((e.clientX - b.left) / cw));
    const r = Math.min(p.rows - 1, Math.floor((e.clientY - b.top) / ch));
    info.textContent = "cell (" + r + ", " + q + "): " + p.weights[r * p.cols + q].toFixed(4);
  });
  c.addEventListener("mouseleave", () => { info.textContent = details; });
  return box;
}
img.onload = () => {
  const main = document.getElementById("cards"); for (const p of D.panels) main.appendChild(card(p));
};
img.src = D.image;
</script></body></html>
"""
