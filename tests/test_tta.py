"""Test-time augmentation: passes of the spec, area filters, the soft-vote / vote / nms merges on
hand-built boxes."""
from __future__ import annotations

import math
import re

import numpy as np
import pytest
import torch

from pipeline.tta import (TTAConfig, TTAPass, area_filter, cap_detections, merge_passes, nms_merge, soft_vote,
                          vote)


def _iou(a, b) -> float:
    ix = max(0.0, min(a[2], b[2]) - max(a[0], b[0]))
    iy = max(0.0, min(a[3], b[3]) - max(a[1], b[1]))
    inter = ix * iy
    union = (a[2] - a[0]) * (a[3] - a[1]) + (b[2] - b[0]) * (b[3] - b[1]) - inter
    return inter / union if union > 0 else 0.0


def _reference_soft_vote(boxes, scores, labels, thr=0.66, score_thr=0.05):
    """Straight transcription of the spec, one class and one cluster at a time, in plain Python."""
    out = []
    for c in sorted(set(labels)):
        rest = sorted([(s, b) for b, s, lab in zip(boxes, scores, labels) if lab == c],
                      key=lambda t: -t[0])
        while rest:
            s0, b0 = rest[0]
            cluster = [(s, b, _iou(b0, b)) for s, b in rest if _iou(b0, b) >= thr or b is b0]
            rest = [(s, b) for s, b in rest if not (_iou(b0, b) >= thr or b is b0)]
            if len(cluster) == 1:
                out.append((s0, list(b0), c))
                continue
            total = sum(s for s, _, _ in cluster)
            mean = [sum(s * b[k] for s, b, _ in cluster) / total for k in range(4)]
            out.append((s0, mean, c))
            for s, b, iou in cluster[1:]:
                if s * (1 - iou) >= score_thr:
                    out.append((s * (1 - iou), list(b), c))
    out.sort(key=lambda t: -t[0])
    return out


def test_two_overlapping_boxes_merge_by_score_weighted_vote_and_disjoint_stay():
    a, b, far = [0.0, 0.0, 10.0, 10.0], [1.0, 0.0, 11.0, 10.0], [50.0, 50.0, 60.0, 60.0]
    iou_ab = 90.0 / 110.0  # >= 0.66: one cluster headed by a
    boxes = torch.tensor([b, far, a])
    scores = torch.tensor([0.6, 0.7, 0.9])
    labels = torch.tensor([1, 1, 1])
    out_b, out_s, out_l = soft_vote(boxes, scores, labels)
    # merged box: (0.9 a + 0.6 b) / 1.5, score 0.9; the far box unchanged at 0.7; b also stays,
    # damped to 0.6 * (1 - IoU) = 0.109 >= 0.05
    assert out_s.tolist() == pytest.approx([0.9, 0.7, 0.6 * (1 - iou_ab)], rel=1e-6)
    assert out_b[0].tolist() == pytest.approx([0.4, 0.0, 10.4, 10.0], abs=1e-5)
    assert out_b[1].tolist() == far
    assert out_b[2].tolist() == b
    assert out_l.tolist() == [1, 1, 1]


def test_damped_member_below_threshold_is_dropped_and_classes_never_merge():
    a, b = [0.0, 0.0, 10.0, 10.0], [1.0, 0.0, 11.0, 10.0]
    # b at 0.2 damps to 0.036 < 0.05: only the merged box remains
    out_b, out_s, _ = soft_vote(torch.tensor([a, b]), torch.tensor([0.9, 0.2]), torch.tensor([3, 3]))
    assert out_s.tolist() == pytest.approx([0.9])
    assert out_b[0].tolist() == pytest.approx([0.2 / 1.1, 0, 10 + 0.2 / 1.1, 10], abs=1e-5)
    # same boxes, different classes: both kept unchanged
    out_b, out_s, out_l = soft_vote(torch.tensor([a, b]), torch.tensor([0.9, 0.2]), torch.tensor([3, 4]))
    assert out_b.tolist() == [a, b] and out_l.tolist() == [3, 4]
    assert out_s.tolist() == pytest.approx([0.9, 0.2])
    # IoU just under the threshold: no merge
    c = [0.0, 0.0, 10.0, 10.0]
    d = [3.5, 0.0, 13.5, 10.0]  # IoU = 65 / 135 = 0.48
    out_b, out_s, _ = soft_vote(torch.tensor([c, d]), torch.tensor([0.9, 0.8]), torch.tensor([1, 1]))
    assert out_b.tolist() == [c, d] and out_s.tolist() == pytest.approx([0.9, 0.8])


def test_soft_vote_matches_reference_on_random_boxes():
    rng = np.random.default_rng(0)
    centers = rng.uniform(20, 200, size=(6, 2))
    boxes, scores, labels = [], [], []
    for _ in range(120):  # jittered copies around a few objects -> real clusters, plus noise
        cx, cy = centers[rng.integers(6)] + rng.normal(0, 3, 2)
        w, h = rng.uniform(15, 40, 2)
        boxes.append([cx - w / 2, cy - h / 2, cx + w / 2, cy + h / 2])
        scores.append(float(rng.uniform(0.05, 1)))
        labels.append(int(rng.integers(1, 4)))
    ref = _reference_soft_vote(boxes, scores, labels)
    out_b, out_s, out_l = soft_vote(torch.tensor(boxes, dtype=torch.float64),
                                    torch.tensor(scores, dtype=torch.float64), torch.tensor(labels))
    assert len(ref) == len(out_s) < len(boxes)
    got = sorted(zip(out_s.tolist(), out_b.tolist(), out_l.tolist()), key=lambda t: (-t[0], t[2]))
    ref = sorted(ref, key=lambda t: (-t[0], t[2]))
    for (s, b, c), (rs, rb, rc) in zip(got, ref):
        assert s == pytest.approx(rs, rel=1e-9) and c == rc
        assert b == pytest.approx(rb, rel=1e-9)


def test_soft_vote_edge_cases():
    empty = soft_vote(torch.zeros(0, 4), torch.zeros(0), torch.zeros(0, dtype=torch.long))
    assert [t.shape[0] for t in empty] == [0, 0, 0]
    # a zero-area box heads its own cluster instead of looping forever or vanishing
    out_b, out_s, _ = soft_vote(torch.tensor([[5.0, 5.0, 5.0, 9.0]]), torch.tensor([0.5]),
                                torch.tensor([1]))
    assert out_b.tolist() == [[5.0, 5.0, 5.0, 9.0]] and out_s.tolist() == [0.5]


def test_area_filter_is_strict_and_measured_in_pass_pixels():
    boxes = torch.tensor([[0.0, 0.0, 64.0, 64.0], [0.0, 0.0, 65.0, 65.0], [0, 0, 200.0, 200.0]])
    assert area_filter(boxes, (64, 192)).tolist() == [False, True, False]
    assert area_filter(boxes, None).tolist() == [True, True, True]
    # boxes in original pixels, pass at half size: 200 px -> 100 px, inside (64, 192)
    assert area_filter(boxes, (64, 192), (0.5, 0.5)).tolist() == [False, False, True]
    assert area_filter(boxes, (0, math.inf)).tolist() == [True, True, True]


def test_default_config_has_the_spec_passes():
    cfg = TTAConfig()
    passes = cfg.passes()
    assert len(passes) == 2 + 2 * 12
    assert passes[:2] == [TTAPass(800, 1333, False, None), TTAPass(800, 1333, True, None)]
    by_scale = {p.min_size: p for p in passes[2:] if not p.hflip}
    assert [p.min_size for p in passes[2::2]] == [400, 500, 600, 640, 700, 900, 1000, 1100, 1200,
                                                   1300, 1400, 1800]
    assert {s: by_scale[s].max_size for s in (700, 900, 1800)} == {700: 1333, 900: 3000, 1800: 3000}
    assert by_scale[400].area_range == (96, math.inf) and by_scale[640].area_range == (64, math.inf)
    assert by_scale[1000].area_range == (0, math.inf) and by_scale[1100].area_range == (0, 256)
    assert by_scale[1400].area_range == (0, 192) and by_scale[1800].area_range == (0, 96)
    assert all(p.hflip for p in passes[3::2])
    assert (cfg.vote_iou, cfg.vote_score_threshold, cfg.max_per_image) == (0.66, 0.05, 1000)
    assert TTAConfig.from_dict(cfg.to_dict()) == cfg
    assert len(TTAConfig(hflip=False, scale_hflip=False).passes()) == 13
    # the same augmentation for a model tested at 160 px: everything x0.2, the paper's at 800
    assert cfg.scaled_to(800, 1333) == cfg
    small = cfg.scaled_to(160, 267)
    assert small.scales[:3] == (80, 100, 120) and small.scales[-1] == 360 and small.max_size == 600
    assert small.scale_ranges[0] == (pytest.approx(19.2), math.inf)
    assert small.scale_ranges[-1] == (0.0, pytest.approx(19.2))


def test_config_rejects_bad_values():
    with pytest.raises(ValueError, match="2 scales but 1 scale_ranges"):
        TTAConfig(scales=(100, 200), scale_ranges=((0, 50),))
    with pytest.raises(ValueError, match=r"range \(90.0, 10.0\) of scale 100"):
        TTAConfig(scales=(100,), scale_ranges=((90, 10),))
    with pytest.raises(ValueError, match="vote_iou"):
        TTAConfig(vote_iou=0.0)
    with pytest.raises(ValueError, match="unknown key"):
        TTAConfig.from_dict({"scales_": [1]})


def test_merge_passes_caps_per_image_keeping_ties():
    boxes = torch.tensor([[i * 20.0, 0.0, i * 20.0 + 10, 10.0] for i in range(6)])
    per_pass = [{"boxes": boxes[:3], "scores": torch.tensor([0.9, 0.5, 0.5]),
                 "labels": torch.tensor([1, 1, 1])},
                {"boxes": boxes[3:], "scores": torch.tensor([0.8, 0.5, 0.1]),
                 "labels": torch.tensor([2, 2, 2])}]
    out = merge_passes(per_pass, TTAConfig(max_per_image=3))
    # the cut at the 3rd score (0.5) keeps every tie: 0.9, 0.8 and the three 0.5s
    assert out["scores"].tolist() == pytest.approx([0.9, 0.8, 0.5, 0.5, 0.5])
    assert cap_detections(torch.tensor([0.3, 0.2]), 5).tolist() == [0, 1]


# ------------------------------------------------------------------------------------------------
# the official vote and nms merges (ATSS bbox_aug MERGE_TYPE "vote" / "nms")
# ------------------------------------------------------------------------------------------------
A, B, G, FAR = [0.0, 0.0, 10.0, 10.0], [1.0, 0.0, 11.0, 10.0], [0.0, 0.0, 10.0, 11.0], [50.0, 50.0, 60.0, 60.0]


def test_vote_keeps_only_the_merged_box_of_each_cluster():
    # IoU(A, B) = 90/110 and IoU(A, G) = 100/110, both >= 0.66: one cluster headed by A (0.9)
    boxes = torch.tensor([B, FAR, A, G])
    scores = torch.tensor([0.6, 0.7, 0.9, 0.3])
    out_b, out_s, out_l = vote(boxes, scores, torch.tensor([1, 1, 1, 1]))
    assert out_s.tolist() == pytest.approx([0.9, 0.7])  # no damped members, unlike soft-vote
    # (0.9 A + 0.6 B + 0.3 G) / 1.8
    assert out_b[0].tolist() == pytest.approx([0.6 / 1.8, 0.0, 18.6 / 1.8, 18.3 / 1.8], abs=1e-5)
    assert out_b[1].tolist() == FAR  # a one-box cluster stays exactly as it was
    assert out_l.tolist() == [1, 1]


def test_vote_never_merges_across_classes_and_handles_empty_input():
    boxes = torch.tensor([A, B])
    out_b, out_s, out_l = vote(boxes, torch.tensor([0.9, 0.6]), torch.tensor([1, 2]))
    assert out_b.tolist() == [A, B] and out_s.tolist() == pytest.approx([0.9, 0.6]) and out_l.tolist() == [1, 2]
    empty = vote(torch.zeros(0, 4), torch.zeros(0), torch.zeros(0, dtype=torch.long))
    assert [t.shape[0] for t in empty] == [0, 0, 0]


def test_nms_merge_suppresses_same_class_overlaps_above_its_iou():
    # IoU(A, B) = 0.818 > 0.6: B goes; IoU(A, C) = 100/170 = 0.588 < 0.6: C stays unchanged;
    # the copy of A in class 2 never competes with class 1
    C = [0.0, 0.0, 10.0, 17.0]
    boxes = torch.tensor([B, C, A, A])
    scores = torch.tensor([0.6, 0.5, 0.9, 0.4])
    labels = torch.tensor([1, 1, 1, 2])
    out_b, out_s, out_l = nms_merge(boxes, scores, labels, 0.6)
    assert out_s.tolist() == pytest.approx([0.9, 0.5, 0.4])
    assert out_b.tolist() == [A, C, A]
    assert out_l.tolist() == [1, 1, 2]
    # at IoU 0.59 the threshold falls below IoU(A, C): C is suppressed too
    assert nms_merge(boxes, scores, labels, 0.58)[1].tolist() == pytest.approx([0.9, 0.4])


@pytest.mark.parametrize("merge", ["soft-vote", "vote", "nms"])
def test_merge_passes_applies_the_configured_merge(merge):
    per_pass = [{"boxes": torch.tensor([A, FAR]), "scores": torch.tensor([0.9, 0.7]), "labels": torch.tensor([1, 1])},
                {"boxes": torch.tensor([B]), "scores": torch.tensor([0.6]), "labels": torch.tensor([1])}]
    cfg = TTAConfig(merge=merge)
    out = merge_passes(per_pass, cfg)
    union = (torch.tensor([A, FAR, B]), torch.tensor([0.9, 0.7, 0.6]), torch.tensor([1, 1, 1]))
    expected = {"soft-vote": soft_vote(*union, cfg.vote_iou, cfg.vote_score_threshold),
                "vote": vote(*union, cfg.vote_iou), "nms": nms_merge(*union, cfg.nms_iou)}[merge]
    for got, want in zip((out["boxes"], out["scores"], out["labels"]), expected):
        assert torch.equal(got, want)
    assert len(out["scores"]) == {"soft-vote": 3, "vote": 2, "nms": 2}[merge]
    assert TTAConfig.from_dict(cfg.to_dict()) == cfg


def test_config_rejects_wrong_types_and_unknown_merges_naming_the_field():
    for field, value in (("merge", "max"), ("merge", 1), ("nms_iou", 0.0), ("vote_iou", "0.66"),
                         ("hflip", "yes"), ("max_per_image", 10.5), ("max_per_image", True),
                         ("scales", "abc"), ("scales", [400.5]), ("scale_ranges", [[0]]), ("scale_ranges", "wide")):
        with pytest.raises(ValueError, match=re.escape(f"TTAConfig.{field}={value!r}: expected")):
            TTAConfig.from_dict({field: value, **({"scale_ranges": [[0, None]]} if field == "scales" else {}),
                                 **({"scales": [400]} if field == "scale_ranges" else {})})
    with pytest.raises(ValueError, match="expected a JSON object"):
        TTAConfig.from_dict([1, 2])
