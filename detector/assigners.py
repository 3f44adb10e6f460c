"""Label assignment: plain functions over tensors, and assigner objects that bind a configuration's
settings once (:func:`build_assigner`, called when the model is built).

Every assigner returns, for each anchor, the index of its matched ground truth (``>= 0``),
:data:`BACKGROUND` (``-1``) or, for the assigners that have an ignore band, :data:`IGNORE`
(``-2``, left out of the classification loss). Anchors are float[N, 4] xyxy in absolute pixels,
concatenated level by level (P3..P7); inside a level the order is (row, col, anchor-type) with the
``anchors_per_location`` shapes of a location consecutive. Ground truths are float[G, 4] xyxy.

The ``*_batched`` versions assign a whole padded batch at once: ``gt_boxes`` float[B, Gmax, 4]
with ``gt_valid`` bool[B, Gmax] marking the real rows; they return int64[B, N] with GT indices
into the padded ``Gmax`` axis. The single-image functions are the batched ones with B = 1.
"""
from __future__ import annotations

import math
from typing import Sequence

import torch
from torch import Tensor

from .anchors import AnchorSet
from .config import ASSIGNERS, DetectorConfig

BACKGROUND = -1
IGNORE = -2
CENTER_MARGIN = 0.01  # pixels; "centre strictly inside the GT" (spec 1.6, same in mmdetection)
# Elements of one (ground truths x anchors-of-a-level) distance block; bounds the assigner's
# memory whatever the number of ground truths (about 12 bytes per element at the peak).
_BLOCK_ELEMENTS = 1 << 22


# ---------------------------------------------------------------------------- small helpers
def pairwise_iou(a: Tensor, b: Tensor) -> Tensor:
    """IoU of broadcastable box tensors ``a`` float[..., 4] and ``b`` float[..., 4] (xyxy) -> float[...]."""
    lt_x = torch.maximum(a[..., 0], b[..., 0])
    lt_y = torch.maximum(a[..., 1], b[..., 1])
    rb_x = torch.minimum(a[..., 2], b[..., 2])
    rb_y = torch.minimum(a[..., 3], b[..., 3])
    inter = (rb_x - lt_x).clamp(min=0) * (rb_y - lt_y).clamp(min=0)
    area_a = (a[..., 2] - a[..., 0]) * (a[..., 3] - a[..., 1])
    area_b = (b[..., 2] - b[..., 0]) * (b[..., 3] - b[..., 1])
    return inter / (area_a + area_b - inter)


def centers_inside(points: Tensor, boxes: Tensor, margin: float = CENTER_MARGIN) -> Tensor:
    """``min(x - x1, y - y1, x2 - x, y2 - y) > margin`` for broadcastable points float[..., 2]
    and boxes float[..., 4] -> bool[...]."""
    d = torch.minimum(torch.minimum(points[..., 0] - boxes[..., 0], points[..., 1] - boxes[..., 1]),
                      torch.minimum(boxes[..., 2] - points[..., 0], boxes[..., 3] - points[..., 1]))
    return d > margin


def box_centers(boxes: Tensor) -> Tensor:
    """float[..., 4] xyxy -> float[..., 2] centres."""
    return (boxes[..., :2] + boxes[..., 2:]) / 2


def _as_batch(gt_boxes: Tensor) -> tuple[Tensor, Tensor]:
    if gt_boxes.dim() != 2 or gt_boxes.shape[-1] != 4:
        raise ValueError(f"gt_boxes must be float[G, 4] xyxy, got shape {tuple(gt_boxes.shape)}")
    return gt_boxes.unsqueeze(0), torch.ones(1, gt_boxes.shape[0], dtype=torch.bool, device=gt_boxes.device)


def _check_batch(anchors: Tensor, gt_boxes: Tensor, gt_valid: Tensor | None) -> Tensor:
    if anchors.dim() != 2 or anchors.shape[-1] != 4:
        raise ValueError(f"anchors must be float[N, 4] xyxy, got shape {tuple(anchors.shape)}")
    if gt_boxes.dim() != 3 or gt_boxes.shape[-1] != 4:
        raise ValueError(f"gt_boxes must be float[B, G, 4] xyxy, got shape {tuple(gt_boxes.shape)}")
    if gt_valid is None:
        return torch.ones(gt_boxes.shape[:2], dtype=torch.bool, device=gt_boxes.device)
    if gt_valid.shape != gt_boxes.shape[:2]:
        raise ValueError(f"gt_valid shape {tuple(gt_valid.shape)} does not match gt_boxes {tuple(gt_boxes.shape)}")
    return gt_valid.bool()


# ---------------------------------------------------------------------------- ATSS
def atss_candidates(anchor_centers: Tensor, num_anchors_per_level: Sequence[int], gt_centers: Tensor,
                    k_per_level: int, anchors_per_location: int = 1, window: bool = True) -> Tensor:
    """Per level, the ``min(k_per_level, anchors_in_level)`` anchors closest to each GT centre.

    anchor_centers float[N, 2], gt_centers float[M, 2] -> int64[M, K] global anchor indices, levels
    concatenated, each level's block ordered by (distance, index). Distances are squared L2 in
    float32; equal distances go to the lower anchor index, so the selection is deterministic.

    When a level's centres form a regular grid (as the model's anchors do) only a window of
    locations around each GT centre is searched, and a row is accepted only if every anchor
    outside its window is provably farther than its k-th candidate; other rows (and levels that are
    not grids) search the whole level in blocks of GTs, so memory stays bounded whatever M is.
    Both searches give the same result, bit for bit (``window=False`` forces the exhaustive one).
    """
    ac = anchor_centers.float()
    gc = gt_centers.float()
    m = gc.shape[0]
    out = []
    start = 0
    for n_l in num_anchors_per_level:
        n_l = int(n_l)
        if n_l == 0:
            continue
        kk = min(k_per_level, n_l)
        ax = ac[start:start + n_l, 0]
        ay = ac[start:start + n_l, 1]
        level_idx = torch.empty(m, kk, dtype=torch.long, device=ac.device)
        todo = torch.arange(m, device=ac.device)
        grid = _level_grid(ac[start:start + n_l], anchors_per_location) if window else None
        if grid is not None and m > 0:
            found, ok = _window_candidates(ax, ay, gc, kk, anchors_per_location, grid)
            if found is not None:
                level_idx[ok] = found[ok]
                todo = (~ok).nonzero(as_tuple=True)[0]
        block = max(1, _BLOCK_ELEMENTS // n_l)
        for m0 in range(0, todo.numel(), block):
            rows = todo[m0:m0 + block]
            g = gc[rows]
            d2 = (ax[None, :] - g[:, 0:1]).square_()
            d2 += (ay[None, :] - g[:, 1:2]).square_()
            level_idx[rows] = _smallest_stable(d2, kk)
            del d2
        out.append(level_idx + start)
        start += n_l
    if start != ac.shape[0]:
        raise ValueError(f"num_anchors_per_level sums to {start} but there are {ac.shape[0]} anchors")
    if not out:
        return torch.empty(m, 0, dtype=torch.long, device=ac.device)
    return torch.cat(out, dim=1)


def _level_grid(centers: Tensor, a: int) -> tuple[int, int, float, float, float, float, float] | None:
    """Recognise a level laid out as (row, col, anchor-type) on a regular grid.

    centers float[n, 2] -> (H, W, x0, y0, sx, sy, tol): location (row, col) is nominally at
    ``(x0 + col * sx, y0 + row * sy)`` and every anchor centre lies within ``tol`` of it; None if
    the level is not such a grid (then the assigner searches it exhaustively)."""
    n = centers.shape[0]
    if a < 1 or n % a:
        return None
    c = centers.double()
    loc = c.view(-1, a, 2)[:, 0]
    p = loc.shape[0]
    y = loc[:, 1]
    steps = (y[1:] - y[:-1]).abs() > 1e-6 * (1.0 + y[1:].abs())
    w = int(steps.nonzero()[0, 0]) + 1 if bool(steps.any()) else p
    if p % w:
        return None
    h = p // w
    x0, y0 = float(loc[0, 0]), float(loc[0, 1])
    sx = float(loc[w - 1, 0] - loc[0, 0]) / (w - 1) if w > 1 else 1.0
    sy = float(loc[(h - 1) * w, 1] - loc[0, 1]) / (h - 1) if h > 1 else 1.0
    if not (sx > 0 and sy > 0):
        return None
    grid = c.view(h, w, a, 2)
    dx = grid[..., 0] - (x0 + torch.arange(w, device=c.device, dtype=c.dtype) * sx)[None, :, None]
    dy = grid[..., 1] - (y0 + torch.arange(h, device=c.device, dtype=c.dtype) * sy)[:, None, None]
    tol = float(dx.hypot(dy).max())
    if not tol <= 0.01 * min(sx, sy):
        return None
    return h, w, x0, y0, sx, sy, tol


def _window_candidates(ax: Tensor, ay: Tensor, gc: Tensor, kk: int, a: int,
                       grid: tuple[int, int, float, float, float, float, float]) -> tuple[Tensor | None, Tensor]:
    """Candidates of one grid level searched in a window around each GT centre.

    -> (int64[M, kk] level-local indices, bool[M] rows proven exact), or (None, _) if the window
    cannot hold ``kk`` anchors."""
    h, w, x0, y0, sx, sy, tol = grid
    k_loc = -(-kk // a)
    r = int(math.ceil((math.sqrt(k_loc) - 1) / 2)) + 1
    wr, wc = min(h, 2 * r + 1), min(w, 2 * r + 1)
    if wr * wc * a < kk:
        return None, torch.zeros(gc.shape[0], dtype=torch.bool, device=gc.device)
    dev = gc.device
    gx, gy = gc[:, 0].double(), gc[:, 1].double()
    row0 = torch.round((gy - y0) / sy).clamp(0, h - 1).long()
    col0 = torch.round((gx - x0) / sx).clamp(0, w - 1).long()
    r_lo = (row0 - r).clamp(0, h - wr)
    c_lo = (col0 - r).clamp(0, w - wc)
    rows = r_lo[:, None, None, None] + torch.arange(wr, device=dev)[None, :, None, None]
    cols = c_lo[:, None, None, None] + torch.arange(wc, device=dev)[None, None, :, None]
    idx = ((rows * w + cols) * a + torch.arange(a, device=dev)[None, None, None, :]).reshape(gc.shape[0], -1)
    d2 = (ax[idx] - gc[:, 0:1]).square_()
    d2 += (ay[idx] - gc[:, 1:2]).square_()
    pick = _smallest_stable(d2, kk)
    kth = d2.gather(1, pick[:, -1:]).squeeze(1).double().sqrt()
    # Lower bound on the distance from the GT centre to any anchor outside the window: such an
    # anchor lies beyond the window's first/last row or column, and inside the grid's extent
    # along the other axis (nominal positions; the grid tolerance is subtracted below).
    inf = torch.full_like(gx, math.inf)
    zero = torch.zeros_like(gx)
    out_x = torch.maximum(torch.maximum(x0 - gx, gx - (x0 + (w - 1) * sx)), zero)  # gap to the grid's x-span
    out_y = torch.maximum(torch.maximum(y0 - gy, gy - (y0 + (h - 1) * sy)), zero)
    left = torch.where(c_lo > 0, gx - (x0 + (c_lo - 1).double() * sx), inf)
    right = torch.where(c_lo + wc < w, x0 + (c_lo + wc).double() * sx - gx, inf)
    top = torch.where(r_lo > 0, gy - (y0 + (r_lo - 1).double() * sy), inf)
    bottom = torch.where(r_lo + wr < h, y0 + (r_lo + wr).double() * sy - gy, inf)
    bound = torch.minimum(torch.minimum(left, right).hypot(out_y), torch.minimum(top, bottom).hypot(out_x))
    ok = kth < bound - tol - 1e-5 * (1.0 + bound.clamp(max=1e12))
    return idx.gather(1, pick), ok


def _smallest_stable(d: Tensor, k: int) -> Tensor:
    """Column indices of the ``k`` smallest values of each row of ``d`` float[M, n], ordered by
    (value, index) -> int64[M, k].

    ``torch.topk`` breaks ties in an implementation-defined way, so it fetches ``2k`` values and the
    ties are re-ordered by index among those. That is exact whenever the ``2k``-th value is larger
    than the ``k``-th (all ties at the cut were fetched); the rare rows where it is not are redone
    with a unique int64 key (the float bits, which order like non-negative floats, then the index).
    """
    n = d.shape[1]
    kq = min(n, 2 * k)
    vals, idx = d.topk(kq, dim=1, largest=False, sorted=True)
    idx, perm = idx.sort(dim=1)
    vals = vals.gather(1, perm)
    vals, perm = vals.sort(dim=1, stable=True)
    result = idx.gather(1, perm[:, :k])
    if kq < n:
        unsure = (vals[:, kq - 1] <= vals[:, k - 1]).nonzero(as_tuple=True)[0]
        if unsure.numel():
            key = d[unsure].contiguous().view(torch.int32).to(torch.long)
            key <<= 20  # levels are limited to 2**20 anchors, checked by the caller
            key |= torch.arange(n, device=d.device)
            result[unsure] = key.topk(k, dim=1, largest=False, sorted=True).indices
    return result


def atss_assign_batched(anchors: Tensor, num_anchors_per_level: Sequence[int], gt_boxes: Tensor,
                        gt_valid: Tensor | None = None, topk: int = 9, anchors_per_location: int = 1,
                        in_gt_box: bool = True, center_margin: float = CENTER_MARGIN) -> Tensor:
    """ATSS (spec section 1) for a padded batch sharing one anchor set.

    anchors float[N, 4]; gt_boxes float[B, G, 4]; gt_valid bool[B, G] (None: all valid)
    -> int64[B, N]: GT index (into G) or ``-1``.

    Per GT: candidates = per level the ``min(topk * anchors_per_location, n_level)`` anchors with
    the closest centres; threshold = mean + std (unbiased) of the candidates' IoUs; positives =
    candidates with ``IoU >= threshold`` and (``in_gt_box``) centre inside the GT by more than
    ``center_margin`` px (0.01).
    An anchor claimed by several GTs goes to the one with the largest IoU (lower index on ties).
    IoUs are computed for the candidates only (about ``topk * levels`` per GT), so memory is
    O(G * topk) plus one bounded distance block, never O(N * G).
    """
    valid = _check_batch(anchors, gt_boxes, gt_valid)
    b, g = gt_boxes.shape[:2]
    n = anchors.shape[0]
    if max((int(c) for c in num_anchors_per_level), default=0) >= 1 << 20:
        raise ValueError("a level with 2**20 or more anchors exceeds the ATSS assigner's limit")
    result = torch.full((b, n), BACKGROUND, dtype=torch.long, device=anchors.device)
    img, gt = valid.nonzero(as_tuple=True)  # one row per real GT of the batch
    if img.numel() == 0 or n == 0:
        return result
    boxes = gt_boxes[img, gt].to(anchors.dtype)  # [M, 4]
    cand = atss_candidates(box_centers(anchors), num_anchors_per_level, box_centers(boxes),
                           topk * anchors_per_location, anchors_per_location)  # [M, K]
    cand_boxes = anchors[cand]  # [M, K, 4]
    ious = pairwise_iou(cand_boxes, boxes[:, None, :])  # [M, K]
    std = ious.std(dim=1) if ious.shape[1] > 1 else torch.zeros_like(ious[:, 0])
    thresh = ious.mean(dim=1) + std
    pos = ious >= thresh[:, None]
    if in_gt_box:
        pos &= centers_inside(box_centers(cand_boxes), boxes[:, None, :], center_margin)
    return _resolve_claims(img, gt, cand, ious, pos, b, n, g)


def _resolve_claims(img: Tensor, gt: Tensor, cand: Tensor, ious: Tensor, pos: Tensor, b: int, n: int,
                    g: int) -> Tensor:
    """Positive (GT, candidate) pairs -> int64[B, N]: an anchor claimed by several GTs goes to the one
    with the largest IoU (lower GT index on ties), every other anchor is background.

    img, gt int64[M] (image and GT index of each GT row), cand int64[M, K] (anchor indices),
    ious float[M, K], pos bool[M, K]."""
    pair_m, pair_k = pos.nonzero(as_tuple=True)
    if pair_m.numel() == 0:
        return torch.full((b, n), BACKGROUND, dtype=torch.long, device=cand.device)
    flat = img[pair_m] * n + cand[pair_m, pair_k]  # (image, anchor) of each positive pair
    pair_iou = ious[pair_m, pair_k]
    best = torch.full((b * n,), float("-inf"), dtype=ious.dtype, device=ious.device)
    best.scatter_reduce_(0, flat, pair_iou, reduce="amax")
    winner = pair_iou == best[flat]
    chosen = torch.full((b * n,), g, dtype=torch.long, device=ious.device)
    chosen.scatter_reduce_(0, flat[winner], gt[pair_m][winner], reduce="amin")
    result = torch.where(chosen < g, chosen, torch.full_like(chosen, BACKGROUND))
    return result.view(b, n)


def atss_assign(anchors: Tensor, num_anchors_per_level: Sequence[int], gt_boxes: Tensor, topk: int = 9,
                anchors_per_location: int = 1) -> Tensor:
    """ATSS assignment of one image.

    anchors: float[N, 4] xyxy, levels concatenated; within a location the
        ``anchors_per_location`` shapes are consecutive.
    num_anchors_per_level: anchors of each level (sum = N).
    gt_boxes: float[G, 4] xyxy (G may be 0).
    Returns int64[N]: index of the matched GT, ``-1`` for background. Ties in centre distance go
    to the lower anchor index. See :func:`atss_assign_batched` for the algorithm.
    """
    gt, valid = _as_batch(gt_boxes)
    return atss_assign_batched(anchors, num_anchors_per_level, gt, valid, topk, anchors_per_location)[0]


# ---------------------------------------------------------------------------- TOPK
def topk_assign_batched(anchors: Tensor, gt_boxes: Tensor, gt_valid: Tensor | None = None, topk: int = 9,
                        in_gt_box: bool = True) -> Tensor:
    """The official code's ``POSITIVE_TYPE='TOPK'`` for a padded batch -> int64[B, N] (GT index or -1).

    anchors float[N, 4]; gt_boxes float[B, G, 4]; gt_valid bool[B, G] (None: all valid).
    Per GT, the ``min(topk, N)`` anchors of all levels together with the largest
    ``IoU - d / d_max / 1000`` are candidates, where ``d`` is the anchor-centre to GT-centre
    distance and ``d_max`` the largest such distance in the image (a tie-break towards closer
    anchors that never outweighs an IoU difference above 0.001). Positives: candidates whose centre
    lies inside the GT by more than 0.01 px (``in_gt_box``; off keeps every candidate). An anchor
    claimed by several GTs goes to the one with the largest IoU (lower index on ties). Equal scores
    go to the lower anchor index. Builds float[M, N] IoU and distance matrices (M = real GTs).
    """
    valid = _check_batch(anchors, gt_boxes, gt_valid)
    b, g = gt_boxes.shape[:2]
    n = anchors.shape[0]
    img, gt = valid.nonzero(as_tuple=True)
    if img.numel() == 0 or n == 0:
        return torch.full((b, n), BACKGROUND, dtype=torch.long, device=anchors.device)
    boxes = gt_boxes[img, gt].to(anchors.dtype)  # [M, 4]
    ious = pairwise_iou(anchors[None, :, :], boxes[:, None, :])  # [M, N]
    dist = (box_centers(anchors)[None, :, :] - box_centers(boxes)[:, None, :]).square().sum(-1).sqrt()
    d_max = torch.zeros(b, dtype=dist.dtype, device=dist.device)
    d_max.scatter_reduce_(0, img, dist.amax(dim=1), reduce="amax")
    score = ious - dist / d_max[img, None] / 1000
    cand = torch.sort(score, dim=1, descending=True, stable=True).indices[:, :min(topk, n)]  # [M, K]
    cand_ious = ious.gather(1, cand)
    pos = torch.ones_like(cand, dtype=torch.bool)
    if in_gt_box:
        pos = centers_inside(box_centers(anchors[cand]), boxes[:, None, :])
    return _resolve_claims(img, gt, cand, cand_ious, pos, b, n, g)


def topk_assign(anchors: Tensor, gt_boxes: Tensor, topk: int = 9, in_gt_box: bool = True) -> Tensor:
    """One image of :func:`topk_assign_batched`: anchors float[N, 4], gt_boxes float[G, 4] -> int64[N]."""
    gt, valid = _as_batch(gt_boxes)
    return topk_assign_batched(anchors, gt, valid, topk, in_gt_box)[0]


# ---------------------------------------------------------------------------- RetinaNet
def max_iou_assign_batched(anchors: Tensor, gt_boxes: Tensor, gt_valid: Tensor | None = None,
                           pos_thr: float = 0.5, neg_thr: float = 0.4, low_quality_matches: bool = True,
                           in_gt_box: bool = False) -> Tensor:
    """RetinaNet's max-IoU matcher for a padded batch -> int64[B, N] (GT index, -1, -2).

    IoU >= ``pos_thr`` -> the argmax GT (lower index on ties); < ``neg_thr`` -> background;
    in between -> ignore. ``low_quality_matches``: every anchor that reaches a GT's highest IoU
    (ties included, and only if that IoU > 0) is matched to its argmax GT (maskrcnn-benchmark
    Matcher). ``in_gt_box``: positives whose centre is not inside their GT become ignored
    (official 'IoU' mode). Builds one float[B, N, G] IoU matrix.
    """
    valid = _check_batch(anchors, gt_boxes, gt_valid)
    b, g = gt_boxes.shape[:2]
    n = anchors.shape[0]
    if g == 0 or not bool(valid.any()):
        return torch.full((b, n), BACKGROUND, dtype=torch.long, device=anchors.device)
    iou = pairwise_iou(anchors[None, :, None, :], gt_boxes[:, None, :, :].to(anchors.dtype))  # [B, N, G]
    iou = iou.masked_fill(~valid[:, None, :], -1.0)
    max_iou, argmax = iou.max(dim=2)
    result = argmax.clone()
    result[max_iou < pos_thr] = IGNORE
    result[max_iou < neg_thr] = BACKGROUND
    if low_quality_matches:
        gt_best = iou.max(dim=1, keepdim=True).values  # [B, 1, G]
        reaches_best = ((iou == gt_best) & (gt_best > 0)).any(dim=2)
        result = torch.where(reaches_best, argmax, result)
    if in_gt_box:
        pos = result >= 0
        matched = gt_boxes.gather(1, result.clamp(min=0)[..., None].expand(b, n, 4)).to(anchors.dtype)
        outside = pos & ~centers_inside(box_centers(anchors)[None], matched)
        result = result.masked_fill(outside, IGNORE)
    return result


def max_iou_assign(anchors: Tensor, gt_boxes: Tensor, pos_thr: float = 0.5, neg_thr: float = 0.4,
                   low_quality_matches: bool = True, in_gt_box: bool = False) -> Tensor:
    """One image of :func:`max_iou_assign_batched`: anchors float[N, 4], gt_boxes float[G, 4] -> int64[N]."""
    gt, valid = _as_batch(gt_boxes)
    return max_iou_assign_batched(anchors, gt, valid, pos_thr, neg_thr, low_quality_matches, in_gt_box)[0]


# ---------------------------------------------------------------------------- FCOS
def spatial_scale_assign_batched(points: Tensor, strides: Tensor, levels: Tensor, gt_boxes: Tensor,
                                 gt_valid: Tensor | None = None,
                                 size_bounds: Sequence[float] = (64.0, 128.0, 256.0, 512.0),
                                 center_sampling: bool = False, center_sampling_radius: float = 1.5) -> Tensor:
    """FCOS's spatial and scale constraint for a padded batch -> int64[B, N] (GT index or -1).

    points float[N, 2] (anchor centres), strides float[N], levels int64[N] (0 = P3).
    A point is a candidate for a GT when it lies inside the GT (margin 0.01 px) - or, with
    ``center_sampling``, inside the GT clipped to ``radius * stride`` around the GT centre - and
    ``max(l, t, r, b)`` falls in its level's range ``[bounds[i-1], bounds[i]]`` (-1 and inf at
    the ends). Among candidate GTs the one with the smallest area wins (lower index on ties).
    """
    if points.dim() != 2 or points.shape[-1] != 2:
        raise ValueError(f"points must be float[N, 2], got shape {tuple(points.shape)}")
    valid = _check_batch(torch.cat([points, points], dim=1), gt_boxes, gt_valid)
    b, g = gt_boxes.shape[:2]
    n = points.shape[0]
    if g == 0 or not bool(valid.any()):
        return torch.full((b, n), BACKGROUND, dtype=torch.long, device=points.device)
    gt = gt_boxes.to(points.dtype)[:, None, :, :]  # [B, 1, G, 4]
    px = points[None, :, None, 0]
    py = points[None, :, None, 1]
    left, top = px - gt[..., 0], py - gt[..., 1]
    right, bottom = gt[..., 2] - px, gt[..., 3] - py
    if center_sampling:
        cx = (gt[..., 0] + gt[..., 2]) / 2
        cy = (gt[..., 1] + gt[..., 3]) / 2
        r = (strides * center_sampling_radius)[None, :, None]
        inside = torch.minimum(
            torch.minimum(px - torch.maximum(cx - r, gt[..., 0]), py - torch.maximum(cy - r, gt[..., 1])),
            torch.minimum(torch.minimum(cx + r, gt[..., 2]) - px, torch.minimum(cy + r, gt[..., 3]) - py)) > 0
    else:
        inside = torch.minimum(torch.minimum(left, top), torch.minimum(right, bottom)) > CENTER_MARGIN
    reach = torch.maximum(torch.maximum(left, top), torch.maximum(right, bottom))
    bounds = torch.tensor([-1.0, *size_bounds, float("inf")], dtype=points.dtype, device=points.device)
    lo = bounds[levels][None, :, None]
    hi = bounds[levels + 1][None, :, None]
    ok = inside & (reach >= lo) & (reach <= hi) & valid[:, None, :]
    area = ((gt[..., 2] - gt[..., 0]) * (gt[..., 3] - gt[..., 1])).expand(b, n, g)
    cost = torch.where(ok, area, torch.full_like(area, float("inf")))
    min_cost, idx = cost.min(dim=2)
    return torch.where(torch.isfinite(min_cost), idx, torch.full_like(idx, BACKGROUND))


def spatial_scale_assign(points: Tensor, strides: Tensor, levels: Tensor, gt_boxes: Tensor,
                         size_bounds: Sequence[float] = (64.0, 128.0, 256.0, 512.0),
                         center_sampling: bool = False, center_sampling_radius: float = 1.5) -> Tensor:
    """One image of :func:`spatial_scale_assign_batched`: gt_boxes float[G, 4] -> int64[N]."""
    gt, valid = _as_batch(gt_boxes)
    return spatial_scale_assign_batched(points, strides, levels, gt, valid, size_bounds,
                                        center_sampling, center_sampling_radius)[0]


# ---------------------------------------------------------------------------- crowd regions
def crowd_ignore_mask(anchors: Tensor, crowd_boxes: Tensor, crowd_valid: Tensor | None = None,
                      iof_thr: float = 0.5) -> Tensor:
    """bool[B, N]: anchors whose intersection with a crowd box covers more than ``iof_thr`` of the
    anchor's own area. anchors float[N, 4]; crowd_boxes float[B, K, 4]; crowd_valid bool[B, K]."""
    valid = _check_batch(anchors, crowd_boxes, crowd_valid)
    b, k = crowd_boxes.shape[:2]
    n = anchors.shape[0]
    if k == 0 or not bool(valid.any()):
        return torch.zeros(b, n, dtype=torch.bool, device=anchors.device)
    a = anchors[None, :, None, :]
    c = crowd_boxes.to(anchors.dtype)[:, None, :, :]
    iw = (torch.minimum(a[..., 2], c[..., 2]) - torch.maximum(a[..., 0], c[..., 0])).clamp(min=0)
    ih = (torch.minimum(a[..., 3], c[..., 3]) - torch.maximum(a[..., 1], c[..., 1])).clamp(min=0)
    area = ((anchors[:, 2] - anchors[:, 0]) * (anchors[:, 3] - anchors[:, 1]))[None, :, None]
    return ((iw * ih / area > iof_thr) & valid[:, None, :]).any(dim=2)


# ---------------------------------------------------------------------------- assigner objects
class ATSSAssigner:
    """ATSS (:func:`atss_assign_batched`) with its settings bound once.

    ``__call__(anchors: AnchorSet, gt_boxes float[B, G, 4], gt_valid bool[B, G]) -> int64[B, N]``.
    """

    def __init__(self, *, topk: int = 9, anchors_per_location: int = 1, in_gt_box: bool = True,
                 center_margin: float = CENTER_MARGIN) -> None:
        self.topk, self.anchors_per_location = topk, anchors_per_location
        self.in_gt_box, self.center_margin = in_gt_box, center_margin

    def __call__(self, anchors: AnchorSet, gt_boxes: Tensor, gt_valid: Tensor) -> Tensor:
        return atss_assign_batched(anchors.anchors, anchors.num_per_level, gt_boxes, gt_valid, topk=self.topk,
                                   anchors_per_location=self.anchors_per_location, in_gt_box=self.in_gt_box,
                                   center_margin=self.center_margin)


class TopkAssigner:
    """The official ``TOPK`` positive definition (:func:`topk_assign_batched`), settings bound once."""

    def __init__(self, *, topk: int = 9, in_gt_box: bool = True) -> None:
        self.topk, self.in_gt_box = topk, in_gt_box

    def __call__(self, anchors: AnchorSet, gt_boxes: Tensor, gt_valid: Tensor) -> Tensor:
        return topk_assign_batched(anchors.anchors, gt_boxes, gt_valid, topk=self.topk, in_gt_box=self.in_gt_box)


class MaxIoUAssigner:
    """RetinaNet's matcher (:func:`max_iou_assign_batched`), settings bound once."""

    def __init__(self, *, pos_thr: float = 0.5, neg_thr: float = 0.4, low_quality_matches: bool = True,
                 in_gt_box: bool = False) -> None:
        self.pos_thr, self.neg_thr = pos_thr, neg_thr
        self.low_quality_matches, self.in_gt_box = low_quality_matches, in_gt_box

    def __call__(self, anchors: AnchorSet, gt_boxes: Tensor, gt_valid: Tensor) -> Tensor:
        return max_iou_assign_batched(anchors.anchors, gt_boxes, gt_valid, pos_thr=self.pos_thr,
                                      neg_thr=self.neg_thr, low_quality_matches=self.low_quality_matches,
                                      in_gt_box=self.in_gt_box)


class SpatialScaleAssigner:
    """FCOS's spatial and scale constraint (:func:`spatial_scale_assign_batched`), settings bound once."""

    def __init__(self, *, size_bounds: Sequence[float] = (64.0, 128.0, 256.0, 512.0),
                 center_sampling: bool = False, center_sampling_radius: float = 1.5) -> None:
        self.size_bounds = tuple(size_bounds)
        self.center_sampling, self.center_sampling_radius = center_sampling, center_sampling_radius

    def __call__(self, anchors: AnchorSet, gt_boxes: Tensor, gt_valid: Tensor) -> Tensor:
        return spatial_scale_assign_batched(anchors.centers, anchors.strides, anchors.levels, gt_boxes, gt_valid,
                                            size_bounds=self.size_bounds, center_sampling=self.center_sampling,
                                            center_sampling_radius=self.center_sampling_radius)


Assigner = ATSSAssigner | TopkAssigner | MaxIoUAssigner | SpatialScaleAssigner


def build_assigner(cfg: DetectorConfig) -> Assigner:
    """The assigner ``cfg.assigner`` names, built once with its fields as keyword arguments."""
    if cfg.assigner == "atss":
        return ATSSAssigner(topk=cfg.topk, anchors_per_location=cfg.anchors_per_location, in_gt_box=cfg.in_gt_box)
    if cfg.assigner == "topk":
        return TopkAssigner(topk=cfg.topk, in_gt_box=cfg.in_gt_box)
    if cfg.assigner == "max_iou":
        return MaxIoUAssigner(pos_thr=cfg.iou_pos_thr, neg_thr=cfg.iou_neg_thr,
                              low_quality_matches=cfg.low_quality_matches, in_gt_box=cfg.in_gt_box)
    if cfg.assigner == "spatial_scale":
        return SpatialScaleAssigner(size_bounds=cfg.fcos_size_bounds, center_sampling=cfg.center_sampling,
                                    center_sampling_radius=cfg.center_sampling_radius)
    raise ValueError(f"DetectorConfig.assigner={cfg.assigner!r} has no assigner; choose one of {ASSIGNERS}")
