"""A single self-contained HTML page (no network, no CDN) to explore an `Explanation`.

Pick a layer (or rollout), a head (or the head average) and a direction, then
click a token, patch or audio frame to light up what it attends to, or what
attends to it. Weights travel as base64 typed arrays (top-k per query, 16-bit),
so the page stays small and responsive at thousands of tokens.

Safety: no user string is ever written into markup. All data (token texts,
titles) sits in one ``application/json`` block with ``<``, ``>``, ``&`` and the
line separators escaped, and the page script inserts it with ``textContent``.
Tokens are drawn from their visible form (`qkv.explain.tokens`: newlines,
tabs, controls, zero-width and bidirectional characters as stand-ins, in their
own style), each isolated from its neighbours' text direction; the true token
text travels beside it (``tokens``) and shows on hover.
"""

from __future__ import annotations

import base64
import io
import json
from pathlib import Path

import numpy as np

from .core import Explanation
from .render import find_token
from .tokens import pieces


def _b64(array: np.ndarray) -> str:
    return base64.b64encode(np.ascontiguousarray(array).tobytes()).decode("ascii")


def _shown(ex: Explanation) -> list:
    """Each position's visible form: a string, or for a token with stand-ins a list of runs that
    alternate plain text (even places) and stand-ins (odd places), e.g. ``["", "⏎"]``."""
    out = []
    for i in range(ex.length):
        runs = pieces(ex.text(i))
        if len(runs) == 1 and not runs[0][1]:
            out.append(runs[0][0])
            continue
        flat: list[str] = []
        for run, stand_in in runs:
            if stand_in != (len(flat) % 2 == 1):
                flat.append("")
            flat.append(run)
        out.append(flat)
    return out


def _views(ex: Explanation, k: int) -> list[dict]:
    views = []
    n = ex.length
    for m in ex.maps:
        choices = ([None] if m.mean is not None else []) + list(m.heads)
        for h in choices:
            val, idx = m.topk(h, k)
            views.append(_pack(f"layer {m.layer} · {'mean of heads' if h is None else f'head {h}'}", m.layer, h,
                               val.numpy(), idx.numpy(), n))
    if ex.rollout is not None:
        val, idx = ex.view("rollout", k=k)
        views.append(_pack("rollout", "rollout", None, val.numpy(), idx.numpy(), n))
    return views


def _pack(name, layer, head, values: np.ndarray, indices: np.ndarray, n: int) -> dict:
    top = float(values.max()) if values.size else 1.0
    top = top if top > 0 else 1.0
    q = np.clip(np.round(values / top * 65535), 0, 65535).astype("<u2")
    idx_dtype = "<u2" if n < 65535 else "<u4"
    idx = np.where(indices < 0, np.iinfo(idx_dtype).max, indices).astype(idx_dtype)
    return {"name": name, "layer": layer, "head": head, "scale": top, "values": _b64(q), "indices": _b64(idx)}


def _png_data_url(fig_or_image) -> str:
    buf = io.BytesIO()
    fig_or_image.save(buf, format="PNG")
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode("ascii")


def _spectrogram_image(spec: np.ndarray):
    """The log-mel features as a grey image, low frequencies at the bottom."""
    from PIL import Image

    x = np.flipud(spec)
    x = (x - x.min()) / max(float(x.max() - x.min()), 1e-6)
    return Image.fromarray((x * 255).astype(np.uint8))


def page_data(ex: Explanation, k: int | None = None, token: int | str | None = None) -> dict:
    """What the page carries; ``token`` (an index or a token's text) is the position shown selected."""
    k = k or (16 if ex.length <= 1024 else 8)
    data = {
        "kind": ex.kind, "title": f"{ex.model} · {ex.kind} · {ex.length} positions", "tokens": ex.tokens, "shown": _shown(ex),
        "k": k, "idxBytes": 2 if ex.length < 65535 else 4, "views": _views(ex, k), "notes": ex.notes,
        "selected": (0 if ex.kind == "image" else min(1, ex.length - 1)) if token is None else find_token(ex, token),
    }
    if ex.kind == "image":
        data["grid"] = list(ex.grid)
        data["image"] = _png_data_url(ex.image)
    if ex.kind == "audio":
        data["image"] = _png_data_url(_spectrogram_image(ex.spectrogram))
    return data


def safe_json(obj) -> str:
    """JSON that cannot end a <script> element or open markup, whatever strings it holds."""
    text = json.dumps(obj, ensure_ascii=False, separators=(",", ":"))
    for ch, esc in (("<", "\\u003c"), (">", "\\u003e"), ("&", "\\u0026"), ("\u2028", "\\u2028"), ("\u2029", "\\u2029")):
        text = text.replace(ch, esc)
    return text


def render_html(ex: Explanation, path: str | Path | None = None, k: int | None = None,
                token: int | str | None = None) -> str:
    """The page as a string; written to ``path`` when given. ``k``: keys kept per query (default 16,
    8 beyond 1,024 positions); ``token``: the position selected when the page opens (see `find_token`)."""
    html = _TEMPLATE.replace("/*DATA*/", safe_json(page_data(ex, k, token)))
    if path is not None:
        Path(path).write_text(html, encoding="utf-8")
    return html


_TEMPLATE = r"""<!DOCTYPE html>
<html lang="en"><head><meta charset="utf-8">
<meta http-equiv="Content-Security-Policy" content="default-src 'none'; img-src data:; style-src 'unsafe-inline'; script-src 'unsafe-inline'">
<title>qkv explain</title>
<style>
body{font:14px/1.5 system-ui,sans-serif;margin:0;color:#222;background:#fafafa}
header{position:sticky;top:0;background:#fff;border-bottom:1px solid #ddd;padding:8px 14px;display:flex;gap:14px;align-items:center;flex-wrap:wrap;z-index:5}
header h1{font-size:15px;margin:0 10px 0 0;font-weight:600}
main{display:flex;gap:16px;padding:14px}
#view{flex:1;min-width:0;overflow-x:auto}
#side{width:280px;flex:none;font-size:13px}
#tokens span.tok{cursor:pointer;border-radius:3px;padding:1px 1px;white-space:pre;unicode-bidi:isolate;display:inline-block;min-width:.5em}
span.ws{color:#8a5a00;font-style:italic;font-size:90%}
#tokens span.tok.sel{outline:2px solid #1565c0}
#tokens span.tok.special{color:#888}
#stage{position:relative;display:inline-block}
#stage img{display:block;image-rendering:pixelated}
#overlay{position:absolute;left:0;top:0;cursor:crosshair}
#list div{display:flex;justify-content:space-between;border-bottom:1px solid #eee;padding:2px 0}
#list span.t{overflow:hidden;text-overflow:ellipsis;white-space:pre;max-width:190px;unicode-bidi:isolate}
#hint{color:#666}
</style></head><body>
<header><h1 id="title"></h1>
<label>view <select id="layer"></select></label>
<label>head <select id="head"></select></label>
<label><input type="radio" name="dir" value="to" checked> attends to</label>
<label><input type="radio" name="dir" value="from"> attended by</label>
<span id="hint">click a position</span></header>
<main><div id="view"></div><div id="side"><div id="selected"></div><div id="list"></div><div id="notes"></div></div></main>
<script type="application/json" id="qkv-data">/*DATA*/</script>
<script>
"use strict";
const D = JSON.parse(document.getElementById("qkv-data").textContent);
const N = D.tokens.length, K = D.k;
document.title = "qkv explain · " + D.title;
document.getElementById("title").textContent = D.title;
for (const n of D.notes || []) { const p = document.createElement("p"); p.textContent = n; document.getElementById("notes").appendChild(p); }

function bytes(b64) { const s = atob(b64), a = new Uint8Array(s.length); for (let i = 0; i < s.length; i++) a[i] = s.charCodeAt(i); return a.buffer; }
const decoded = new Map();
function data(v) {  // lazily decoded typed arrays of one view
  if (!decoded.has(v)) {
    const view = D.views[v];
    const idx = D.idxBytes === 2 ? new Uint16Array(bytes(view.indices)) : new Uint32Array(bytes(view.indices));
    decoded.set(v, {val: new Uint16Array(bytes(view.values)), idx: idx, scale: view.scale / 65535, inv: null});
  }
  return decoded.get(v);
}
function inverse(d) {  // for each key: the queries that keep it in their top-k
  if (!d.inv) {
    const counts = new Uint32Array(N + 1);
    for (let j = 0; j < d.idx.length; j++) if (d.idx[j] < N) counts[d.idx[j] + 1]++;
    for (let i = 0; i < N; i++) counts[i + 1] += counts[i];
    const rows = new Uint32Array(counts[N]), w = new Float32Array(counts[N]), fill = counts.slice(0, N);
    for (let j = 0; j < d.idx.length; j++) { const key = d.idx[j]; if (key >= N) continue; const at = fill[key]++; rows[at] = Math.floor(j / K); w[at] = d.val[j] * d.scale; }
    d.inv = {start: counts, rows: rows, w: w};
  }
  return d.inv;
}

// a position's visible form: plain runs as text, stand-ins (newline, tab, controls...) in their own style
function fillShown(el, i) {
  const v = D.shown[i];
  if (typeof v === "string") { el.textContent = v; return; }
  v.forEach((run, r) => { if (!run) return; if (r % 2) { const w = document.createElement("span"); w.className = "ws"; w.textContent = run; el.appendChild(w); } else el.appendChild(document.createTextNode(run)); });
}
// a token's true text, quoted, with invisible and direction-changing code points escaped
function quoted(t) { return JSON.stringify(t).replace(/[\u007f-\u009f\u00ad\u061c\u115f\u1160\u180e\u200b-\u200f\u2028-\u202e\u2060-\u206f\u3164\ufeff\ufff0-\ufffb\ud800-\udfff]/g, c => "\\u" + c.charCodeAt(0).toString(16).padStart(4, "0")); }

// views: one per (layer, head) plus rollout
const layerSel = document.getElementById("layer"), headSel = document.getElementById("head");
const layers = [];
D.views.forEach(v => { if (!layers.includes(v.layer)) layers.push(v.layer); });
for (const l of layers) { const o = document.createElement("option"); o.value = String(l); o.textContent = l === "rollout" ? "rollout" : "layer " + l; layerSel.appendChild(o); }
function fillHeads() {
  headSel.textContent = "";
  D.views.forEach((v, i) => { if (String(v.layer) === layerSel.value) { const o = document.createElement("option"); o.value = String(i); o.textContent = v.head === null ? "mean of heads" : "head " + v.head; headSel.appendChild(o); } });
}
const plain = layers.filter(l => l !== "rollout");
layerSel.value = String(plain.length ? plain[plain.length - 1] : layers[0]);  // the last layer
fillHeads();

// the positions: text tokens (spans), or image patches / audio frames (cells of a canvas)
const cells = [];
let drawCells = null;
const viewEl = document.getElementById("view");
if (D.kind === "text") {
  const box = document.createElement("div"); box.id = "tokens"; viewEl.appendChild(box);
  D.tokens.forEach((t, i) => {
    const s = document.createElement("span"); s.className = /^[\[<].*[\]>]$/.test(t) ? "tok special" : "tok";
    fillShown(s, i); s.dataset.i = String(i); s.title = quoted(t) + " · position " + i;
    box.appendChild(s); box.appendChild(document.createTextNode(" ")); cells.push(s);
  });
  box.addEventListener("click", e => { const s = e.target.closest && e.target.closest("span.tok"); if (s) select(+s.dataset.i); });
} else {
  // images and audio: a canvas over the picture; cells are computed from the click position
  const stage = document.createElement("div"); stage.id = "stage"; viewEl.appendChild(stage);
  const img = document.createElement("img"); img.src = D.image; img.alt = ""; stage.appendChild(img);
  const canvas = document.createElement("canvas"); canvas.id = "overlay"; stage.appendChild(canvas);
  const first = D.kind === "image" ? 1 : 0;
  const rows = D.kind === "image" ? D.grid[0] : 1, cols = D.kind === "image" ? D.grid[1] : N;
  if (D.kind === "image") {
    const cls = document.createElement("button"); fillShown(cls, 0);
    cls.addEventListener("click", () => select(0)); viewEl.insertBefore(cls, stage);
  }
  const size = () => [canvas.width / cols, canvas.height / rows];
  function cell(j) { const q = j - first; const [w, h] = size(); return [(q % cols) * w, Math.floor(q / cols) * h, w, h]; }
  function fit() {
    const scale = D.kind === "image" ? Math.max(1, Math.floor(448 / img.naturalWidth)) : 1;
    img.width = D.kind === "image" ? img.naturalWidth * scale : Math.min(1500, img.naturalWidth);
    img.height = D.kind === "image" ? img.naturalHeight * scale : 200;
    canvas.width = img.width; canvas.height = img.height;
    if (selected >= 0) select(selected);
  }
  img.addEventListener("load", fit);
  if (img.complete && img.naturalWidth) fit();
  canvas.addEventListener("click", e => {
    const r = canvas.getBoundingClientRect(), [w, h] = size();
    const col = Math.min(cols - 1, Math.floor((e.clientX - r.left) / w)), row = Math.min(rows - 1, Math.floor((e.clientY - r.top) / h));
    select(first + row * cols + col);
  });
  drawCells = function (pairs, top) {
    const g = canvas.getContext("2d"); g.clearRect(0, 0, canvas.width, canvas.height);
    for (const [j, w] of pairs) { if (j < first) continue; const [x, y, cw, ch] = cell(j); g.fillStyle = "rgba(255,120,0," + (0.15 + 0.75 * (top > 0 ? w / top : 0)).toFixed(3) + ")"; g.fillRect(x, y, Math.max(cw, 1), ch); }
    if (selected >= first) { const [x, y, cw, ch] = cell(selected); g.strokeStyle = "#1565c0"; g.lineWidth = 2; g.strokeRect(x, y, Math.max(cw, 2), ch); }
  };
}
let selected = -1, lit = [];
function direction() { return document.querySelector('input[name="dir"]:checked').value; }
function paint(pairs) {
  for (const c of lit) c.style.background = "";
  lit = [];
  let top = 0; for (const p of pairs) top = Math.max(top, p[1]);
  if (drawCells) drawCells(pairs, top);
  for (const [j, w] of pairs) { const c = cells[j]; if (!c) continue; const a = top > 0 ? w / top : 0; c.style.background = "rgba(255,120,0," + (0.08 + 0.82 * a).toFixed(3) + ")"; lit.push(c); }
  const list = document.getElementById("list"); list.textContent = "";
  pairs.slice().sort((a, b) => b[1] - a[1]).slice(0, 20).forEach(([j, w]) => {
    const row = document.createElement("div"), t = document.createElement("span"), v = document.createElement("span");
    t.className = "t"; fillShown(t, j); t.title = quoted(D.tokens[j]); v.textContent = w.toFixed(4); row.appendChild(t); row.appendChild(v); list.appendChild(row);
  });
}
function select(i) {
  if (selected >= 0 && cells[selected]) cells[selected].classList.remove("sel");
  selected = i; if (cells[i]) cells[i].classList.add("sel");
  const head = document.getElementById("selected"); head.textContent = direction() === "to" ? "what " : "what attends to ";
  const name = document.createElement("b"); name.style.unicodeBidi = "isolate"; name.style.whiteSpace = "pre"; fillShown(name, i); name.title = quoted(D.tokens[i]);
  head.appendChild(name); head.appendChild(document.createTextNode(" (position " + i + ")" + (direction() === "to" ? " attends to" : "")));
  const d = data(+headSel.value), pairs = [];
  if (direction() === "to") {
    for (let r = 0; r < K; r++) { const j = d.idx[i * K + r]; if (j < N) pairs.push([j, d.val[i * K + r] * d.scale]); }
  } else {
    const inv = inverse(d); for (let at = inv.start[i]; at < inv.start[i + 1]; at++) pairs.push([inv.rows[at], inv.w[at]]);
  }
  paint(pairs);
}
layerSel.addEventListener("change", () => { fillHeads(); if (selected >= 0) select(selected); });
headSel.addEventListener("change", () => { if (selected >= 0) select(selected); });
document.querySelectorAll('input[name="dir"]').forEach(r => r.addEventListener("change", () => { if (selected >= 0) select(selected); }));
select(D.selected);
</script></body></html>
"""
