"""Losses of the ATSS family (spec section 3) as functions over flat tensors.

Normalisers follow the official code: ``N_pos`` and the sum of centerness targets are summed over
all workers with one ``all_reduce`` when ``torch.distributed`` is initialised and divided by the
world size (DDP then averages gradients, which equals normalising by the global count). The
collective runs even on a worker without positives so no worker waits forever (spec 3.7).
"""
from __future__ import annotations

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import Tensor
from torchvision.ops import sigmoid_focal_loss


def reduce_mean_counts(num_pos: Tensor, centerness_sum: Tensor) -> tuple[Tensor, Tensor]:
    """Average ``num_pos`` and ``centerness_sum`` (0-d tensors) over workers (identity when not
    distributed). Returns detached 0-d tensors."""
    values = torch.stack([num_pos.detach().float(), centerness_sum.detach().float()])
    if dist.is_available() and dist.is_initialized():
        dist.all_reduce(values)
        values = values / dist.get_world_size()
    return values[0], values[1]


def centerness_targets(points: Tensor, boxes: Tensor) -> Tensor:
    """``sqrt(min(l,r)/max(l,r) * min(t,b)/max(t,b))`` with l..b from ``points`` float[P, 2] to the
    sides of ``boxes`` float[P, 4] (the anchor centre must be inside its box) -> float[P]."""
    l = points[:, 0] - boxes[:, 0]
    t = points[:, 1] - boxes[:, 1]
    r = boxes[:, 2] - points[:, 0]
    b = boxes[:, 3] - points[:, 1]
    lr = torch.minimum(l, r) / torch.maximum(l, r)
    tb = torch.minimum(t, b) / torch.maximum(t, b)
    return torch.sqrt((lr * tb).clamp(min=0))


def giou_loss(pred: Tensor, target: Tensor, eps: float = 1e-7) -> Tensor:
    """``1 - GIoU`` per row of ``pred`` and ``target`` float[P, 4] xyxy -> float[P].

    As the official loss: the predicted x2/y2 are forced >= x1/y1, eps on union and enclosure."""
    x1, y1 = pred[:, 0], pred[:, 1]
    x2 = torch.maximum(pred[:, 2], x1)
    y2 = torch.maximum(pred[:, 3], y1)
    area_p = (x2 - x1) * (y2 - y1)
    area_t = (target[:, 2] - target[:, 0]) * (target[:, 3] - target[:, 1])
    iw = (torch.minimum(x2, target[:, 2]) - torch.maximum(x1, target[:, 0])).clamp(min=0)
    ih = (torch.minimum(y2, target[:, 3]) - torch.maximum(y1, target[:, 1])).clamp(min=0)
    inter = iw * ih
    union = area_p + area_t - inter + eps
    ew = torch.maximum(x2, target[:, 2]) - torch.minimum(x1, target[:, 0])
    eh = torch.maximum(y2, target[:, 3]) - torch.minimum(y1, target[:, 1])
    enclose = ew * eh + eps
    giou = inter / union - (enclose - union) / enclose
    return 1.0 - giou


def classification_loss(logits: Tensor, labels: Tensor, alpha: float = 0.25, gamma: float = 2.0) -> Tensor:
    """Sigmoid focal loss summed over anchors and classes (not normalised).

    logits float[M, C]; labels int64[M]: 1..C foreground, 0 background, -2 ignored (skipped)."""
    keep = labels >= 0
    logits = logits[keep]
    labels = labels[keep]
    target = torch.zeros_like(logits)
    fg = labels > 0
    target[fg.nonzero(as_tuple=True)[0], labels[fg] - 1] = 1.0
    return sigmoid_focal_loss(logits, target, alpha=alpha, gamma=gamma, reduction="sum")


def regression_loss(kind: str, pred: Tensor, target: Tensor, weights: Tensor, beta: float = 1.0 / 9) -> Tensor:
    """Weighted sum of the per-positive regression loss (not normalised).

    ``giou``: pred/target are decoded boxes float[P, 4] xyxy; ``smooth_l1``: encoded deltas or
    normalised distances float[P, 4] (loss summed over the 4 coordinates). weights float[P]."""
    if kind == "giou":
        per = giou_loss(pred, target)
    elif kind == "smooth_l1":
        per = F.smooth_l1_loss(pred, target, beta=beta, reduction="none").sum(dim=1)
    else:
        raise ValueError(f"unknown regression loss {kind!r}")
    return (per * weights).sum()


def centerness_loss(logits: Tensor, targets: Tensor) -> Tensor:
    """BCE-with-logits summed over positives (not normalised); logits, targets float[P]."""
    return F.binary_cross_entropy_with_logits(logits, targets, reduction="sum")
