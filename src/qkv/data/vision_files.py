"""The user's own detection, segmentation and captioning data, read into the structure `qkv.data.scenes` returns.

- Detection: a COCO-style JSON file: ``images`` ({id, file_name}), ``annotations`` ({image_id, bbox
  [x, y, w, h] in pixels, category_id}; ``iscrowd: 1`` regions are skipped) and ``categories`` ({id, name}).
  Category ids may be any integers: they become class ids 1..K in increasing id order (0 is background).
- Segmentation: a folder with ``images/NAME.png|jpg|jpeg`` and ``masks/NAME.png`` (one 8-bit class id per
  pixel, 0 background, 255 unlabelled) and optionally ``classes.txt`` (line i names class i).
- Captioning: a JSONL file, one ``{"image": "relative/path.png", "caption": "..."}`` per line.

Image paths are relative to the annotation file's folder (the segmentation folder) and may not leave it.
Images are resized to ``image_size`` x ``image_size`` (boxes scaled with them, masks by nearest neighbour);
``image_size=None`` keeps them as they are, which needs all of one size. Every refusal is a `DataError`
naming the file and the entry (``annotations[3]``) or line (``captions.jsonl:7``).
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np

from .core import Data, DataError, split_rows

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg")
UNLABELLED = 255  # mask value for pixels no class is asked for (as PASCAL VOC)


def _inside(root: Path, rel, where: str) -> Path:
    """``root / rel``, refused when ``rel`` is not a relative path that stays inside ``root``."""
    if not isinstance(rel, str) or not rel.strip():
        raise DataError(f"{where}: the image path must be a non-empty string; got {rel!r}")
    p = Path(rel)
    full = (root / p).resolve()
    if p.is_absolute() or not full.is_relative_to(root.resolve()):
        raise DataError(f"{where}: image path {rel!r} leaves the data folder {root}; give a path inside it")
    if not full.is_file():
        raise DataError(f"{where}: image {rel!r} not found (looked for {full})")
    return full


def _open(path: Path, where: str):
    from PIL import Image, UnidentifiedImageError

    try:
        with Image.open(path) as im:
            im.load()
            return im.copy()
    except (UnidentifiedImageError, OSError) as e:
        raise DataError(f"{where}: {path} is not a readable image ({e})") from None


def _rgb(path: Path, where: str, image_size: int | None) -> tuple[np.ndarray, tuple[int, int]]:
    """The image as uint8 (S, S, 3) and its original (width, height)."""
    from PIL import Image

    im = _open(path, where).convert("RGB")
    if image_size is not None:
        return np.asarray(im.resize((image_size, image_size), Image.BILINEAR)), im.size
    return np.asarray(im), im.size


def _stack(arrays: list[np.ndarray], files: list[str], what: str) -> np.ndarray:
    shapes = {a.shape for a in arrays}
    if len(shapes) > 1:
        first = arrays[0].shape
        odd = next(f for a, f in zip(arrays, files) if a.shape != first)
        raise DataError(f"{odd}: {what} of shape {next(a.shape for a in arrays if a.shape != first)} but "
                        f"{files[0]} has {first}; give image_size to resize them all")
    return np.stack(arrays)


def _result(images, files, classes, boxes=None, labels=None, masks=None, captions=None, **extra) -> dict:
    return {"images": images, "boxes": boxes, "labels": labels, "masks": masks, "instances": None,
            "captions": captions, "classes": classes, "files": files, **extra}


def _load_json(path: Path):
    if not path.is_file():
        raise DataError(f"{path}: no such annotation file")
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as e:
        raise DataError(f"{path}:{e.lineno}: not valid JSON ({e.msg}, column {e.colno})") from None
    except UnicodeDecodeError as e:
        raise DataError(f"{path}: not UTF-8 text ({e})") from None


def _entries(doc: dict, key: str, path: Path, fields: tuple[str, ...]) -> list[dict]:
    items = doc.get(key)
    if not isinstance(items, list):
        raise DataError(f"{path}: needs a list {key!r} (COCO format: images, annotations, categories)")
    for i, item in enumerate(items):
        if not isinstance(item, dict):
            raise DataError(f"{path}: {key}[{i}] is not an object")
        for f in fields:
            if f not in item:
                raise DataError(f"{path}: {key}[{i}] has no {f!r}")
    return items


def _unique_ids(items: list[dict], key: str, path: Path) -> dict:
    seen: dict = {}
    for i, item in enumerate(items):
        if isinstance(item["id"], bool) or not isinstance(item["id"], int):
            raise DataError(f"{path}: {key}[{i}] id {item['id']!r} is not an integer")
        if item["id"] in seen:
            raise DataError(f"{path}: {key}[{i}] repeats id {item['id']} of {key}[{seen[item['id']]}]")
        seen[item["id"]] = i
    return seen


def _bbox(ann: dict, where: str, width: int, height: int) -> list[float]:
    """COCO [x, y, w, h] checked against the image, as [x0, y0, x1, y1]."""
    b = ann["bbox"]
    if (not isinstance(b, list) or len(b) != 4
            or not all(isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v) for v in b)):
        raise DataError(f"{where}: bbox {b!r} must be 4 finite numbers [x, y, width, height]")
    x, y, w, h = (float(v) for v in b)
    if w <= 0 or h <= 0:
        raise DataError(f"{where}: bbox {b!r} has width or height <= 0; COCO boxes are [x, y, width, height]")
    slack = 1.0  # COCO exports round coordinates: allow a pixel past the edge, then clip
    if x < -slack or y < -slack or x + w > width + slack or y + h > height + slack:
        raise DataError(f"{where}: bbox {b!r} reaches outside the {width}x{height} image")
    return [max(x, 0.0), max(y, 0.0), min(x + w, float(width)), min(y + h, float(height))]


def coco_detection(path: str | Path, image_size: int | None = 64) -> dict:
    """A COCO-style detection file: the `qkv.data.scenes.scenes` structure with ``boxes`` and ``labels``
    (``masks`` and ``captions`` None), plus ``files`` (image paths) and ``category_ids`` (class id k is COCO
    category ``category_ids[k - 1]``). Boxes are pixel (x0, y0, x1, y1) in the resized image."""
    path = Path(path)
    doc = _load_json(path)
    if not isinstance(doc, dict):
        raise DataError(f"{path}: expected a JSON object with images, annotations and categories")
    images = _entries(doc, "images", path, ("id", "file_name"))
    anns = _entries(doc, "annotations", path, ("image_id", "bbox", "category_id"))
    cats = _entries(doc, "categories", path, ("id", "name"))
    if not images:
        raise DataError(f"{path}: 'images' is empty")
    by_image, by_cat = _unique_ids(images, "images", path), _unique_ids(cats, "categories", path)
    cat_ids = sorted(by_cat)
    class_of = {c: k + 1 for k, c in enumerate(cat_ids)}
    arrays, sizes, files = [], [], []
    for i, im in enumerate(images):
        full = _inside(path.parent, im["file_name"], f"{path}: images[{i}]")
        arr, size = _rgb(full, f"{path}: images[{i}]", image_size)
        arrays.append(arr)
        sizes.append(size)
        files.append(str(full))
    boxes: list[list] = [[] for _ in images]
    labels: list[list] = [[] for _ in images]
    for i, ann in enumerate(anns):
        where = f"{path}: annotations[{i}]" + (f" (id {ann['id']})" if "id" in ann else "")
        if ann.get("iscrowd", 0):
            continue
        if ann["image_id"] not in by_image:
            raise DataError(f"{where}: image_id {ann['image_id']!r} is not the id of any entry in 'images'")
        if ann["category_id"] not in class_of:
            raise DataError(f"{where}: category_id {ann['category_id']!r} is not in categories {cat_ids}")
        j = by_image[ann["image_id"]]
        w, h = sizes[j]
        x0, y0, x1, y1 = _bbox(ann, where, w, h)
        sx, sy = (1.0, 1.0) if image_size is None else (image_size / w, image_size / h)
        boxes[j].append([x0 * sx, y0 * sy, x1 * sx, y1 * sy])
        labels[j].append(class_of[ann["category_id"]])
    names = ["background"] + [str(cats[by_cat[c]]["name"]) for c in cat_ids]
    return _result(_stack(arrays, files, "an image"), files, names,
                   boxes=[np.array(b, dtype=np.float32).reshape(-1, 4) for b in boxes],
                   labels=[np.array(c, dtype=np.int64) for c in labels], category_ids=cat_ids)


def mask_folder(root: str | Path, image_size: int | None = 64) -> dict:
    """``images/NAME.png|jpg`` with ``masks/NAME.png`` of class ids: the `qkv.data.scenes.scenes` structure
    with ``masks`` uint8 (N, S, S) (255: unlabelled), ``boxes``, ``labels`` and ``captions`` None. Classes:
    ``classes.txt`` (line i names class i, line 1 the background) or "background", "1", ... up to the
    largest id seen."""
    from PIL import Image

    root = Path(root)
    img_dir, mask_dir = root / "images", root / "masks"
    if not img_dir.is_dir() or not mask_dir.is_dir():
        raise DataError(f"{root}: expected the folders images/ and masks/ (masks/NAME.png for images/NAME.png)")
    stems: dict[str, Path] = {}
    for f in sorted(img_dir.iterdir()):
        if f.suffix.lower() in IMAGE_SUFFIXES:
            if f.stem in stems:
                raise DataError(f"{f}: a second image named {f.stem!r} (also {stems[f.stem].name}); keep one")
            stems[f.stem] = f
    if not stems:
        raise DataError(f"{img_dir}: no {'/'.join(IMAGE_SUFFIXES)} images")
    for m in sorted(mask_dir.iterdir()):
        if m.suffix.lower() == ".png" and m.stem not in stems:
            raise DataError(f"{m}: a mask with no image {m.stem}.png|jpg in {img_dir}")
    names = None
    if (root / "classes.txt").is_file():
        names = [line.strip() for line in (root / "classes.txt").read_text(encoding="utf-8").splitlines()]
        for i, n in enumerate(names):
            if not n:
                raise DataError(f"{root / 'classes.txt'}:{i + 1}: empty class name")
    arrays, masks, files, top = [], [], [], 0
    for stem, f in stems.items():
        m = mask_dir / f"{stem}.png"
        if not m.is_file():
            raise DataError(f"{f}: no mask {m}")
        arr, size = _rgb(f, str(f), image_size)
        mask = _open(m, str(m))
        if mask.mode not in ("L", "P", "I", "I;16"):
            raise DataError(f"{m}: mask mode {mask.mode}; save one class id per pixel (8-bit grayscale or palette)")
        if mask.size != size:
            raise DataError(f"{m}: mask is {mask.size[0]}x{mask.size[1]} but its image {f.name} is "
                            f"{size[0]}x{size[1]}")
        ids = np.asarray(mask, dtype=np.int64)
        bad = ids[(ids != UNLABELLED) & ((ids < 0) | (ids >= (len(names) if names else UNLABELLED)))]
        if bad.size:
            known = f"classes.txt names {len(names)} classes" if names else "ids are 0..254, 255 unlabelled"
            raise DataError(f"{m}: class id {int(bad[0])} in the mask; {known}")
        if image_size is not None:
            ids = np.asarray(Image.fromarray(ids.astype(np.uint8)).resize((image_size, image_size), Image.NEAREST))
        top = max(top, int(ids[ids != UNLABELLED].max(initial=0)))
        arrays.append(arr)
        masks.append(ids.astype(np.uint8))
        files.append(str(f))
    names = names or ["background"] + [str(i) for i in range(1, top + 1)]
    return _result(_stack(arrays, files, "an image"), files, names, masks=_stack(masks, files, "a mask"))


def caption_jsonl(path: str | Path, image_size: int | None = 64) -> dict:
    """A JSONL file of ``{"image": ..., "caption": ...}``: the `qkv.data.scenes.scenes` structure with
    ``captions`` (one row per line; an image may appear on several lines), other targets None."""
    path = Path(path)
    if not path.is_file():
        raise DataError(f"{path}: no such caption file")
    arrays, captions, files = [], [], []
    with path.open(encoding="utf-8") as fh:
        for line_no, line in enumerate(fh, 1):
            if not line.strip():
                continue
            where = f"{path}:{line_no}"
            try:
                row = json.loads(line)
            except json.JSONDecodeError as e:
                raise DataError(f"{where}: not valid JSON ({e.msg}, column {e.colno})") from None
            if not isinstance(row, dict):
                raise DataError(f"{where}: expected an object {{\"image\": ..., \"caption\": ...}}")
            for key in ("image", "caption"):
                if key not in row:
                    raise DataError(f"{where}: no {key!r} field")
            if not isinstance(row["caption"], str) or not row["caption"].strip():
                raise DataError(f"{where}: caption must be a non-empty string; got {row['caption']!r}")
            full = _inside(path.parent, row["image"], where)
            arrays.append(_rgb(full, where, image_size)[0])
            captions.append(row["caption"])
            files.append(str(full))
    if not captions:
        raise DataError(f"{path}: no captions")
    return _result(_stack(arrays, files, "an image"), files, None, captions=captions)


def _pick(d: dict, idx) -> dict:
    """Rows ``idx`` of a structure (arrays indexed, lists picked, None kept)."""
    out = {}
    for k, v in d.items():
        if k in ("classes", "category_ids") or v is None:
            out[k] = v
        elif isinstance(v, np.ndarray):
            out[k] = v[idx]
        else:
            out[k] = [v[i] for i in idx]
    return out


def files_data(cfg, task: str, seed: int = 0, image_size: int = 64) -> Data:
    """The user's files at ``cfg.path`` as `Data` for ``task``: detect (a COCO JSON file), segment (an
    images/ + masks/ folder) or caption (a JSONL file); cut into train / val / test by ``cfg``'s fractions."""
    import torch

    from .scenes import pad_labels, vision_info, vision_table
    from .text import train_tokenizer

    readers = {"detect": coco_detection, "segment": mask_folder, "caption": caption_jsonl}
    if task not in readers:
        raise DataError(f"task {task!r}: vision files serve one of {list(readers)}")
    d = readers[task](cfg.path, image_size)
    n = len(d["files"])
    parts = split_rows({"i": torch.arange(n)}, cfg.val_fraction, cfg.test_fraction, seed)
    tok = None
    if task == "caption":  # the vocabulary of the training captions only
        tok = train_tokenizer(cfg.tokenizer, [d["captions"][i] for i in parts["train"]["i"].tolist()], cfg.vocab_size)
    classes = d["classes"] or []
    most = max((len(b) for b in d["boxes"]), default=0) if task == "detect" else None  # one width for all splits
    splits = {s: vision_table(_pick(d, p["i"].tolist()), task, tok, most, cfg.max_length) for s, p in parts.items()}
    if task == "caption":
        pad_labels(splits)
    return Data("table", splits, tok, classes or None, info=vision_info(splits["train"], task, classes, tok))
