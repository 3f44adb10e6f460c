"""The official TOPK positive definition on hand-built cases and against its reference loop, and the
assigner objects the model builds once from its config."""
from __future__ import annotations

import math

import pytest
import torch
from reference_assigners import reference_topk_assign

from detector import build_detector, get_preset
from detector.anchors import AnchorGenerator
from detector.assigners import (ATSSAssigner, MaxIoUAssigner, SpatialScaleAssigner, TopkAssigner, topk_assign,
                                topk_assign_batched)

STRIDES = (8, 16, 32, 64, 128)


def _row():
    """Five 10 px anchors in a row: centres (5, 5), (15, 5), (25, 5), (35, 5), (45, 5)."""
    return torch.tensor([[10.0 * i, 0, 10.0 * i + 10, 10] for i in range(5)])


def test_topk_ranks_by_iou_then_by_centre_distance():
    gt = torch.tensor([[0.0, 0, 40, 10]])  # centre (20, 5)
    # IoUs 0.25, 0.25, 0.25, 0.25, 0; distances 15, 5, 5, 15, 25. Equal IoUs: the closer first.
    assert topk_assign(_row(), gt, topk=2).tolist() == [-1, 0, 0, -1, -1]
    # k = 3: anchors 0 and 3 tie on IoU and distance -> the lower index.
    assert topk_assign(_row(), gt, topk=3).tolist() == [0, 0, 0, -1, -1]
    # k = 5 takes anchor 4 as well (IoU 0), but its centre (45, 5) is outside the GT.
    assert topk_assign(_row(), gt, topk=5).tolist() == [0, 0, 0, 0, -1]
    assert topk_assign(_row(), gt, topk=5, in_gt_box=False).tolist() == [0, 0, 0, 0, 0]


def test_topk_iou_outweighs_distance_and_claims_go_to_the_larger_iou():
    # GT 0 [12, 0, 44, 10] (area 320), centre (28, 5): IoUs 0, 80/340 = 0.235 (anchor 1), 100/320 =
    # 0.3125 (anchors 2 and 3, inside the GT), 40/380 = 0.105 (anchor 4).
    gt0 = torch.tensor([[12.0, 0, 44, 10]])
    ious = [0.0, 80 / 340, 100 / 320, 100 / 320, 40 / 380]
    assert topk_assign(_row(), gt0, topk=2).tolist() == [-1, -1, 0, 0, -1]  # 0.3125 > 0.235
    assert ious[1] > ious[4]
    assert topk_assign(_row(), gt0, topk=3).tolist() == [-1, 0, 0, 0, -1]  # anchor 1: centre 15 > 12 + 0.01
    # GT 1 equals anchor 3 (IoU 1): anchor 3 moves to GT 1, anchor 2 stays with GT 0.
    gts = torch.cat([gt0, torch.tensor([[30.0, 0, 40, 10]])])
    assert topk_assign(_row(), gts, topk=2).tolist() == [-1, -1, 0, 1, -1]
    assert topk_assign(_row(), torch.zeros(0, 4)).tolist() == [-1] * 5


def _anchor_set(h, w, spo=1, ratios=(1.0,)):
    sizes = [(math.ceil(h / s), math.ceil(w / s)) for s in STRIDES]
    return AnchorGenerator(STRIDES, 8.0 if spo == 1 else 4.0, spo, ratios)(sizes, torch.device("cpu"))


@pytest.mark.parametrize("spo, ratios", [(1, (1.0,)), (3, (0.5, 1.0, 2.0))])
def test_topk_batched_equals_the_reference_loop(spo, ratios):
    gen = torch.Generator().manual_seed(spo)
    h, w = 160, 224
    anchor_set = _anchor_set(h, w, spo, ratios)
    per_image = []
    for n in (12, 0, 5):
        wh = torch.exp(torch.empty(n, 2).uniform_(1.5, 5.0, generator=gen))
        c = torch.rand(n, 2, generator=gen) * torch.tensor([w, h])
        c[: n // 2] = torch.round(c[: n // 2] / 4) * 4  # centres on the half-stride lattice: distance ties
        boxes = torch.cat([c - wh / 2, c + wh / 2], 1)
        boxes[:, 0::2] = boxes[:, 0::2].clamp(0, w)
        boxes[:, 1::2] = boxes[:, 1::2].clamp(0, h)
        per_image.append(boxes[(boxes[:, 2] > boxes[:, 0] + 1) & (boxes[:, 3] > boxes[:, 1] + 1)])
    g = max(b.shape[0] for b in per_image)
    padded = torch.zeros(len(per_image), g, 4)
    valid = torch.zeros(len(per_image), g, dtype=torch.bool)
    for i, b in enumerate(per_image):
        padded[i, : b.shape[0]] = b
        padded[i, b.shape[0]:] = torch.tensor([0.0, 0, 90, 90])  # padding rows must play no part
        valid[i, : b.shape[0]] = True
    batched = topk_assign_batched(anchor_set.anchors, padded, valid, topk=9)
    for i, b in enumerate(per_image):
        assert torch.equal(batched[i], reference_topk_assign(anchor_set.anchors, b, topk=9)), i
    assert (batched >= 0).any()


@pytest.mark.parametrize("name, kind", [("atss", ATSSAssigner), ("topk", TopkAssigner), ("max_iou", MaxIoUAssigner),
                                        ("spatial_scale", SpatialScaleAssigner)])
def test_the_model_builds_its_assigner_once_from_the_config(name, kind):
    model = build_detector(get_preset("tiny", num_classes=2, assigner=name, topk=5))
    assert isinstance(model.assigner, kind)
    if name in ("atss", "topk"):
        assert model.assigner.topk == 5
    model.train()
    torch.manual_seed(0)
    targets = [{"boxes": torch.tensor([[8.0, 8, 60, 50]]), "labels": torch.tensor([1])}]
    losses = model(torch.randn(1, 3, 64, 64), targets)
    assert all(torch.isfinite(v) for v in losses.values())
    assert model.assign_stats["num_pos"] > 0
