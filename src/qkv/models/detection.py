"""Object detection with a plain ViT: YOLOS (Fang et al., arXiv:2106.00666).

A ViT encoder reads the patches plus ``num_detection_tokens`` learned [DET] tokens appended after them;
each [DET] token's final state predicts one object (a class, or "no object", and a box) through two
3-layer MLP heads, as DETR's queries do (Carion et al., arXiv:2005.12872), and trains with DETR's set
loss (`set_loss`). YOLOS adds the learned position table again after every layer but the last ("mid"
position embeddings); both tables are resized (bicubic) for images of other sizes.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn

from ..nn import BlockConfig, Linear, TransformerEncoder
from . import _checks
from ._base import Model, ModelOutput
from .set_loss import box_corners, check_labels, patch_targets, set_loss
from .vision import ViTConfig, _load_image, patch_embedding

IMAGENET_MEAN = [0.485, 0.456, 0.406]
IMAGENET_STD = [0.229, 0.224, 0.225]


@dataclass
class YolosConfig:
    """Defaults are YOLOS-Base (hustvl/yolos-base) with transformers' defaults. ``image_size`` [height,
    width] is the size the position tables were trained at (other sizes interpolate them)."""

    image_size: int | list[int] = field(default_factory=lambda: [512, 864])
    patch_size: int = 16
    # how pixels become patch vectors (ViTConfig.stem): "patch" is YOLOS' own (and what checkpoints hold);
    # "strided" (stride-2 3 x 3 convolutions with BatchNorm) learns small scenes' shapes far sooner
    stem: str = "patch"
    channels: int = 3
    dim: int = 768
    n_layers: int = 12
    n_heads: int = 12
    ffn_dim: int = 3072
    activation: str = "gelu"
    norm_eps: float = 1e-12
    qkv_bias: bool = True
    dropout: float = 0.0
    attn_dropout: float = 0.0
    num_detection_tokens: int = 100  # one prediction (object or "no object") per [DET] token
    mid_positions: bool = True  # add (another) learned position table after each layer but the last
    num_labels: int = 91  # object classes; the heads predict num_labels + 1 ("no object" last)
    labels: list[str] | None = None
    # the DETR set loss (see set_loss.SetLossConfig)
    auxiliary_loss: bool = False  # also match and score the [DET] tokens after every layer but the last
    class_cost: float = 1.0
    bbox_cost: float = 5.0
    giou_cost: float = 2.0
    bbox_loss_coefficient: float = 5.0
    giou_loss_coefficient: float = 2.0
    eos_coefficient: float = 0.1
    # a dense auxiliary loss for training from scratch: every patch token also names the class of the
    # smallest box holding its centre ("no object" outside every box; set_loss.patch_targets) through a
    # linear head of its own, cross-entropy weighted by this (0: off, and no head). Patch features then
    # tell classes apart early and the [DET] tokens read them: on the generated scenes, val mAP@0.5 0.51
    # instead of 0.17 after 3,000 steps. In the spirit of Co-DETR's auxiliary dense heads (arXiv:2211.12860).
    patch_loss_coefficient: float = 0.0
    # preprocessing for detect() (as YolosImageProcessor does it)
    image_mean: list[float] = field(default_factory=lambda: list(IMAGENET_MEAN))
    image_std: list[float] = field(default_factory=lambda: list(IMAGENET_STD))
    resample: str = "bilinear"
    shortest_edge: int = 800  # resize so the short side is this ...
    longest_edge: int | None = 1333  # ... unless the long side would exceed this; both then cut to patch multiples

    def __post_init__(self):
        _checks.check_types(self)
        _checks.sizes(self, "image_size", "patch_size", "num_detection_tokens", "shortest_edge", "longest_edge")
        _checks.sizes(self, "num_labels", lo=0)
        _checks.positive(self, "bbox_loss_coefficient", "giou_loss_coefficient", "eos_coefficient")
        for name in ("class_cost", "bbox_cost", "giou_cost", "patch_loss_coefficient"):
            if getattr(self, name) < 0:
                raise ValueError(f"YolosConfig: {name}={getattr(self, name)} must be >= 0")
        if len(self.size) != 2:
            raise ValueError(f"YolosConfig: image_size={self.image_size} must be one size or [height, width]")
        if min(self.size) < self.patch_size:
            raise ValueError(f"YolosConfig: image_size={self.image_size} is smaller than patch_size={self.patch_size}")
        _checks.labels(self)
        try:
            self.backbone()  # sizes, heads, activation, normalisation, memory (of the ViT part)
        except (ValueError, TypeError) as e:
            raise type(e)(str(e).replace("ViTConfig", "YolosConfig")) from None
        _checks.budget(self, self.parameter_estimate(), ("image_size", "patch_size", "dim", "n_layers", "ffn_dim",
                                                         "num_detection_tokens"))

    @property
    def size(self) -> tuple[int, ...]:
        s = self.image_size
        return (s, s) if isinstance(s, int) else tuple(s)

    @property
    def grid_shape(self) -> tuple[int, int]:
        """Patches (rows, columns) at ``image_size``; a remainder smaller than a patch is dropped."""
        return self.size[0] // self.patch_size, self.size[1] // self.patch_size

    @property
    def seq_len(self) -> int:
        """Tokens at ``image_size``: class token, patches, detection tokens."""
        return 1 + math.prod(self.grid_shape) + self.num_detection_tokens

    def backbone(self) -> ViTConfig:
        """The ViT this detector extends (validated as one)."""
        p = self.patch_size
        return ViTConfig(image_size=[g * p for g in self.grid_shape], patch_size=p, stem=self.stem,
                         channels=self.channels, dim=self.dim, n_layers=self.n_layers, n_heads=self.n_heads,
                         ffn_dim=self.ffn_dim, activation=self.activation, norm_eps=self.norm_eps,
                         qkv_bias=self.qkv_bias, dropout=self.dropout, attn_dropout=self.attn_dropout,
                         image_mean=self.image_mean, image_std=self.image_std, resample=self.resample)

    def block(self) -> BlockConfig:
        return self.backbone().block()

    def parameter_estimate(self) -> int:
        d = self.dim
        mid = (self.n_layers - 1) * self.seq_len * d if self.mid_positions else 0
        heads = 2 * (2 * d * d + 2 * d) + d * (self.num_labels + 1) + 4 * d
        det = 2 * self.num_detection_tokens * d  # the [DET] tokens and their rows of the position table
        det += (d + 1) * (self.num_labels + 1) if self.patch_loss_coefficient else 0
        return self.backbone().parameter_estimate() + det + mid + heads


class MLP(nn.Module):
    """Linear layers with ReLU between them (DETR's prediction heads)."""

    def __init__(self, dim: int, hidden: int, out: int, n_layers: int = 3):
        super().__init__()
        widths = [dim] + [hidden] * (n_layers - 1) + [out]
        self.layers = nn.ModuleList(Linear(a, b) for a, b in zip(widths[:-1], widths[1:]))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for i, layer in enumerate(self.layers):
            x = layer(x)
            x = F.relu(x) if i < len(self.layers) - 1 else x
        return x


@dataclass
class DetectionOutput(ModelOutput):
    """`ModelOutput` plus what a detector returns: logits (B, Q, num_labels + 1), pred_boxes (B, Q, 4)
    normalised (cx, cy, w, h); with labels: loss, its parts, and the auxiliary (logits, boxes) per layer."""

    pred_boxes: torch.Tensor | None = None
    loss: torch.Tensor | None = None
    loss_dict: dict | None = None
    auxiliary_outputs: list[tuple[torch.Tensor, torch.Tensor]] | None = None


def resize_positions(table: torch.Tensor, stored: tuple[int, int], grid: tuple[int, int],
                     n_det: int) -> torch.Tensor:
    """A position table (N, 1 + patches + n_det, C) laid out [class, patch grid ``stored``, detection
    tokens] -> the same for patch grid ``grid``: the patch part is resized bicubically (align_corners
    False, as YOLOS does), the class and detection rows are kept."""
    if tuple(grid) == tuple(stored):
        return table
    N, _, C = table.shape
    cls, patches, det = table[:, :1], table[:, 1:-n_det], table[:, -n_det:]
    patches = patches.transpose(1, 2).reshape(N, C, *stored)  # (N, C, rows, cols)
    patches = F.interpolate(patches, size=tuple(grid), mode="bicubic", align_corners=False)
    return torch.cat([cls, patches.flatten(2).transpose(1, 2), det], dim=1)  # (N, 1 + patches' + n_det, C)


class ObjectDetector(Model):
    """YOLOS: patch embedding, class token, patches, [DET] tokens, learned positions (and mid-layer
    positions), a pre-norm ViT encoder with a final norm, class and box MLP heads on the [DET] tokens."""

    def __init__(self, config: YolosConfig):
        super().__init__()
        self.config = c = config
        self.stem, self.patch = patch_embedding(c.backbone())
        self.cls = nn.Parameter(torch.zeros(1, 1, c.dim))
        self.det = nn.Parameter(torch.empty(1, c.num_detection_tokens, c.dim).normal_(std=0.02))
        self.pos = nn.Parameter(torch.empty(1, c.seq_len, c.dim).normal_(std=0.02))
        mid = c.mid_positions and c.n_layers > 1
        self.mid_pos = nn.Parameter(torch.empty(c.n_layers - 1, c.seq_len, c.dim).normal_(std=0.02)) if mid else None
        self.drop = nn.Dropout(c.dropout)
        self.encoder = TransformerEncoder(c.block(), c.n_layers, final_norm=True)
        self.class_head = MLP(c.dim, c.dim, c.num_labels + 1)
        self.box_head = MLP(c.dim, c.dim, 4)
        self.patch_head = Linear(c.dim, c.num_labels + 1) if c.patch_loss_coefficient else None

    def heads(self, h: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Hidden states (B, T, C) -> (logits (B, Q, K + 1), boxes (B, Q, 4) in [0, 1]) of the last Q tokens."""
        det = h[:, -self.config.num_detection_tokens:]
        return self.class_head(det), self.box_head(det).sigmoid()

    def forward(self, pixel_values: torch.Tensor, labels: list[dict] | None = None, return_weights: bool = False,
                return_hidden: bool = False) -> DetectionOutput:
        """pixel_values (B, channels, H, W), normalised -> DetectionOutput(logits (B, Q, num_labels + 1),
        pred_boxes (B, Q, 4) normalised cxcywh, last_hidden_state (B, 1 + patches + Q, C); attentions with
        ``return_weights``; loss with ``labels`` (one dict per image: ``class_labels`` (N,), ``boxes`` (N, 4)
        normalised cxcywh))."""
        c = self.config
        if pixel_values.dim() != 4 or pixel_values.shape[1] != c.channels:
            raise ValueError(f"pixel_values must be (B, {c.channels}, H, W), got {tuple(pixel_values.shape)}")
        if min(pixel_values.shape[2:]) < c.patch_size:
            raise ValueError(f"pixel_values {tuple(pixel_values.shape)}: H and W must be >= patch_size={c.patch_size}")
        B = pixel_values.shape[0]
        x = pixel_values.to(self.patch.weight.dtype)
        x = self.patch(x if self.stem is None else self.stem(x))  # (B, C, rows, cols)
        grid = tuple(x.shape[2:])
        x = x.flatten(2).transpose(1, 2)  # (B, patches, C)
        x = torch.cat([self.cls.expand(B, -1, -1), x, self.det.expand(B, -1, -1)], dim=1)
        x = self.drop(x + resize_positions(self.pos, c.grid_shape, grid, c.num_detection_tokens))
        mid = None
        if self.mid_pos is not None:
            mid = resize_positions(self.mid_pos, c.grid_shape, grid, c.num_detection_tokens)  # (L - 1, T, C)
        hidden = [] if return_hidden else None
        attns = [] if return_weights else None
        layer_out = []  # each layer's output before the mid positions: the auxiliary heads read it
        for i, block in enumerate(self.encoder.layers):
            if hidden is not None:
                hidden.append(x)
            x, w, _ = block(x, layer=i, return_weights=return_weights)
            layer_out.append(x)
            if attns is not None:
                attns.append(w)
            if mid is not None and i < len(mid):
                x = x + mid[i]
        h = self.encoder.norm(x)
        if hidden is not None:
            hidden.append(h)
        logits, boxes = self.heads(h)
        out = DetectionOutput(h, logits=logits, pred_boxes=boxes, attentions=attns, hidden_states=hidden)
        if labels is not None:
            aux = [self.heads(o) for o in layer_out[:-1]] if c.auxiliary_loss else []
            out.loss, out.loss_dict = set_loss(logits, boxes, labels, c, aux)
            out.auxiliary_outputs = aux or None
            if self.patch_head is not None:
                patches = self.patch_head(h[:, 1:-c.num_detection_tokens])  # (B, rows * cols, K + 1)
                target = patch_targets(check_labels(labels, B, c.num_labels), grid, c.num_labels)
                dense = F.cross_entropy(patches.flatten(0, 1).float(), target.flatten().to(patches.device))
                out.loss = out.loss + c.patch_loss_coefficient * dense
                out.loss_dict["loss_patch"] = dense
        return out

    def preprocess(self, image) -> torch.Tensor:
        """One PIL image, (H, W, 3) array or file path -> normalised (1, 3, h, w) at YolosImageProcessor's
        size: short side ``shortest_edge`` (less if the long side would pass ``longest_edge``), both sides
        cut down to multiples of 16."""
        import numpy as np
        from PIL import Image

        c = self.config
        im = _load_image(image)
        h, w = resize_shape(im.height, im.width, c.shortest_edge, c.longest_edge)
        filters = {"bilinear": Image.BILINEAR, "bicubic": Image.BICUBIC, "nearest": Image.NEAREST,
                   "lanczos": Image.LANCZOS}
        im = (im.convert("L") if c.channels == 1 else im).resize((w, h), filters[c.resample])
        x = torch.from_numpy(np.asarray(im, dtype=np.float32).reshape(h, w, c.channels) / 255.0).permute(2, 0, 1)
        mean = torch.tensor(c.image_mean[:c.channels]).view(-1, 1, 1)
        std = torch.tensor(c.image_std[:c.channels]).view(-1, 1, 1)
        return ((x - mean) / std)[None]

    @torch.no_grad()
    def detect(self, images, threshold: float = 0.5, target_sizes=None) -> list:
        """Objects found in each image: a list per image of ``{"label", "label_id", "score", "box"}`` with
        ``box`` [x0, y0, x1, y1] in pixels of the original image, in detection-token order (what
        YolosImageProcessor.post_process_object_detection keeps: the best real class scoring above
        ``threshold``). ``images``: PIL images, arrays or paths (each resized on its own, so results do not
        depend on the batch), or normalised pixel_values (B, C, H, W) with ``target_sizes`` [(height,
        width), ...] (default: the tensor's H, W). One image (not in a list) gives one list."""
        if not 0.0 <= threshold <= 1.0:
            raise ValueError(f"threshold={threshold} must be a probability in [0, 1]")
        if isinstance(images, torch.Tensor):
            if images.dim() != 4:
                raise ValueError(f"images as a tensor must be pixel_values (B, C, H, W), got {tuple(images.shape)}")
            sizes = target_sizes if target_sizes is not None else [tuple(images.shape[2:])] * len(images)
            out = self(images.to(self.device))
            return post_process(out.logits, out.pred_boxes, threshold, sizes, self.config.labels)
        single = not isinstance(images, (list, tuple))
        results = []
        for image in [images] if single else images:
            im = _load_image(image)
            out = self(self.preprocess(im).to(self.device))
            results += post_process(out.logits, out.pred_boxes, threshold, [(im.height, im.width)], self.config.labels)
        return results[0] if single else results


def resize_shape(height: int, width: int, shortest: int, longest: int | None, multiple: int = 16) -> tuple[int, int]:
    """(h, w) YolosImageProcessor resizes an image to: the short side becomes ``shortest`` (scaled down
    so the long side stays within ``longest``), the other side keeps the aspect ratio (rounded down),
    then both are cut down to a multiple of ``multiple``."""
    short, long = min(height, width), max(height, width)
    exact, size = None, shortest
    if longest is not None and long / short * shortest > longest:
        exact = longest * short / long
        size = int(round(exact))
    scaled = exact if exact is not None else size  # the other side scales by the unrounded short side
    if width < height:
        h, w = int(scaled * height / width), size
    elif short == size:
        h, w = height, width
    else:
        h, w = size, int(scaled * width / height)
    return h - h % multiple, w - w % multiple


def post_process(logits: torch.Tensor, pred_boxes: torch.Tensor, threshold: float, target_sizes,
                 names: list[str] | None = None) -> list[list[dict]]:
    """Per image, the detections whose best real class (softmax over all classes, "no object" last and
    excluded) scores above ``threshold``: ``{"label", "label_id", "score", "box"}``, boxes scaled to
    ``target_sizes`` [(height, width), ...] as [x0, y0, x1, y1]."""
    if len(target_sizes) != len(logits):
        raise ValueError(f"target_sizes has {len(target_sizes)} entries for {len(logits)} images; give one "
                         "(height, width) per image")
    scores, ids = logits.float().softmax(-1)[..., :-1].max(-1)  # (B, Q)
    sizes = torch.as_tensor([[float(s) for s in hw] for hw in target_sizes], device=logits.device)  # (B, 2)
    scale = torch.stack([sizes[:, 1], sizes[:, 0], sizes[:, 1], sizes[:, 0]], dim=1)  # (B, 4): w, h, w, h
    boxes = box_corners(pred_boxes.float()) * scale[:, None]
    out = []
    for s, i, b in zip(scores, ids, boxes):
        keep = s > threshold
        out.append([{"label": names[int(k)] if names else str(int(k)), "label_id": int(k), "score": float(v),
                     "box": [float(z) for z in bb]} for v, k, bb in zip(s[keep], i[keep], b[keep])])
    return out
