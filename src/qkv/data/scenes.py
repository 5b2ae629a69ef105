"""Synthetic scenes for detection, segmentation and captioning: generated offline, deterministic by seed.

Each scene is an RGB canvas (dark noisy background) holding 1..``max_objects`` objects: handwritten digits
from scikit-learn's bundled ``load_digits`` (8 x 8, upscaled) and filled shapes (square, circle, triangle),
at random positions, sizes and colours. Objects drawn later occlude earlier ones; every object keeps at
least half of its pixels visible, and its box, its class-map pixels and its instance-map pixels all
describe what is visible.

Class ids (`CLASSES`): 0 background, 1..10 the digits "0".."9" (id = digit + 1), 11 square, 12 circle,
13 triangle.

Captions follow one exact grammar (`caption`), so exact match is learnable::

    caption  := phrase (" " relation " " phrase)*      objects left to right (box centre x, then y)
    phrase   := "a " colour " " name                   name: "0".."9", "square", "circle", "triangle"
    relation := "left of" | "above" | "below"          between each object and the next one:
                "left of" when the next centre is at least as far right as it is up or down,
                else "above" (the next one is lower) or "below" (the next one is higher)

e.g. ``"a red circle left of a blue 3 above a white square"``.

Splits are disjoint by construction: scene ``i`` of a split draws from its own random stream
``SeedSequence([seed, split id, i])``, and each split uses its own digit samples (``load_digits`` sample
``j`` belongs to train if ``j % 5 < 3``, val if ``j % 5 == 3``, test if ``j % 5 == 4``).
"""

from __future__ import annotations

from functools import lru_cache

import numpy as np
import torch

from .core import IGNORE, Data, DataError

SHAPES = ("square", "circle", "triangle")
CLASSES = ["background"] + [str(d) for d in range(10)] + list(SHAPES)  # index = class id
COLOURS = {  # no name starts with a vowel: the article is always "a"
    "red": (220, 40, 40), "green": (40, 190, 70), "blue": (50, 100, 240), "yellow": (235, 215, 40),
    "purple": (150, 70, 220), "cyan": (40, 205, 215), "white": (240, 240, 240), "pink": (245, 130, 190),
}
RELATIONS = ("left of", "above", "below")
CAPTION_WORDS = sorted({"a", "left", "of", "above", "below", *COLOURS, *CLASSES[1:]})
SPLITS = {"train": 0, "val": 1, "test": 2}
MIN_VISIBLE = 0.5  # fraction of its own pixels each object keeps after later ones are drawn
_TRIES = 20  # placements tried per object before it is left out


@lru_cache(maxsize=1)
def _digits() -> tuple[np.ndarray, np.ndarray]:
    try:
        from sklearn.datasets import load_digits
    except ImportError:
        raise DataError("the scenes set draws digits from scikit-learn: pip install scikit-learn") from None
    d = load_digits()
    return d.images.astype(np.float32) / 16.0, d.target.astype(np.int64)  # (1797, 8, 8) in [0, 1], (1797,)


def digit_indices(split: str) -> np.ndarray:
    """The ``load_digits`` samples a split draws its digits from (disjoint across splits)."""
    n = len(_digits()[1])
    j = np.arange(n)
    keep = {"train": j % 5 < 3, "val": j % 5 == 3, "test": j % 5 == 4}[split]
    return j[keep]


def _shape_mask(name: str, s: int) -> np.ndarray:
    """A filled shape in an ``s`` x ``s`` square (bool)."""
    yy, xx = np.mgrid[0:s, 0:s] + 0.5  # pixel centres
    if name == "square":
        return np.ones((s, s), dtype=bool)
    if name == "circle":
        return (yy - s / 2) ** 2 + (xx - s / 2) ** 2 <= (s / 2) ** 2
    return np.abs(xx - s / 2) <= yy / 2  # triangle: apex at the top centre, base along the bottom row


def _digit_patch(image: np.ndarray, s: int) -> tuple[np.ndarray, np.ndarray]:
    """A digit upscaled to ``s`` x ``s`` (bilinear): (mask, intensity in [0, 1])."""
    from PIL import Image

    big = np.asarray(Image.fromarray(image, mode="F").resize((s, s), Image.BILINEAR))
    return big > 0.3, np.clip(big, 0.0, 1.0)


def _bbox(mask: np.ndarray) -> tuple[int, int, int, int]:
    """(x0, y0, x1, y1) of the True pixels: x1, y1 are one past the last column / row."""
    ys, xs = np.nonzero(mask)
    return int(xs.min()), int(ys.min()), int(xs.max()) + 1, int(ys.max()) + 1


def caption(objects: list[dict]) -> str:
    """The caption of a scene's objects (each with "name", "colour" and "box"), by the grammar above."""
    def centre(o):
        x0, y0, x1, y1 = o["box"]
        return (x0 + x1) / 2, (y0 + y1) / 2

    order = sorted(range(len(objects)), key=lambda i: (*centre(objects[i]), i))
    words = []
    for k, i in enumerate(order):
        if k:
            (ax, ay), (bx, by) = centre(objects[order[k - 1]]), centre(objects[i])
            words.append("left of" if bx - ax >= abs(by - ay) else "above" if by > ay else "below")
        words.append(f"a {objects[i]['colour']} {objects[i]['name']}")
    return " ".join(words)


def _scene(rng: np.random.Generator, size: int, n_objects: int, scale: tuple[float, float],
           classes: list[int], pool: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray, list[dict]]:
    images, targets = _digits()
    canvas = rng.integers(0, 40, 3)[None, None, :] + rng.integers(0, 20, (size, size, 3))  # (H, W, 3)
    inst = np.zeros((size, size), dtype=np.uint8)  # 0 background, k: the k-th object drawn
    lo, hi = max(4, int(round(scale[0] * size))), max(4, int(round(scale[1] * size)))
    drawn: list[dict] = []
    for _ in range(n_objects):
        cls = int(rng.choice(classes))
        colour = list(COLOURS)[int(rng.integers(len(COLOURS)))]
        if cls <= 10:  # a digit: a sample of that digit from this split's pool
            choices = pool[targets[pool] == cls - 1]
            digit = int(choices[rng.integers(len(choices))])
        for _ in range(_TRIES):
            s = int(rng.integers(lo, hi + 1))
            x, y = int(rng.integers(0, size - s + 1)), int(rng.integers(0, size - s + 1))
            if cls <= 10:
                local, shade = _digit_patch(images[digit], s)
            else:
                local, shade = _shape_mask(CLASSES[cls], s), np.ones((s, s), dtype=np.float32)
            full = np.zeros((size, size), dtype=bool)
            full[y : y + s, x : x + s] = local
            after = np.where(full, 0, inst)
            counts = np.bincount(after.ravel(), minlength=len(drawn) + 1)
            if local.any() and all(counts[k + 1] >= MIN_VISIBLE * o["area"] for k, o in enumerate(drawn)):
                break
        else:
            continue  # no placement keeps every earlier object visible enough: leave this one out
        rgb = np.array(COLOURS[colour], dtype=np.float32) * (0.55 + 0.45 * shade[..., None])  # (s, s, 3)
        window = canvas[y : y + s, x : x + s]
        window[local] = rgb[local].astype(canvas.dtype)
        inst = after
        inst[full] = len(drawn) + 1
        drawn.append({"class": cls, "name": CLASSES[cls], "colour": colour, "area": int(full.sum()),
                      "digit_index": digit if cls <= 10 else -1})
    labels = np.array([0] + [o["class"] for o in drawn], dtype=np.uint8)
    for k, o in enumerate(drawn):
        o["box"] = _bbox(inst == k + 1)
        o["visible"] = int((inst == k + 1).sum())
    return canvas.astype(np.uint8), labels[inst], inst, drawn


def scenes(n: int, split: str = "train", seed: int = 0, size: int = 64, max_objects: int = 3,
           min_objects: int = 1, scale: tuple[float, float] = (0.2, 0.45), digits: bool = True,
           shapes: bool = True) -> dict:
    """``n`` generated scenes of one split (``"train"``, ``"val"`` or ``"test"``).

    Returns a dict:
      ``images`` uint8 (n, size, size, 3); ``masks`` uint8 (n, size, size) class ids (0 background);
      ``instances`` uint8 (n, size, size): 0 background, k the object ``objects[i][k - 1]``;
      ``boxes`` list of n float32 (k_i, 4) arrays, pixel (x0, y0, x1, y1) with x1, y1 one past the last
      visible column / row; ``labels`` list of n int64 (k_i,) class ids; ``captions`` list of n str;
      ``objects`` per scene a list of dicts (class, name, colour, box, area, visible, digit_index);
      ``classes`` `CLASSES`.
    ``scale``: the object's side as a fraction of the canvas (low, high).
    """
    if split not in SPLITS:
        raise DataError(f"scenes: split {split!r} is not one of {list(SPLITS)}")
    if not 1 <= min_objects <= max_objects <= 255:
        raise DataError(f"scenes: need 1 <= min_objects <= max_objects <= 255; got {min_objects}, {max_objects}")
    if not 0 < scale[0] <= scale[1] <= 1 or size < 8:
        raise DataError(f"scenes: need size >= 8 and 0 < scale[0] <= scale[1] <= 1; got size={size}, scale={scale}")
    classes = ([*range(1, 11)] if digits else []) + ([11, 12, 13] if shapes else [])
    if not classes:
        raise DataError("scenes: digits=False and shapes=False leave no objects to draw")
    if seed < 0:
        raise DataError(f"scenes: seed must be >= 0; got {seed}")
    pool = digit_indices(split)
    out = {"images": [], "masks": [], "instances": [], "boxes": [], "labels": [], "captions": [], "objects": []}
    for i in range(n):
        rng = np.random.default_rng(np.random.SeedSequence([seed, SPLITS[split], i]))
        k = int(rng.integers(min_objects, max_objects + 1))
        image, mask, inst, objects = _scene(rng, size, k, scale, classes, pool)
        out["images"].append(image)
        out["masks"].append(mask)
        out["instances"].append(inst)
        out["boxes"].append(np.array([o["box"] for o in objects], dtype=np.float32).reshape(-1, 4))
        out["labels"].append(np.array([o["class"] for o in objects], dtype=np.int64))
        out["captions"].append(caption(objects))
        out["objects"].append(objects)
    for key in ("images", "masks", "instances"):
        shape = (0, size, size, 3) if key == "images" else (0, size, size)
        out[key] = np.stack(out[key]) if n else np.zeros(shape, dtype=np.uint8)
    out["classes"] = list(CLASSES)
    return out


TASKS = ("detect", "segment", "caption")


def vision_table(d: dict, task: str, tokenizer=None, max_objects: int | None = None,
                 max_length: int = 256) -> dict[str, torch.Tensor]:
    """Rows for a task from a `scenes` (or `qkv.data.vision_files`) dict, sharing their first dimension:

    ``pixel_values`` float (N, 3, H, W) in [-1, 1], and
      detect:  ``boxes`` float (N, M, 4) pixel x0, y0, x1, y1 (zero rows past an image's objects) and
               ``labels`` long (N, M) class ids, `IGNORE` past an image's objects (M: ``max_objects`` or the
               most objects in one image);
      segment: ``labels`` long (N, H, W) class ids (mask value 255, "unlabelled", becomes `IGNORE`);
      caption: ``labels`` long (N, L) the caption's token ids then ``<eos>``, `IGNORE` after (as seq2seq).
    """
    x = torch.from_numpy(np.ascontiguousarray(d["images"])).permute(0, 3, 1, 2).float() / 127.5 - 1.0
    table = {"pixel_values": x}  # (N, 3, H, W)
    if task == "detect":
        most = max((len(b) for b in d["boxes"]), default=0)
        m = most if max_objects is None else max_objects
        if most > m:
            raise DataError(f"an image has {most} objects; max_objects={m}: raise it")
        boxes = torch.zeros(len(d["boxes"]), m, 4)
        labels = torch.full((len(d["boxes"]), m), IGNORE, dtype=torch.long)
        for i, (b, c) in enumerate(zip(d["boxes"], d["labels"])):
            boxes[i, : len(b)] = torch.as_tensor(b, dtype=torch.float32).reshape(-1, 4)
            labels[i, : len(c)] = torch.as_tensor(c, dtype=torch.long)
        table.update(boxes=boxes, labels=labels)
    elif task == "segment":
        masks = torch.from_numpy(np.ascontiguousarray(d["masks"])).long()  # (N, H, W)
        table["labels"] = masks.masked_fill(masks == 255, IGNORE)
    elif task == "caption":
        from .text import encode_texts

        enc = encode_texts(tokenizer, d["captions"], max_length - 1)
        n, width = enc["input_ids"].shape
        labels = torch.full((n, width + 1), IGNORE, dtype=torch.long)
        for i in range(n):
            k = int(enc["attention_mask"][i].sum())
            labels[i, :k] = enc["input_ids"][i, :k]
            labels[i, k] = tokenizer.eos_id
        table["labels"] = labels
    else:
        raise DataError(f"task {task!r}: vision data serves one of {list(TASKS)}")
    return table


def vision_info(table: dict, task: str, classes: list[str], tokenizer=None) -> dict:
    """What a model config needs from the data: classes (background included), input shape, vocabulary."""
    info = {"num_labels": len(classes), "input_shape": tuple(table["pixel_values"].shape[1:]),
            "image_size": list(table["pixel_values"].shape[2:])}
    if task == "detect":
        info["max_objects"] = int(table["labels"].shape[1])
    if task == "caption":
        info.update(vocab_size=tokenizer.vocab_size, max_length=int(table["labels"].shape[1]))
    return info


def pad_labels(splits: dict[str, dict]) -> None:
    """Caption labels of every split padded (`IGNORE`) to one width, the longest."""
    width = max(t["labels"].shape[1] for t in splits.values())
    for t in splits.values():
        t["labels"] = torch.nn.functional.pad(t["labels"], (0, width - t["labels"].shape[1]), value=IGNORE)


def scenes_data(cfg, task: str, seed: int = 0, n_train: int = 2000, n_val: int = 250, n_test: int = 250,
                size: int = 64, max_objects: int = 3, min_objects: int = 1, digits: bool = True,
                shapes: bool = True) -> Data:
    """The ``scenes`` built-in as `Data` tables for ``task`` (detect, segment or caption); ``cfg`` is a
    `qkv.train.config.DataConfig` (its tokenizer, vocab_size and max_length serve captions)."""
    if task not in TASKS:
        raise DataError(f"data.dataset 'scenes' serves the tasks {list(TASKS)}, not {task!r}")
    opts = dict(size=size, max_objects=max_objects, min_objects=min_objects, digits=digits, shapes=shapes)
    parts = {s: scenes(n, s, seed, **opts) for s, n in (("train", n_train), ("val", n_val), ("test", n_test))}
    tok = None
    if task == "caption":
        from .text import train_tokenizer

        tok = train_tokenizer(cfg.tokenizer, parts["train"]["captions"], cfg.vocab_size)
    splits = {s: vision_table(p, task, tok, max_objects, cfg.max_length) for s, p in parts.items()}
    if task == "caption":
        pad_labels(splits)
    return Data("table", splits, tok, list(CLASSES), info=vision_info(splits["train"], task, CLASSES, tok))
