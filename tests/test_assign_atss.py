"""ATSS assignment on hand-built cases, and the batched/windowed paths against the loop reference."""
from __future__ import annotations

import math

import pytest
import torch
from reference_assigners import reference_atss_assign

from detector.anchors import AnchorGenerator, AnchorSet
from detector.assigners import ATSSAssigner, atss_assign, atss_assign_batched, atss_candidates, box_centers

STRIDES = (8, 16, 32, 64, 128)


def _anchors(h, w, scales_per_octave=1, ratios=(1.0,), scale=8.0):
    sizes = [(math.ceil(h / s), math.ceil(w / s)) for s in STRIDES]
    return AnchorGenerator(STRIDES, scale, scales_per_octave, ratios)(sizes, torch.device("cpu"))


def _quad():
    """One level, a 2x2 grid of 10 px anchors centred at (5, 5), (15, 5), (5, 15), (15, 15)."""
    return torch.tensor([[0.0, 0, 10, 10], [10, 0, 20, 10], [0, 10, 10, 20], [10, 10, 20, 20]])


def test_level_with_fewer_anchors_than_k_takes_all_of_them():
    # kk = min(9, 4) = 4 candidates. IoUs with [0, 0, 12, 12]: 0.694, 0.089, 0.089, 0.017;
    # mean + std = 0.532, so only the first anchor passes (its centre is inside).
    gt = torch.tensor([[0.0, 0, 12, 12]])
    assert atss_assign(_quad(), [4], gt, topk=9).tolist() == [0, -1, -1, -1]
    # Two levels, the second holding a single anchor: 5 candidates in all, no crash.
    anchors = torch.cat([_quad(), torch.tensor([[-20.0, -20, 40, 40]])])
    cand = atss_candidates(box_centers(anchors), [4, 1], box_centers(gt), 9)
    assert cand.shape == (1, 5) and sorted(cand[0].tolist()) == [0, 1, 2, 3, 4]
    assert atss_assign(anchors, [4, 1], gt, topk=9).tolist() == [0, -1, -1, -1, -1]


def test_gt_smaller_than_a_stride():
    anchor_set = _anchors(64, 64)
    anchors, counts = anchor_set.anchors, anchor_set.num_per_level
    assert counts == [64, 16, 4, 1, 1]
    # 2 x 2 px box with no anchor centre inside: a GT with zero positives (spec 1.8a).
    assert (atss_assign(anchors, counts, torch.tensor([[1.0, 1, 3, 3]])) == -1).all()
    # Around the P3 centre (12, 12): every P3 candidate has the top IoU 4/4096, but only the anchor
    # whose centre is inside (row 1, col 1 -> index 9) is positive.
    result = atss_assign(anchors, counts, torch.tensor([[11.0, 11, 13, 13]]))
    assert (result >= 0).nonzero().flatten().tolist() == [9]


@pytest.mark.parametrize("box", [[0.0, 0, 20, 30], [40.0, 44, 64, 64], [0.0, 0, 64, 64]])
def test_gt_touching_the_image_border(box):
    anchor_set = _anchors(64, 64)
    gt = torch.tensor([box])
    result = atss_assign(anchor_set.anchors, anchor_set.num_per_level, gt)
    pos = (result == 0).nonzero().flatten()
    assert pos.numel() > 0 and (result[result != 0] == -1).all()
    centres = box_centers(anchor_set.anchors[pos])
    assert ((centres > gt[0, :2] + 0.01) & (centres < gt[0, 2:] - 0.01)).all()
    assert torch.equal(result, reference_atss_assign(anchor_set.anchors, anchor_set.num_per_level, gt))


def test_anchor_claimed_by_two_gts_goes_to_the_larger_iou():
    # Anchor 0 is positive for both: IoU 0.694 with GT 0 and 0.909 with GT 1.
    gts = torch.tensor([[0.0, 0, 12, 12], [0.0, 0, 10, 11]])
    assert atss_assign(_quad(), [4], gts[:1]).tolist() == [0, -1, -1, -1]
    assert atss_assign(_quad(), [4], gts[1:]).tolist() == [0, -1, -1, -1]
    assert atss_assign(_quad(), [4], gts).tolist() == [1, -1, -1, -1]
    assert atss_assign(_quad(), [4], gts.flip(0)).tolist() == [0, -1, -1, -1]
    # Equal IoUs: the lower GT index wins.
    assert atss_assign(_quad(), [4], gts[[1, 1]]).tolist() == [0, -1, -1, -1]


def test_no_gts_is_all_background():
    anchor_set = _anchors(64, 96)
    result = atss_assign(anchor_set.anchors, anchor_set.num_per_level, torch.zeros(0, 4))
    assert result.dtype == torch.long and result.shape == (anchor_set.anchors.shape[0],)
    assert (result == -1).all()
    batched = atss_assign_batched(anchor_set.anchors, anchor_set.num_per_level, torch.zeros(2, 0, 4))
    assert batched.shape == (2, anchor_set.anchors.shape[0]) and (batched == -1).all()


def test_nine_anchors_per_location():
    anchor_set = _anchors(128, 96, scales_per_octave=3, ratios=(0.5, 1.0, 2.0))
    anchors, counts = anchor_set.anchors, anchor_set.num_per_level
    assert counts == [16 * 12 * 9, 8 * 6 * 9, 4 * 3 * 9, 2 * 2 * 9, 1 * 1 * 9]
    gts = torch.tensor([[10.0, 20, 70, 60], [50, 40, 96, 128], [20, 30, 44, 90]])
    # Candidates per level: min(9 * 9, n_level) = 81, 81, 81, 36, 9.
    cand = atss_candidates(box_centers(anchors), counts, box_centers(gts), 9 * 9, 9)
    assert cand.shape == (3, 81 * 3 + 36 + 9)
    # The 9 shapes of a location share a centre, so candidates come in whole locations.
    per_loc = torch.bincount(cand[:, :81].flatten() // 9)
    assert set(per_loc[per_loc > 0].tolist()) == {9}
    result = atss_assign(anchors, counts, gts, topk=9, anchors_per_location=9)
    assert torch.equal(result, reference_atss_assign(anchors, counts, gts, 9, 9))
    assert set(result[result >= 0].tolist()) == {0, 1, 2}
    # With anchors_per_location=1 fewer candidates are taken: the assignment differs (spec 7.3).
    assert not torch.equal(result, atss_assign(anchors, counts, gts, topk=9, anchors_per_location=1))


def _random_boxes(gen, n, h, w):
    wh = torch.exp(torch.empty(n, 2).uniform_(1.0, 5.5, generator=gen))
    c = torch.rand(n, 2, generator=gen) * torch.tensor([w, h])
    # Snap a third of the centres to the half-stride lattice: many exact distance ties.
    c[: n // 3] = torch.round(c[: n // 3] / 4) * 4
    boxes = torch.cat([c - wh / 2, c + wh / 2], 1)
    boxes[:, 0::2] = boxes[:, 0::2].clamp(0, w)
    boxes[:, 1::2] = boxes[:, 1::2].clamp(0, h)
    return boxes[(boxes[:, 2] > boxes[:, 0] + 0.5) & (boxes[:, 3] > boxes[:, 1] + 0.5)]


@pytest.mark.parametrize("per_location", [1, 9])
def test_batched_path_equals_per_image_and_reference(per_location):
    gen = torch.Generator().manual_seed(per_location)
    h, w = 192, 320
    if per_location == 1:
        anchor_set = _anchors(h, w)
    else:
        anchor_set = _anchors(h, w, scales_per_octave=3, ratios=(0.5, 1.0, 2.0))
    anchors, counts = anchor_set.anchors, anchor_set.num_per_level
    per_image = [_random_boxes(gen, n, h, w) for n in (25, 0, 7, 40)]
    g = max(b.shape[0] for b in per_image)
    padded = torch.zeros(len(per_image), g, 4)
    valid = torch.zeros(len(per_image), g, dtype=torch.bool)
    for i, b in enumerate(per_image):
        padded[i, : b.shape[0]] = b
        valid[i, : b.shape[0]] = True
        padded[i, b.shape[0]:] = torch.tensor([0.0, 0, 50, 50])  # padding rows must be ignored
    batched = atss_assign_batched(anchors, counts, padded, valid, topk=9, anchors_per_location=per_location)
    reference = reference_atss_assign
    for i, b in enumerate(per_image):
        single = atss_assign(anchors, counts, b, topk=9, anchors_per_location=per_location)
        assert torch.equal(batched[i], single)
        assert torch.equal(single, reference(anchors, counts, b, 9, per_location))
    assert (batched >= 0).any()


def test_window_search_equals_exhaustive_search():
    gen = torch.Generator().manual_seed(3)
    for per_location, ratios, spo in [(1, (1.0,), 1), (9, (0.5, 1.0, 2.0), 3)]:
        for h, w in [(256, 416), (40, 40), (32, 700)]:
            anchor_set = _anchors(h, w, spo, ratios)
            centres = torch.rand(600, 2, generator=gen) * torch.tensor([w * 1.4, h * 1.4]) - torch.tensor([w, h]) * 0.2
            centres[:300] = torch.round(centres[:300] / 4) * 4
            for k in (1, 3, 9, 19):
                fast = atss_candidates(anchor_set.centers, anchor_set.num_per_level, centres, k * per_location,
                                       per_location)
                slow = atss_candidates(anchor_set.centers, anchor_set.num_per_level, centres, k * per_location,
                                       per_location, window=False)
                assert torch.equal(fast, slow), (per_location, h, w, k)


def test_non_grid_anchors_use_the_exhaustive_search():
    gen = torch.Generator().manual_seed(5)
    anchors = torch.rand(300, 2, generator=gen) * 200
    anchors = torch.cat([anchors, anchors + 10 + torch.rand(300, 2, generator=gen) * 60], 1)
    gts = _random_boxes(gen, 12, 200, 200)
    result = atss_assign(anchors, [200, 100], gts, topk=9)
    assert torch.equal(result, reference_atss_assign(anchors, [200, 100], gts, 9, 1))


def test_bad_shapes_are_clear_errors():
    with pytest.raises(ValueError, match="gt_boxes"):
        atss_assign(_quad(), [4], torch.zeros(4))
    with pytest.raises(ValueError, match="num_anchors_per_level"):
        atss_assign(_quad(), [3], torch.tensor([[0.0, 0, 12, 12]]))


def test_official_plus_one_convention_is_our_assigner_on_grown_boxes():
    """bench/fidelity.py measures the "+1" convention by running our assigner on the official boxes
    grown 1 px right/bottom, anchors shifted by 0.5 px and a 0.51 px centre margin; that must be the
    official assignment (checked against a "+1" transcription)."""
    gen = torch.Generator().manual_seed(11)
    anchor_set = _anchors(192, 320)
    official_anchors = anchor_set.anchors + torch.tensor([0.5, 0.5, -0.5, -0.5])  # [c - (s-1)/2, c + (s-1)/2]
    shifted = AnchorSet(anchor_set.anchors + 0.5, anchor_set.strides, anchor_set.levels, anchor_set.num_per_level)
    assigner = ATSSAssigner(topk=9, center_margin=0.51)
    checked = 0
    for n in (30, 12):
        gts = _random_boxes(gen, n, 192, 320) - torch.tensor([0.0, 0.0, 1.0, 1.0])  # official x2 = x + w - 1
        gts = gts[(gts[:, 2] > gts[:, 0]) & (gts[:, 3] > gts[:, 1])]  # the official code drops the others
        official = reference_atss_assign(official_anchors, anchor_set.num_per_level, gts, plus_one=True)
        grown = gts + torch.tensor([0.0, 0.0, 1.0, 1.0])
        mapped = assigner(shifted, grown[None], torch.ones(1, gts.shape[0], dtype=torch.bool))[0]
        assert torch.equal(mapped, official)
        checked += int((official >= 0).sum())
    assert checked > 0
