"""RetinaNet (max-IoU) and FCOS (spatial and scale) assignment, and crowd regions."""
from __future__ import annotations

import math

import torch

from detector import build_detector, get_preset
from detector.anchors import AnchorGenerator
from detector.assigners import (IGNORE, crowd_ignore_mask, max_iou_assign, max_iou_assign_batched,
                                spatial_scale_assign, spatial_scale_assign_batched)

STRIDES = (8, 16, 32, 64, 128)


def _quad():
    return torch.tensor([[0.0, 0, 10, 10], [10, 0, 20, 10], [0, 10, 10, 20], [10, 10, 20, 20]])


def _points(h, w):
    sizes = [(math.ceil(h / s), math.ceil(w / s)) for s in STRIDES]
    return AnchorGenerator(STRIDES, 8.0, 1, (1.0,))(sizes, torch.device("cpu"))


def test_max_iou_thresholds_and_ignore_band():
    assert max_iou_assign(_quad(), torch.tensor([[0.0, 0, 12, 12]])).tolist() == [0, -1, -1, -1]
    # IoU 0.4545 for anchors 0 and 1: between 0.4 and 0.5 -> ignored ...
    gt = torch.tensor([[0.0, 0, 22, 10]])
    assert max_iou_assign(_quad(), gt, low_quality_matches=False).tolist() == [IGNORE, IGNORE, -1, -1]
    # ... unless low-quality matches give each GT its best anchors (ties included).
    assert max_iou_assign(_quad(), gt, low_quality_matches=True).tolist() == [0, 0, -1, -1]
    # A GT that overlaps nothing gets no low-quality match.
    assert max_iou_assign(_quad(), torch.tensor([[100.0, 100, 110, 110]])).tolist() == [-1, -1, -1, -1]
    assert max_iou_assign(_quad(), torch.zeros(0, 4)).tolist() == [-1, -1, -1, -1]


def test_max_iou_in_gt_box_turns_outside_positives_into_ignore():
    gt = torch.tensor([[0.0, 0, 10, 5]])  # IoU 0.5 with anchor 0, whose centre (5, 5) is on the GT's edge
    assert max_iou_assign(_quad(), gt).tolist() == [0, -1, -1, -1]
    assert max_iou_assign(_quad(), gt, in_gt_box=True).tolist() == [IGNORE, -1, -1, -1]


def test_max_iou_two_gts_and_batched_padding():
    gts = torch.tensor([[0.0, 0, 12, 12], [0.0, 0, 10, 11], [9.0, 9, 21, 21]])
    single = max_iou_assign(_quad(), gts)
    assert single.tolist() == [1, -1, -1, 2]
    padded = torch.stack([torch.cat([gts, torch.zeros(1, 4)]), torch.cat([gts[2:], torch.ones(3, 4)])])
    valid = torch.tensor([[True, True, True, False], [True, False, False, False]])
    batched = max_iou_assign_batched(_quad(), padded, valid)
    assert batched[0].tolist() == single.tolist()
    assert batched[1].tolist() == max_iou_assign(_quad(), gts[2:]).tolist()


def test_spatial_scale_levels_and_centre_sampling():
    ps = _points(128, 128)
    centres = ps.centers
    gt = torch.tensor([[0.0, 0, 40, 40]])
    result = spatial_scale_assign(centres, ps.strides, ps.levels, gt)
    # Every P3 point strictly inside (centres 4..36, reach <= 36 < 64); nothing on other levels.
    assert (ps.levels[result == 0] == 0).all() and int((result == 0).sum()) == 25
    sampled = spatial_scale_assign(centres, ps.strides, ps.levels, gt, center_sampling=True,
                                   center_sampling_radius=1.5)
    # Sub-box [8, 8, 32, 32] around the centre: P3 centres 12, 20, 28 -> 3 x 3.
    pos = centres[sampled == 0]
    assert pos.shape[0] == 9 and set(pos[:, 0].tolist()) == {12.0, 20.0, 28.0}


def test_spatial_scale_ranges_and_smallest_area_wins():
    ps = _points(256, 256)
    big = torch.tensor([[0.0, 0, 200, 200]])
    result = spatial_scale_assign(ps.centers, ps.strides, ps.levels, big)
    c = ps.centers
    reach = torch.stack([c[:, 0], c[:, 1], 200 - c[:, 0], 200 - c[:, 1]], 1).max(1).values
    bounds = torch.tensor([-1.0, 64, 128, 256, 512, math.inf])
    inside = (c > 0.01).all(1) & (c < 199.99).all(1)
    expected = inside & (reach >= bounds[ps.levels]) & (reach <= bounds[ps.levels + 1])
    assert torch.equal(result == 0, expected) and expected.any()
    # A point inside two GTs goes to the smaller one.
    two = torch.tensor([[0.0, 0, 60, 60], [8.0, 8, 40, 40]])
    result = spatial_scale_assign(ps.centers, ps.strides, ps.levels, two)
    p = ((c[:, 0] == 20) & (c[:, 1] == 20) & (ps.levels == 0)).nonzero().item()
    assert result[p].item() == 1
    batched = spatial_scale_assign_batched(ps.centers, ps.strides, ps.levels, two[None], None)
    assert torch.equal(batched[0], result)


def test_crowd_regions_are_ignored_only_when_asked():
    anchors = _quad()
    crowd = torch.tensor([[[0.0, 0, 20, 11]]])
    assert crowd_ignore_mask(anchors, crowd).tolist() == [[True, True, False, False]]
    model = build_detector(get_preset("tiny", num_classes=2, crowd_as_ignore=True))
    images = torch.randn(1, 3, 128, 128)
    targets = [{"boxes": torch.tensor([[4.0, 4, 28, 28]]), "labels": torch.tensor([1]),
                "crowd_boxes": torch.tensor([[64.0, 64, 128, 128]])}]
    model.train()
    model(images, targets)
    with torch.no_grad():
        feats = model.backbone(images)
        anchor_set = model.anchor_generator([tuple(f.shape[-2:]) for f in feats], images.device)
        gt, _, valid = model._pad_targets(targets, images.device)
        crowd, _, crowd_valid = model._pad_targets(targets, images.device, key="crowd_boxes")
        with_crowd = model.assign(anchor_set, gt, valid, crowd, crowd_valid)
        without = model.assign(anchor_set, gt, valid)
    assert torch.equal(with_crowd >= 0, without >= 0)  # positives unchanged
    ignored = with_crowd == IGNORE
    assert ignored.any() and (without[ignored] == -1).all()
    centres = (anchor_set.anchors[ignored[0]][:, :2] + anchor_set.anchors[ignored[0]][:, 2:]) / 2
    assert (centres > 64).all()  # IoF > 0.5 of a 64 px anchor with the crowd box
