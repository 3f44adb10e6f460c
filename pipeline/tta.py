"""Test-time augmentation of the paper's 50.7 AP test-dev entry (spec ``ATSS.md`` section 4).

Every image runs through a set of *passes* (a test size, optionally mirrored):

- the identity pass at the test size (800 / 1333) and its horizontal flip, unfiltered;
- each of the 12 extra scales 400 ... 1800 and its flip; the longer side is capped at 3000 for
  scales >= the test size and at 1333 below it. A per-scale area filter keeps a box only when
  ``sqrt(area)``, measured in that scale's pixels, lies strictly inside the scale's range, so small
  scales contribute large objects and large scales small ones.

Each pass is a normal inference (NMS, top 100). The union of all passes is merged per class by
*soft voting*: in score order, each remaining box heads a cluster of the remaining boxes of its
class with IoU >= 0.66; the cluster becomes one box, the score-weighted mean of its members,
with the cluster's highest score; the other members also stay, unchanged, with their score
damped to ``score * (1 - IoU with the head)`` when that is still >= 0.05. At most 1000
detections per image remain.

Boxes are ``xyxy`` in absolute, continuous pixels (no +1), as everywhere in the project.
"""
from __future__ import annotations

import dataclasses
import math
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from torchvision.ops import box_area, box_iou

from pipeline.data.transforms import get_resize_size, hflip_boxes, normalize

INF = math.inf

__all__ = ["TTAConfig", "TTAPass", "area_filter", "soft_vote", "cap_detections", "merge_passes",
           "tta_detect", "predict_tta", "OriginalImage", "collate_original"]


@dataclass(frozen=True)
class TTAPass:
    """One inference pass: resize rule, mirror flag, and the area range (None = unfiltered)."""

    min_size: int
    max_size: int
    hflip: bool
    area_range: tuple[float, float] | None


@dataclass
class TTAConfig:
    """Multi-scale + flip testing with the official ``TEST.BBOX_AUG`` settings as defaults.

    ``scale_ranges[i]`` is the open interval ``(lo, hi)`` of ``sqrt(area)`` (pixels of scale
    ``scales[i]``) that boxes of that scale must fall into; ``math.inf`` = no upper bound.
    """

    test_min_size: int = 800
    test_max_size: int = 1333
    hflip: bool = True  # mirror pass at the test size
    scales: tuple[int, ...] = (400, 500, 600, 640, 700, 900, 1000, 1100, 1200, 1300, 1400, 1800)
    scale_ranges: tuple[tuple[float, float], ...] = (
        (96, INF), (96, INF), (64, INF), (64, INF), (64, INF), (0, INF), (0, INF),
        (0, 256), (0, 256), (0, 192), (0, 192), (0, 96))
    scale_hflip: bool = True  # mirror pass at every extra scale
    max_size: int = 3000  # longer-side cap for scales >= test_min_size (test_max_size below)
    vote_iou: float = 0.66
    vote_score_threshold: float = 0.05  # damped members below this are dropped
    max_per_image: int = 1000

    def __post_init__(self) -> None:
        self.scales = tuple(int(s) for s in self.scales)
        self.scale_ranges = tuple((float(lo), float(hi)) for lo, hi in self.scale_ranges)
        if len(self.scales) != len(self.scale_ranges):
            raise ValueError(f"TTAConfig: {len(self.scales)} scales but {len(self.scale_ranges)} "
                             "scale_ranges (one (lo, hi) per scale)")
        for name in ("test_min_size", "test_max_size", "max_size", "max_per_image"):
            v = getattr(self, name)
            if not isinstance(v, int) or isinstance(v, bool) or v <= 0:
                raise ValueError(f"TTAConfig.{name} must be a positive int, got {v!r}")
        for s, (lo, hi) in zip(self.scales, self.scale_ranges):
            if s <= 0:
                raise ValueError(f"TTAConfig.scales must be positive, got {s}")
            if not 0 <= lo < hi:
                raise ValueError(f"TTAConfig.scale_ranges: range ({lo}, {hi}) of scale {s} must "
                                 "satisfy 0 <= lo < hi")
        if not 0.0 < self.vote_iou <= 1.0:
            raise ValueError(f"TTAConfig.vote_iou must lie in (0, 1], got {self.vote_iou}")
        if not 0.0 <= self.vote_score_threshold <= 1.0:
            raise ValueError(f"TTAConfig.vote_score_threshold must lie in [0, 1], "
                             f"got {self.vote_score_threshold}")

    def passes(self) -> list[TTAPass]:
        """All passes in the official order: test size (+ flip), then each scale (+ flip)."""
        out = [TTAPass(self.test_min_size, self.test_max_size, False, None)]
        if self.hflip:
            out.append(TTAPass(self.test_min_size, self.test_max_size, True, None))
        for s, rng in zip(self.scales, self.scale_ranges):
            cap = self.max_size if s >= self.test_min_size else self.test_max_size
            out.append(TTAPass(s, cap, False, rng))
            if self.scale_hflip:
                out.append(TTAPass(s, cap, True, rng))
        return out

    def to_dict(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        d["scales"] = list(self.scales)
        # JSON has no infinity: an open upper end is written as None
        d["scale_ranges"] = [[lo, None if hi == INF else hi] for lo, hi in self.scale_ranges]
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "TTAConfig":
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(d) - known)
        if unknown:
            raise ValueError(f"TTAConfig: unknown key(s) {unknown}; known keys: {sorted(known)}")
        d = dict(d)
        if "scale_ranges" in d:
            d["scale_ranges"] = tuple((lo, INF if hi is None else hi) for lo, hi in d["scale_ranges"])
        return cls(**d)

    def replace(self, **changes) -> "TTAConfig":
        return dataclasses.replace(self, **changes)

    def scaled_to(self, test_min_size: int, test_max_size: int) -> "TTAConfig":
        """The same augmentation for a model tested at another size: every scale, the large-scale
        cap and the area ranges (pixels of each scale) change by ``test_min_size / 800``, so each
        pass sees objects at the same relative size. At 800 / 1333 this is the paper's setting."""
        f = test_min_size / self.test_min_size
        return self.replace(
            test_min_size=int(test_min_size), test_max_size=int(test_max_size),
            scales=tuple(max(1, round(s * f)) for s in self.scales),
            scale_ranges=tuple((lo * f, hi * f) for lo, hi in self.scale_ranges),
            max_size=max(int(test_max_size), round(self.max_size * f)))


# ----------------------------------------------------------------------------------------------
# tensor functions
# ----------------------------------------------------------------------------------------------
def area_filter(boxes: torch.Tensor, area_range: tuple[float, float] | None,
                scale_xy: tuple[float, float] = (1.0, 1.0)) -> torch.Tensor:
    """BoolTensor[N]: ``lo < sqrt(area) < hi`` with the area measured after scaling x and y.

    ``boxes`` [N, 4] xyxy; ``scale_xy`` = (pass width / original width, pass height / original
    height) when the boxes are in original pixels but the range refers to the pass's pixels.
    """
    if area_range is None:
        return torch.ones(boxes.shape[0], dtype=torch.bool, device=boxes.device)
    lo, hi = area_range
    area = box_area(boxes) * (scale_xy[0] * scale_xy[1])
    return (area > lo * lo) & (area < hi * hi)


def soft_vote(boxes: torch.Tensor, scores: torch.Tensor, labels: torch.Tensor,
              iou_threshold: float = 0.66, score_threshold: float = 0.05
              ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Soft-vote merge of overlapping detections, class by class (boxes of different labels never
    cluster).

    Args:
        boxes: [N, 4] xyxy; scores: [N]; labels: [N] int64.
    Returns:
        ``(boxes [M, 4], scores [M], labels [M])`` sorted by descending score. Each cluster (head =
        highest remaining score, members = remaining same-class boxes with IoU(head) >=
        ``iou_threshold``) gives its score-weighted mean box with the head's score; a cluster of
        one box keeps it as is; the non-head members of larger clusters are also kept with score
        ``score * (1 - IoU(head, member))`` when that is >= ``score_threshold``.
    """
    n = boxes.shape[0]
    if n == 0:
        return boxes.reshape(0, 4), scores.reshape(0), labels.reshape(0)
    # Group by class, each class in descending score: IoUs are only needed within a class.
    order = torch.sort(scores, descending=True, stable=True).indices
    order = order[torch.sort(labels[order], stable=True).indices]
    boxes, scores, labels = boxes[order], scores[order], labels[order]
    counts = torch.unique_consecutive(labels, return_counts=True)[1].tolist()

    head = np.empty(n, dtype=np.int64)  # index of each box's cluster head
    iou_to_head = torch.empty(n, dtype=boxes.dtype, device=boxes.device)
    start = 0
    for count in counts:
        sl = slice(start, start + count)
        iou = box_iou(boxes[sl], boxes[sl]).nan_to_num_(0.0)
        close = (iou >= iou_threshold).fill_diagonal_(True).cpu().numpy()  # zero-area boxes too
        # Greedy clustering is sequential by nature (like NMS): one iteration per cluster, on
        # numpy rows (~1 us per operation against ~10 us for a torch op).
        h = np.empty(count, dtype=np.int64)
        alive = np.ones(count, dtype=bool)
        for i in range(count):
            if alive[i]:
                members = alive & close[i]
                h[members] = i
                alive &= ~members
        h_t = torch.from_numpy(h).to(boxes.device)
        iou_to_head[sl] = iou[h_t, torch.arange(count, device=boxes.device)]
        head[sl] = h + start
        start += count
    head = torch.from_numpy(head).to(boxes.device)

    heads = torch.unique(head)
    size = torch.bincount(head, minlength=n)
    w = scores[:, None]
    wsum = torch.zeros(n, 4, dtype=boxes.dtype, device=boxes.device).index_add_(0, head, boxes * w)
    ssum = torch.zeros(n, dtype=scores.dtype, device=scores.device).index_add_(0, head, scores)
    merged_boxes = wsum[heads] / ssum[heads].clamp_min(torch.finfo(scores.dtype).tiny)[:, None]
    single = size[heads] == 1
    merged_boxes[single] = boxes[heads[single]]  # exact copy, no rounding through the mean
    merged_scores, merged_labels = scores[heads], labels[heads]

    idx = torch.arange(n, device=boxes.device)
    is_member = (head != idx) & (size[head] > 1)
    damped = scores * (1.0 - iou_to_head)
    soft = is_member & (damped >= score_threshold)

    out_boxes = torch.cat([merged_boxes, boxes[soft]])
    out_scores = torch.cat([merged_scores, damped[soft]])
    out_labels = torch.cat([merged_labels, labels[soft]])
    order = torch.sort(out_scores, descending=True, stable=True).indices
    return out_boxes[order], out_scores[order], out_labels[order]


def cap_detections(scores: torch.Tensor, max_per_image: int) -> torch.Tensor:
    """Indices of the detections kept by the k-th-score cut (official; ties at the cut stay)."""
    n = scores.shape[0]
    if n <= max_per_image:
        return torch.arange(n, device=scores.device)
    kth = torch.topk(scores, max_per_image).values[-1]
    return torch.nonzero(scores >= kth).squeeze(1)


def merge_passes(per_pass: Sequence[dict], cfg: TTAConfig) -> dict:
    """Union of one image's pass outputs (``boxes``/``scores``/``labels``, original pixels, already
    area-filtered) -> soft-voted, capped detections ``{"boxes", "scores", "labels"}``."""
    boxes = torch.cat([p["boxes"].float() for p in per_pass]).reshape(-1, 4)
    scores = torch.cat([p["scores"].float() for p in per_pass]).reshape(-1)
    labels = torch.cat([p["labels"].long() for p in per_pass]).reshape(-1)
    boxes, scores, labels = soft_vote(boxes, scores, labels, cfg.vote_iou, cfg.vote_score_threshold)
    keep = cap_detections(scores, cfg.max_per_image)
    return {"boxes": boxes[keep], "scores": scores[keep], "labels": labels[keep]}


# ----------------------------------------------------------------------------------------------
# running a model
# ----------------------------------------------------------------------------------------------
def _resize_normalized(image: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """uint8 ``[3, h0, w0]`` -> normalised float ``[3, h, w]``, the same path as the data pipeline
    (antialiased bilinear resize of the uint8 image, then normalisation)."""
    from torchvision.transforms.v2 import functional as TF

    if tuple(image.shape[-2:]) != tuple(size):
        image = TF.resize(image, list(size), antialias=True)
    return normalize(image)


@torch.inference_mode()
def tta_detect(model: torch.nn.Module, images: Sequence[torch.Tensor], cfg: TTAConfig,
               passes: Sequence[TTAPass] | None = None, amp: bool = False,
               return_passes: bool = False):
    """TTA detections for a batch of original images.

    Args:
        model: detector in eval mode; ``model(list of [3, h, w], image_sizes, original_sizes)``
            returns per-image ``{"boxes" xyxy in original pixels, "scores", "labels"}``.
        images: uint8 RGB ``[3, h0, w0]`` tensors at original resolution (any device; the model's
            device is used for the passes).
        cfg: the TTA settings; ``passes`` overrides ``cfg.passes()``.
        return_passes: also return, per image, the filtered output of every pass (for tests and
            diagnostics).

    Returns:
        per image ``{"boxes" float32[D, 4] xyxy original pixels, "scores" [D], "labels" [D]}`` on
        the CPU (``D <= cfg.max_per_image`` up to ties), and with ``return_passes`` a second list:
        per image, ``[(TTAPass, (h, w) pass size, {"boxes", "scores", "labels"}) ...]``.
    """
    passes = list(passes) if passes is not None else cfg.passes()
    device = next(model.parameters()).device
    use_amp = amp and device.type == "cuda"
    originals = [img.to(device) for img in images]
    orig_sizes = [tuple(int(v) for v in img.shape[-2:]) for img in originals]
    collected: list[list] = [[] for _ in originals]
    # A pass and its mirror share one resize; run them as one batch.
    groups: dict[tuple[int, int], list[TTAPass]] = {}
    for p in passes:
        groups.setdefault((p.min_size, p.max_size), []).append(p)
    for (min_size, max_size), group in groups.items():
        sizes = [get_resize_size(h0, w0, min_size, max_size)[:2] for h0, w0 in orig_sizes]
        resized = [_resize_normalized(img, s) for img, s in zip(originals, sizes)]
        batch, meta = [], []
        for p in group:
            for i, x in enumerate(resized):
                batch.append(x.flip(-1) if p.hflip else x)
                meta.append((p, i))
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=use_amp):
            dets = model(batch, image_sizes=[sizes[i] for _, i in meta],
                         original_sizes=[orig_sizes[i] for _, i in meta])
        for det, (p, i) in zip(dets, meta):
            h0, w0 = orig_sizes[i]
            h, w = sizes[i]
            boxes = det["boxes"].float().cpu()
            if p.hflip:
                boxes = hflip_boxes(boxes, w0)
            keep = area_filter(boxes, p.area_range, (w / w0, h / h0))
            collected[i].append((p, (h, w), {"boxes": boxes[keep],
                                             "scores": det["scores"].float().cpu()[keep],
                                             "labels": det["labels"].long().cpu()[keep]}))
    merged = [merge_passes([out for _, _, out in per_image], cfg) for per_image in collected]
    return (merged, collected) if return_passes else merged


def predict_tta(model: torch.nn.Module, loader: Iterable, device: torch.device | str,
                cfg: TTAConfig, category_map=None, amp: bool = False) -> list[dict]:
    """:func:`pipeline.evaluation.predict` with TTA: same per-image output format.

    ``loader`` yields ``(images, targets)`` with ``images`` a list of uint8 ``[3, h0, w0]``
    originals (a dataset with :class:`OriginalImage` as transform and :func:`collate_original`).
    """
    from pipeline.evaluation import _label_lookup, _to_category_ids

    device = torch.device(device)
    was_training = model.training
    model.eval()
    lookup = _label_lookup(category_map) if category_map is not None else None
    outputs = []
    try:
        for images, targets in loader:
            for det, t in zip(tta_detect(model, [img.to(device) for img in images], cfg, amp=amp),
                              targets):
                item = {"image_id": int(t["image_id"]), **det}
                if lookup is not None:
                    item["category_ids"] = _to_category_ids(det["labels"], lookup)
                outputs.append(item)
    finally:
        model.train(was_training)
    return outputs


@dataclass
class OriginalImage:
    """Dataset transform that keeps the decoded uint8 image at its original size (TTA resizes
    it once per scale itself)."""

    def __call__(self, image: torch.Tensor, target: dict, rng=None) -> tuple[torch.Tensor, dict]:
        h0, w0 = image.shape[-2:]
        return image, dict(target, image_size=(int(h0), int(w0)), scale=1.0, flipped=False)


def collate_original(batch: Sequence) -> tuple[list[torch.Tensor], list[dict]]:
    """Collate for :class:`OriginalImage` samples: images stay a list (sizes differ)."""
    return [img for img, _ in batch], [t for _, t in batch]
