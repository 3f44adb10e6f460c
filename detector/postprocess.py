"""Inference post-processing (spec section 4, official ATSSPostProcessor)."""
from __future__ import annotations

from typing import Callable

import torch
from torch import Tensor
from torchvision.ops import batched_nms


def postprocess_image(cls_logits: Tensor, ctr_logits: Tensor | None, regression: Tensor,
                      num_per_level: list[int], decode: Callable[[Tensor, Tensor], Tensor],
                      image_size: tuple[int, int], score_thresh: float = 0.05, pre_nms_top_n: int = 1000,
                      nms_thresh: float = 0.6, detections_per_img: int = 100) -> dict[str, Tensor]:
    """Detections of one image.

    cls_logits float[N, C]; ctr_logits float[N] or None; regression float[N, 4];
    ``decode(regression_rows, anchor_indices) -> boxes xyxy``; image_size (h, w) of the valid region.
    Per level: candidates (anchor, class) with ``p > score_thresh``, the top ``pre_nms_top_n`` by
    ``p * centerness``; boxes decoded and clipped; score ``sqrt(p * centerness)`` (``p`` without
    centerness). Then class-wise NMS and the ``detections_per_img`` best.
    Returns ``{"boxes" float[D, 4], "scores" float[D], "labels" int64[D] (1..C)}`` in input pixels.
    """
    num_classes = cls_logits.shape[1]
    boxes_all, scores_all, labels_all = [], [], []
    start = 0
    for n_l in num_per_level:
        sl = slice(start, start + n_l)
        anchor_base = start
        start += n_l
        prob = cls_logits[sl].sigmoid()
        cand = prob > score_thresh
        flat = cand.flatten().nonzero(as_tuple=True)[0]
        if flat.numel() == 0:
            continue
        anchor_idx = flat // num_classes
        class_idx = flat % num_classes
        p = prob.flatten()[flat]
        if ctr_logits is not None:
            rank = p * ctr_logits[sl].sigmoid()[anchor_idx]
        else:
            rank = p
        if rank.numel() > pre_nms_top_n:
            rank, top = rank.topk(pre_nms_top_n)
            anchor_idx, class_idx = anchor_idx[top], class_idx[top]
        score = rank.sqrt() if ctr_logits is not None else rank
        boxes = decode(regression[sl][anchor_idx], anchor_idx + anchor_base)
        boxes_all.append(boxes)
        scores_all.append(score)
        labels_all.append(class_idx + 1)
    if not boxes_all:
        dev = cls_logits.device
        return {"boxes": torch.zeros(0, 4, device=dev), "scores": torch.zeros(0, device=dev),
                "labels": torch.zeros(0, dtype=torch.long, device=dev)}
    boxes = torch.cat(boxes_all)
    scores = torch.cat(scores_all)
    labels = torch.cat(labels_all)
    h, w = image_size
    boxes = torch.stack([boxes[:, 0].clamp(0, w), boxes[:, 1].clamp(0, h),
                         boxes[:, 2].clamp(0, w), boxes[:, 3].clamp(0, h)], dim=1)
    keep = batched_nms(boxes, scores, labels, nms_thresh)[:detections_per_img]
    return {"boxes": boxes[keep], "scores": scores[keep], "labels": labels[keep]}


def rescale_boxes(boxes: Tensor, image_size: tuple[int, int], original_size: tuple[int, int]) -> Tensor:
    """Boxes float[D, 4] from the resized image (h, w) to the original (h0, w0), clipped to it."""
    h, w = image_size
    h0, w0 = original_size
    scale = boxes.new_tensor([w0 / w, h0 / h, w0 / w, h0 / h])
    out = boxes * scale
    return torch.stack([out[:, 0].clamp(0, w0), out[:, 1].clamp(0, h0),
                        out[:, 2].clamp(0, w0), out[:, 3].clamp(0, h0)], dim=1)
