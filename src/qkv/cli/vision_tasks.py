"""`qkv detect`, `qkv segment`, `qkv caption`: object detection, semantic segmentation and captioning of images.

Each reads image files with ``--model`` (a folder `qkv.load` reads: YOLOS, SegFormer, or a ViT + GPT-2
captioner) and prints one line per image, or with ``--json`` one JSON object::

    {"command": "detect", "model": M, "images": [{"path", "width", "height", ...results}], ...options}

- detect: ``"detections": [{"label", "label_id", "score", "box": [x0, y0, x1, y1]}]``, boxes in pixels of
  the image and clamped inside it (0 <= x0 <= x1 <= width, 0 <= y0 <= y1 <= height).
- segment: ``"labels"`` (class names by id), ``"classes": [{"label_id", "label", "pixels"}]`` (classes present,
  pixel counts summing to width x height) and ``"mask": {"encoding": "runs", "order": "row-major", "shape":
  [height, width], "runs": [[label_id, length], ...]}``: the class map read row by row as runs of one class
  (the lengths sum to height x width; expand with ``numpy.repeat`` and reshape).
- caption: ``"caption"`` (text), ``"token_ids"`` (the generated ids after the start token, up to the first
  stop token) and ``"tokens"`` (the text of each).

Outputs (``--png OUT`` the drawn result, ``--explain OUT.png|OUT.html`` the attention explanation): with one
image, OUT is a file; with several, OUT is a pattern holding ``{stem}`` (the image's file name without
extension) and/or ``{index}`` (its position, from 0), e.g. ``out/{index}-{stem}.png``, or an existing folder
(files ``<stem>.png``, or ``<stem>.html`` for --explain). Files written are listed under ``"outputs"``.
"""

from __future__ import annotations

import json
from pathlib import Path


from ._args import input_file, integer, load_model, number

_EXPLAIN_SUFFIXES = (".png", ".html", ".htm")


def _safe(text: str) -> str:
    from ..explain.tokens import terminal_safe

    return terminal_safe(text)


def _images(args) -> list[Path]:
    return [input_file(p, "IMAGE") for p in args.images]


def _load(args, method: str, does: str):
    """``qkv.load(--model)``, refused naming --model unless it has ``method``."""
    model = load_model(args, args.model)
    if not callable(getattr(model, method, None)):
        raise ValueError(f"--model {args.model} is a {type(model).__name__}, which does not {does}")
    return model


def _targets(pattern: str | None, images: list[Path], flag: str, suffixes: tuple[str, ...],
             folder_suffix: str) -> list[Path] | None:
    """One output path per image for ``flag`` (see the module docstring), checked before any work."""
    if pattern is None:
        return None
    if "{" in pattern:
        try:
            paths = [Path(pattern.format(stem=p.stem, index=i)) for i, p in enumerate(images)]
        except (KeyError, IndexError, ValueError) as e:
            raise ValueError(f"{flag} {pattern}: a pattern may hold only {{stem}} and {{index}} ({e})") from None
    elif Path(pattern).is_dir():
        paths = [Path(pattern) / f"{p.stem}{folder_suffix}" for p in images]
    elif len(images) > 1:
        raise ValueError(f"{flag} {pattern}: {len(images)} images need a pattern such as out/{{index}}-{{stem}}"
                         f"{suffixes[0]} or an existing folder")
    else:
        paths = [Path(pattern)]
    if len(set(paths)) < len(paths):
        raise ValueError(f"{flag} {pattern}: images share a name, so their outputs would collide; put {{index}} in "
                         "the pattern")
    for p in paths:
        if p.suffix.lower() not in suffixes:
            raise ValueError(f"{flag} {p}: give a file name ending in {' or '.join(suffixes)}")
        if p.is_dir():
            raise ValueError(f"{flag} {p}: is a folder; give a file name")
        if not p.parent.is_dir():
            raise FileNotFoundError(f"{flag} {p}: the folder {p.parent} does not exist; create it first")
    return paths


def _plan(args, images):
    png = _targets(args.png, images, "--png", (".png",), ".png")
    explain = _targets(args.explain, images, "--explain", _EXPLAIN_SUFFIXES, ".html")
    if png and explain and set(png) & set(explain):
        raise ValueError(f"--png {args.png} and --explain {args.explain} name the same file; give two names")
    return png, explain


def _write_explanation(ex, path: Path) -> None:
    from ..explain import vision_tasks as V

    (V.html if path.suffix.lower() in (".html", ".htm") else V.png)(ex, path)


def _finish(args, rows: list[dict], outputs: dict, options: dict) -> int:
    written = {k: [str(p) for p in v] for k, v in outputs.items() if v}
    if args.json:
        body = {"command": args.command, "model": args.model, **options, "images": rows}
        if written:
            body["outputs"] = written
        print(json.dumps(body))
        return 0
    for what, paths in written.items():
        for p in paths:
            print(_safe(f"wrote {what}: {p}"))
    return 0


# --- detect ----------------------------------------------------------------------------------------------


def _cmd_detect(args) -> int:
    from ..explain import vision_tasks as V
    from ..models.vision import _load_image

    images = _images(args)
    png, explain = _plan(args, images)
    model = _load(args, "detect", "detect objects (give a YOLOS folder)")
    rows = []
    for i, path in enumerate(images):
        im = _load_image(path)
        if explain:  # the same forward pass gives the detections and their attention
            ex = V.explain_detections(model, im, threshold=args.threshold, rollout=args.rollout, name=args.model)
            dets = [{k: p.extra[k] for k in ("label", "label_id", "score")} | {"box": p.box} for p in ex.panels]
            _write_explanation(ex, explain[i])
        else:
            dets = [d | {"box": V.clamp_box(d["box"], im.width, im.height)}
                    for d in model.detect(im, threshold=args.threshold)]
        rows.append({"path": str(path), "width": im.width, "height": im.height, "detections": dets})
        if png:
            _draw_detections(im, dets, png[i])
        if not args.json:
            found = ", ".join(f"{d['label']} {d['score']:.2f} [{', '.join(f'{v:.0f}' for v in d['box'])}]"
                              for d in dets) or "nothing above the threshold"
            print(_safe(f"{path}: {found}"))
    return _finish(args, rows, {"png": png, "explain": explain}, {"threshold": args.threshold})


def _figure(im, extra_height: float = 0.0):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    h = 8.0 * im.height / im.width  # 800 pixels wide at dpi 100
    below = extra_height / (h + extra_height)  # the share of the figure under the image
    fig = plt.figure(figsize=(8.0, h + extra_height))
    ax = fig.add_axes((0, below, 1, 1 - below))
    ax.imshow(im)
    ax.set_axis_off()
    return fig, ax, plt


def _draw_detections(im, dets: list[dict], path: Path) -> None:
    from matplotlib.patches import Rectangle

    from ..explain.render import _plain

    fig, ax, plt = _figure(im)
    colours = plt.get_cmap("tab10")
    for d in dets:
        x0, y0, x1, y1 = d["box"]
        colour = colours(d["label_id"] % 10)
        ax.add_patch(Rectangle((x0, y0), x1 - x0, y1 - y0, fill=False, edgecolor=colour, linewidth=2))
        ax.text(x0, y0, _plain(f"{d['label']} {d['score']:.2f}"), color="white", fontsize=9, va="bottom",
                bbox=dict(facecolor=colour, edgecolor="none", pad=1.5), clip_on=True)
    fig.savefig(path, dpi=100, format="png")
    plt.close(fig)


# --- segment ---------------------------------------------------------------------------------------------


def runs(mask) -> list[list[int]]:
    """A class map (H, W) read row by row as [[class id, run length], ...]."""
    import numpy as np

    flat = np.asarray(mask).reshape(-1)
    if not flat.size:
        return []
    starts = np.flatnonzero(np.r_[True, flat[1:] != flat[:-1]])
    lengths = np.diff(np.r_[starts, flat.size])
    return [[int(flat[s]), int(n)] for s, n in zip(starts, lengths)]


def _cmd_segment(args) -> int:
    import numpy as np

    from ..explain import vision_tasks as V
    from ..models.vision import _load_image

    images = _images(args)
    png, explain = _plan(args, images)
    model = _load(args, "segment", "segment images (give a SegFormer folder with a decode head)")
    names = model.config.labels or [str(i) for i in range(model.config.num_labels)]
    rows = []
    for i, path in enumerate(images):
        im = _load_image(path)
        if explain:
            ex = V.explain_segments(model, im, block=args.block, name=args.model)
            mask = ex.mask
            _write_explanation(ex, explain[i])
        else:
            mask = model.segment(im).numpy()
        ids, counts = np.unique(mask, return_counts=True)
        classes = [{"label_id": int(k), "label": names[int(k)], "pixels": int(n)} for k, n in zip(ids, counts)]
        rows.append({"path": str(path), "width": im.width, "height": im.height, "labels": names, "classes": classes,
                     "mask": {"encoding": "runs", "order": "row-major", "shape": [im.height, im.width],
                              "runs": runs(mask)}})
        if png:
            _draw_segments(im, mask, classes, png[i])
        if not args.json:
            total = im.width * im.height
            shares = ", ".join(f"{c['label']} {100 * c['pixels'] / total:.1f}%" for c in classes)
            print(_safe(f"{path} ({im.width}x{im.height}): {shares}"))
    return _finish(args, rows, {"png": png, "explain": explain}, {})


def _draw_segments(im, mask, classes: list[dict], path: Path) -> None:
    import numpy as np
    from matplotlib.patches import Patch

    from ..explain.render import _plain

    fig, ax, plt = _figure(im)
    colours = plt.get_cmap("tab20")
    rgba = np.array([colours(k % 20) for k in range(int(mask.max()) + 1)])[mask]  # (H, W, 4)
    ax.imshow(rgba, alpha=0.5, interpolation="nearest")
    total = mask.size
    handles = [Patch(color=colours(c["label_id"] % 20), label=_plain(f"{c['label']} {100 * c['pixels'] / total:.1f}%"))
               for c in sorted(classes, key=lambda c: -c["pixels"])[:20]]
    ax.legend(handles=handles, loc="upper right", fontsize=8, framealpha=0.8)
    fig.savefig(path, dpi=100, format="png")
    plt.close(fig)


# --- caption ---------------------------------------------------------------------------------------------


def _generation(args) -> dict:
    sample = args.sample or args.temperature is not None
    if sample and args.num_beams:
        from ._args import UsageError

        raise UsageError("--num-beams is beam search (deterministic): drop --sample and --temperature, "
                         "or drop --num-beams")
    return {"max_new_tokens": args.max_new_tokens, "num_beams": args.num_beams, "do_sample": True if sample else None,
            "temperature": args.temperature, "seed": args.seed}


def _cmd_caption(args) -> int:
    from ..explain import vision_tasks as V
    from ..models.vision import _load_image

    images = _images(args)
    png, explain = _plan(args, images)
    opts = _generation(args)
    model = _load(args, "caption", "caption images (give a ViT + GPT-2 captioner folder)")
    model._require_tokenizer("qkv caption (the folder needs tokenizer.json)")
    rows = []
    for i, path in enumerate(images):
        im = _load_image(path)
        if explain:
            ex = V.explain_caption(model, im, name=args.model, **opts)
            ids, text = [p.extra["token_id"] for p in ex.panels], ex.text
            _write_explanation(ex, explain[i])
        else:
            ids, text = V.caption_tokens(model, im, **opts)
        rows.append({"path": str(path), "width": im.width, "height": im.height, "caption": text, "token_ids": ids,
                     "tokens": model.tokenizer.token_texts(ids)})
        if png:
            _draw_caption(im, text, png[i])
        if not args.json:
            print(_safe(f"{path}\t{text}"))
    return _finish(args, rows, {"png": png, "explain": explain}, {k: v for k, v in opts.items() if v is not None})


def _draw_caption(im, text: str, path: Path) -> None:
    import textwrap

    from ..explain.render import _plain

    lines = textwrap.wrap(text, 70) or ["(empty caption)"]
    fig, ax, plt = _figure(im, extra_height=0.35 * len(lines) + 0.3)
    fig.text(0.5, 0.1 / (1 + len(lines)), _plain("\n".join(lines)), ha="center", va="bottom", fontsize=12,
             wrap=True)
    fig.savefig(path, dpi=100, format="png")
    plt.close(fig)


# --- parsers ---------------------------------------------------------------------------------------------


def _common(p, model_help: str) -> None:
    p.add_argument("images", nargs="+", metavar="IMAGE", help="image files (PNG, JPEG, ...)")
    p.add_argument("--model", required=True, help=model_help)
    p.add_argument("--json", action="store_true", help="print one JSON object with every image's results")
    p.add_argument("--png", metavar="OUT", help="draw the results on each image into this PNG (several images: a "
                   "pattern with {stem} / {index}, or a folder)")
    p.add_argument("--explain", metavar="OUT", help="write where the model looked: OUT.png (heatmap panels) or "
                   "OUT.html (a self-contained page); several images: a pattern or a folder (HTML)")


def add_parsers(sub) -> None:
    """Add `detect`, `segment` and `caption` to the `qkv` subcommands ``sub``."""
    de = sub.add_parser("detect", help="objects in images (YOLOS)",
                        description="Detect objects with a YOLOS model: labels, scores and pixel boxes per image; "
                                    "--explain shows the patches each detection's token attended to.")
    _common(de, "YOLOS model folder (config.json, model.safetensors, preprocessor_config.json)")
    de.add_argument("--threshold", type=number(0, 1), default=0.5, help="keep detections scoring above this")
    de.add_argument("--rollout", action="store_true", help="--explain: attention rollout over all layers instead "
                    "of the last layer")
    de.set_defaults(func=_cmd_detect)

    se = sub.add_parser("segment", help="a class for every pixel (SegFormer)",
                        description="Semantic segmentation with a SegFormer model: per image the class map "
                                    "(run-length in JSON), class pixel counts; --explain shows each class's "
                                    "attention.")
    _common(se, "SegFormer model folder (config.json, model.safetensors, preprocessor_config.json)")
    se.add_argument("--block", type=integer(), default=-1, help="--explain: the attention block, counted over all "
                    "stages (default -1: the last)")
    se.set_defaults(func=_cmd_segment)

    ca = sub.add_parser("caption", help="describe images in words (ViT encoder + GPT-2 decoder)",
                        description="Caption images with a vision-encoder-decoder model; --explain shows each "
                                    "token's cross-attention over the image patches.")
    _common(ca, "captioner folder (config.json, model.safetensors, tokenizer.json, preprocessor_config.json)")
    ca.add_argument("--max-new-tokens", "--max-tokens", dest="max_new_tokens", type=integer(1, 1_000_000),
                    default=None, help="longest caption in tokens (default: the checkpoint's generation config)")
    ca.add_argument("--num-beams", type=integer(1, 64), default=None, help="beam search with this many beams")
    ca.add_argument("--sample", action="store_true", help="sample instead of greedy decoding")
    ca.add_argument("--temperature", type=number(0, 100, low_open=True), default=None, help="sampling temperature "
                    "(implies --sample)")
    ca.add_argument("--seed", type=integer(0, 2**63 - 1), default=None, help="seed for sampling")
    ca.set_defaults(func=_cmd_caption)
