"""Reference assigners for the tests: per-image, per-GT loops written the way the official code
(sfzhang15/ATSS ``atss_core/modeling/rpn/atss/loss.py``) writes them, with this project's
conventions (no "+1", ties broken by the lower index). The vectorised assigners in
:mod:`detector.assigners` must give exactly the same result. ``bench/assigner.py`` times
:func:`reference_atss_assign` as its peer (the only code outside ``tests/`` that imports this file).
"""
from __future__ import annotations

import torch

from detector.assigners import box_centers, centers_inside, pairwise_iou


def plus_one_iou(boxes: torch.Tensor, box: torch.Tensor) -> torch.Tensor:
    """The official ``boxlist_iou`` ("+1" widths) of boxes float[K, 4] with one box float[4]."""
    area1 = (boxes[:, 2] - boxes[:, 0] + 1) * (boxes[:, 3] - boxes[:, 1] + 1)
    area2 = (box[2] - box[0] + 1) * (box[3] - box[1] + 1)
    wh = (torch.minimum(boxes[:, 2:], box[2:]) - torch.maximum(boxes[:, :2], box[:2]) + 1).clamp(min=0)
    inter = wh[:, 0] * wh[:, 1]
    return inter / (area1 + area2 - inter)


def reference_atss_assign(anchors: torch.Tensor, num_anchors_per_level: list[int], gt_boxes: torch.Tensor,
                          topk: int = 9, anchors_per_location: int = 1, plus_one: bool = False) -> torch.Tensor:
    """ATSS, one image: anchors float[N, 4], gt_boxes float[G, 4] xyxy -> int64[N], GT index or -1.

    Same conventions as :func:`detector.assigners.atss_assign`: squared centre distances in float32,
    a stable sort per level (equal distances -> lower anchor index), threshold mean + unbiased std
    of the candidates' IoUs, centre strictly inside the GT by 0.01 px, largest IoU wins (lower GT
    index on ties). ``plus_one``: IoUs as the official code computes them (boxes in its "+1"
    coordinates)."""
    n, g = anchors.shape[0], gt_boxes.shape[0]
    if g == 0:
        return torch.full((n,), -1, dtype=torch.long)
    ac = box_centers(anchors).float()
    claimed = torch.full((n, g), float("-inf"), dtype=anchors.dtype, device=anchors.device)
    for j in range(g):
        box = gt_boxes[j]
        gc = box_centers(box).float()
        candidates = []
        start = 0
        for n_l in num_anchors_per_level:
            d2 = (ac[start:start + n_l, 0] - gc[0]).square() + (ac[start:start + n_l, 1] - gc[1]).square()
            order = torch.sort(d2, stable=True).indices
            candidates.append(order[: min(topk * anchors_per_location, n_l)] + start)
            start += n_l
        cand = torch.cat(candidates)
        ious = plus_one_iou(anchors[cand], box) if plus_one else pairwise_iou(anchors[cand], box)
        thresh = ious.mean() + (ious.std() if cand.numel() > 1 else 0.0)
        keep = (ious >= thresh) & centers_inside(box_centers(anchors[cand]), box)
        claimed[cand[keep], j] = ious[keep]
    best, idx = claimed.max(dim=1)
    return torch.where(torch.isfinite(best), idx, torch.full_like(idx, -1))


def reference_topk_assign(anchors: torch.Tensor, gt_boxes: torch.Tensor, topk: int = 9) -> torch.Tensor:
    """The official ``TOPK`` positive definition, one image -> int64[N], GT index or -1.

    Per GT: the ``topk`` anchors (all levels) with the largest ``IoU - d / d_max / 1000`` (``d``
    centre distance, ``d_max`` the largest one over all anchors and GTs of the image; equal scores
    -> lower anchor index), kept if their centre is inside the GT by 0.01 px; an anchor claimed by
    several GTs goes to the largest IoU (lower GT index on ties)."""
    n, g = anchors.shape[0], gt_boxes.shape[0]
    if g == 0:
        return torch.full((n,), -1, dtype=torch.long)
    ious = pairwise_iou(anchors[:, None, :], gt_boxes[None, :, :])  # [N, G]
    distances = (box_centers(anchors)[:, None, :] - box_centers(gt_boxes)[None, :, :]).pow(2).sum(-1).sqrt()
    distances = distances / distances.max() / 1000
    is_pos = torch.zeros(n, g, dtype=torch.bool)
    for j in range(g):
        order = torch.sort(ious[:, j] - distances[:, j], descending=True, stable=True).indices[:topk]
        inside = centers_inside(box_centers(anchors[order]), gt_boxes[j])
        is_pos[order[inside], j] = True
    claimed = ious.masked_fill(~is_pos, float("-inf"))
    best, idx = claimed.max(dim=1)
    return torch.where(torch.isfinite(best), idx, torch.full_like(idx, -1))
