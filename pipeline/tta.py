"""Test-time augmentation of the paper's 50.7 AP test-dev entry (spec ``ATSS.md`` section 4):
its settings (:class:`TTAConfig`, the passes) and the merges of the passes' detections.
Running a model through the passes is :func:`pipeline.inference.predict_tta`; this module
imports nothing from :mod:`pipeline.inference`.

Every image runs through a set of *passes* (a test size, optionally mirrored):

- the identity pass at the test size (800 / 1333) and its horizontal flip, unfiltered;
- each of the 12 extra scales 400 ... 1800 and its flip; the longer side is capped at 3000 for
  scales >= the test size and at 1333 below it. A per-scale area filter keeps a box only when
  ``sqrt(area)``, measured in that scale's pixels, lies strictly inside the scale's range, so small
  scales contribute large objects and large scales small ones.

Each pass is a normal inference (NMS, top 100). The union of all passes is merged per class by
one of the official ``TEST.BBOX_AUG.MERGE_TYPE`` merges (``TTAConfig.merge``):

- ``"soft-vote"`` (the paper's setting, default): in score order, each remaining box heads a
  cluster of the remaining boxes of its class with IoU >= 0.66; the cluster becomes one box, the
  score-weighted mean of its members, with the cluster's highest score; the other members also
  stay, unchanged, with their score damped to ``score * (1 - IoU with the head)`` when that is
  still >= 0.05;
- ``"vote"``: the same clusters, but only the merged box of each cluster remains;
- ``"nms"``: class-wise NMS at the model's IoU 0.6; boxes stay as detected.

At most 1000 detections per image remain.

Boxes are ``xyxy`` in absolute, continuous pixels (no +1), as everywhere in the project.
"""
from __future__ import annotations

import dataclasses
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any, ClassVar

import numpy as np
import torch
from torchvision.ops import batched_nms, box_area, box_iou

from detector.fields import Rule, check_value

INF = math.inf
MERGES = ("soft-vote", "vote", "nms")

__all__ = ["TTAConfig", "TTAPass", "MERGES", "area_filter", "soft_vote", "vote", "nms_merge",
           "cap_detections", "merge_passes", "OriginalImage", "collate_original"]


@dataclass(frozen=True)
class TTAPass:
    """One inference pass: resize rule, mirror flag, and the area range (None = unfiltered)."""

    min_size: int
    max_size: int
    hflip: bool
    area_range: tuple[float, float] | None


def _is_number(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool)


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
    merge: str = "soft-vote"  # official MERGE_TYPE: "soft-vote" | "vote" | "nms"
    vote_iou: float = 0.66  # VOTE_TH: cluster IoU of "soft-vote" and "vote"
    vote_score_threshold: float = 0.05  # damped "soft-vote" members below this are dropped
    nms_iou: float = 0.6  # IoU of the "nms" merge (the official code reuses MODEL.ATSS.NMS_TH)
    max_per_image: int = 1000

    RULES: ClassVar[Mapping[str, Rule]] = {
        "test_min_size": Rule(ge=1), "test_max_size": Rule(ge=1), "max_size": Rule(ge=1),
        "max_per_image": Rule(ge=1), "scales": Rule(ge=1, nonempty=True), "merge": Rule(choices=MERGES),
        "vote_iou": Rule(gt=0, le=1), "nms_iou": Rule(gt=0, le=1), "vote_score_threshold": Rule(ge=0, le=1),
    }

    def __post_init__(self) -> None:
        # Every field by type and range through the project's one mechanism, except scale_ranges,
        # whose open upper end is infinite (field checks take finite numbers only).
        for f in dataclasses.fields(self):
            if f.name != "scale_ranges":
                setattr(self, f.name, check_value(type(self), f.name, getattr(self, f.name)))
        ranges = self.scale_ranges
        if isinstance(ranges, (str, bytes)) or not isinstance(ranges, Sequence) \
                or not all(isinstance(r, Sequence) and not isinstance(r, str) and len(r) == 2
                           and all(_is_number(v) for v in r) for r in ranges):
            raise ValueError(f"TTAConfig.scale_ranges={ranges!r}: expected a list of [lo, hi] number pairs "
                             "(hi may be null: no upper bound)")
        self.scale_ranges = tuple((float(lo), float(hi)) for lo, hi in ranges)
        if len(self.scales) != len(self.scale_ranges):
            raise ValueError(f"TTAConfig: {len(self.scales)} scales but {len(self.scale_ranges)} "
                             "scale_ranges (one (lo, hi) per scale)")
        for s, (lo, hi) in zip(self.scales, self.scale_ranges):
            if not 0 <= lo < hi:
                raise ValueError(f"TTAConfig.scale_ranges: range ({lo}, {hi}) of scale {s} must "
                                 "satisfy 0 <= lo < hi")

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
        if not isinstance(d, dict):
            raise ValueError(f"TTAConfig: expected a JSON object of settings, got {type(d).__name__}")
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(d) - known)
        if unknown:
            raise ValueError(f"TTAConfig: unknown key(s) {unknown}; known keys: {sorted(known)}")
        d = dict(d)
        ranges = d.get("scale_ranges")
        if isinstance(ranges, list) and all(isinstance(r, list) and len(r) == 2 for r in ranges):
            d["scale_ranges"] = tuple((lo, INF if hi is None else hi) for lo, hi in ranges)
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


def _vote_clusters(boxes: torch.Tensor, scores: torch.Tensor, labels: torch.Tensor,
                   iou_threshold: float):
    """Greedy per-class clustering shared by :func:`soft_vote` and :func:`vote` (official
    ``bbox_vote`` / ``soft_bbox_vote``): in descending score, each remaining box heads a cluster of
    the remaining boxes of its class with IoU(head) >= ``iou_threshold``.

    Returns ``(boxes, scores, labels, head, iou_to_head, merged)`` with the inputs re-ordered by
    class then descending score, ``head[i]`` the index of box ``i``'s cluster head, and
    ``merged`` = ``(boxes [K, 4], scores [K], labels [K], size [K])`` of the K clusters: the
    score-weighted mean box (a one-box cluster keeps its box exactly), the head's score and label,
    and the member count.
    """
    n = boxes.shape[0]
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
    merged = (merged_boxes, scores[heads], labels[heads], size[heads])
    return boxes, scores, labels, head, iou_to_head, merged


def _by_score(boxes: torch.Tensor, scores: torch.Tensor, labels: torch.Tensor):
    order = torch.sort(scores, descending=True, stable=True).indices
    return boxes[order], scores[order], labels[order]


def _empty(boxes: torch.Tensor, scores: torch.Tensor, labels: torch.Tensor):
    return boxes.reshape(0, 4), scores.reshape(0), labels.reshape(0)


def soft_vote(boxes: torch.Tensor, scores: torch.Tensor, labels: torch.Tensor,
              iou_threshold: float = 0.66, score_threshold: float = 0.05
              ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Soft-vote merge of overlapping detections, class by class (boxes of different labels never
    cluster); the official ``MERGE_TYPE "soft-vote"`` (``soft_bbox_vote``).

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
        return _empty(boxes, scores, labels)
    boxes, scores, labels, head, iou_to_head, merged = _vote_clusters(boxes, scores, labels,
                                                                      iou_threshold)
    merged_boxes, merged_scores, merged_labels, _ = merged
    idx = torch.arange(n, device=boxes.device)
    size = torch.bincount(head, minlength=n)
    is_member = (head != idx) & (size[head] > 1)
    damped = scores * (1.0 - iou_to_head)
    soft = is_member & (damped >= score_threshold)
    return _by_score(torch.cat([merged_boxes, boxes[soft]]), torch.cat([merged_scores, damped[soft]]),
                     torch.cat([merged_labels, labels[soft]]))


def vote(boxes: torch.Tensor, scores: torch.Tensor, labels: torch.Tensor,
         iou_threshold: float = 0.66) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Box voting, class by class; the official ``MERGE_TYPE "vote"`` (``bbox_vote``).

    The clusters of :func:`soft_vote`, but only the clusters remain: each becomes its
    score-weighted mean box with the head's (highest) score, and the other members are dropped.
    Shapes as :func:`soft_vote`; sorted by descending score.
    """
    if boxes.shape[0] == 0:
        return _empty(boxes, scores, labels)
    merged_boxes, merged_scores, merged_labels, _ = _vote_clusters(boxes, scores, labels,
                                                                   iou_threshold)[-1]
    return _by_score(merged_boxes, merged_scores, merged_labels)


def nms_merge(boxes: torch.Tensor, scores: torch.Tensor, labels: torch.Tensor,
              iou_threshold: float = 0.6) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Class-wise NMS over the union of the passes; the official ``MERGE_TYPE "nms"``, which reuses
    the model's ``NMS_TH`` (0.6). Boxes are kept unchanged. Shapes as :func:`soft_vote`."""
    if boxes.shape[0] == 0:
        return _empty(boxes, scores, labels)
    keep = batched_nms(boxes, scores, labels, iou_threshold)  # descending score
    return boxes[keep], scores[keep], labels[keep]


def cap_detections(scores: torch.Tensor, max_per_image: int) -> torch.Tensor:
    """Indices of the detections kept by the k-th-score cut (official; ties at the cut stay)."""
    n = scores.shape[0]
    if n <= max_per_image:
        return torch.arange(n, device=scores.device)
    kth = torch.topk(scores, max_per_image).values[-1]
    return torch.nonzero(scores >= kth).squeeze(1)


def merge_passes(per_pass: Sequence[dict], cfg: TTAConfig) -> dict:
    """Union of one image's pass outputs (``boxes``/``scores``/``labels``, original pixels, already
    area-filtered) -> merged (``cfg.merge``), capped detections ``{"boxes", "scores", "labels"}``."""
    boxes = torch.cat([p["boxes"].float() for p in per_pass]).reshape(-1, 4)
    scores = torch.cat([p["scores"].float() for p in per_pass]).reshape(-1)
    labels = torch.cat([p["labels"].long() for p in per_pass]).reshape(-1)
    if cfg.merge == "soft-vote":
        boxes, scores, labels = soft_vote(boxes, scores, labels, cfg.vote_iou, cfg.vote_score_threshold)
    elif cfg.merge == "vote":
        boxes, scores, labels = vote(boxes, scores, labels, cfg.vote_iou)
    else:
        boxes, scores, labels = nms_merge(boxes, scores, labels, cfg.nms_iou)
    keep = cap_detections(scores, cfg.max_per_image)
    return {"boxes": boxes[keep], "scores": scores[keep], "labels": labels[keep]}


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
