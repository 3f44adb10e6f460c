"""DetectorConfig: paper defaults, presets, validation, round trips."""
from __future__ import annotations

import dataclasses
import json
import math

import pytest

from detector import PRESETS, DetectorConfig, get_preset


def test_defaults_are_the_papers_atss_r50():
    cfg = DetectorConfig()
    assert cfg == get_preset("atss_r50")
    assert (cfg.backbone, cfg.frozen_stages, cfg.frozen_bn, cfg.num_classes) == ("resnet50", 2, True, 80)
    assert (cfg.fpn_channels, cfg.head_channels, cfg.num_convs, cfg.gn_groups) == (256, 256, 4, 32)
    assert (cfg.assigner, cfg.topk, cfg.anchor_scale, cfg.anchors_per_location) == ("atss", 9, 8.0, 1)
    assert (cfg.group_norm, cfg.reg_loss, cfg.in_gt_box, cfg.centerness, cfg.scalar) == (True, "giou", True, True, True)
    assert (cfg.focal_alpha, cfg.focal_gamma, cfg.reg_loss_weight) == (0.25, 2.0, 2.0)
    assert cfg.bbox_reg_weights == (10.0, 10.0, 5.0, 5.0) and cfg.delta_clamp == pytest.approx(math.log(1000 / 16))
    assert (cfg.score_thresh, cfg.pre_nms_top_n, cfg.nms_thresh, cfg.detections_per_img) == (0.05, 1000, 0.6, 100)
    assert cfg.strides == (8, 16, 32, 64, 128)


def test_presets():
    assert {"atss_r50", "retinanet_r50", "fcos_r50", "atss_fcos_r50", "tiny", "atss_tiny", "retinanet_tiny",
            "fcos_tiny", "atss_fcos_tiny"} <= set(PRESETS)
    retina = get_preset("retinanet_r50")
    assert retina.anchors_per_location == 9 and retina.assigner == "max_iou"
    assert (retina.iou_pos_thr, retina.iou_neg_thr, retina.low_quality_matches) == (0.5, 0.4, True)
    assert not (retina.group_norm or retina.in_gt_box or retina.centerness or retina.scalar)
    assert retina.reg_loss == "smooth_l1"
    fcos = get_preset("fcos_r50")
    assert (fcos.regression, fcos.assigner, fcos.center_sampling) == ("point", "spatial_scale", False)
    assert get_preset("atss_fcos_r50").regression == "point" and get_preset("atss_fcos_r50").assigner == "atss"
    assert get_preset("tiny") == get_preset("atss_tiny")
    tiny = get_preset("tiny")
    assert tiny.backbone == "resnet18" and tiny.head_channels <= 64 and tiny.num_convs <= 2
    assert get_preset("fcos_tiny", center_sampling=True).center_sampling
    with pytest.raises(ValueError, match="unknown detector preset 'atss_r51'"):
        get_preset("atss_r51")


def test_unknown_fields_are_named():
    with pytest.raises(ValueError, match="topK"):
        get_preset("tiny", topK=5)
    with pytest.raises(ValueError, match="anchor_size"):
        DetectorConfig().replace(anchor_size=4)
    with pytest.raises(ValueError, match="bogus"):
        DetectorConfig.from_dict({"topk": 3, "bogus": 1})


@pytest.mark.parametrize("changes, message", [
    (dict(centerness=True, in_gt_box=False), "centerness=True requires in_gt_box=True"),
    (dict(regression="point", aspect_ratios=(0.5, 1.0, 2.0)), "anchors_per_location=3"),
    (dict(regression="point", in_gt_box=False, centerness=False), "regression='point' requires in_gt_box"),
    (dict(assigner="spatial_scale", scales_per_octave=3), "anchors_per_location == 1"),
    (dict(center_sampling=True), "center_sampling=True"),
    (dict(backbone="resnet152"), "backbone='resnet152'"),
    (dict(assigner="iou"), "assigner='iou'"),
    (dict(reg_loss="l1"), "reg_loss='l1'"),
    (dict(dcn_stages=(2, 3)), "dcn_stages"),
    (dict(dcn_stages=(3,), frozen_stages=3), "overlap frozen_stages"),
    (dict(iou_pos_thr=0.3, iou_neg_thr=0.4), "iou_neg_thr"),
    (dict(head_channels=48), "gn_groups"),
    (dict(topk=0), "topk=0"),
    (dict(aspect_ratios=()), "aspect_ratios"),
    (dict(num_convs=0, dcn_in_tower=True), "dcn_in_tower"),
])
def test_impossible_configurations_are_clear_errors(changes, message):
    with pytest.raises(ValueError, match=message.replace("(", r"\(").replace(")", r"\)")):
        DetectorConfig().replace(**changes)


def test_table1_switches_work_one_at_a_time():
    baseline = DetectorConfig().replace(assigner="max_iou", group_norm=False, reg_loss="smooth_l1", in_gt_box=False,
                                        centerness=False, scalar=False)
    for switch in (dict(group_norm=True), dict(reg_loss="giou"), dict(in_gt_box=True), dict(scalar=True),
                   dict(in_gt_box=True, centerness=True), dict(regression="point", in_gt_box=True)):
        assert baseline.replace(**switch)
    with pytest.raises(ValueError, match="centerness"):
        baseline.replace(centerness=True)


def test_replace_and_round_trip():
    cfg = get_preset("retinanet_tiny").replace(topk=5, aspect_ratios=[0.25, 1.0])
    assert cfg.topk == 5 and cfg.aspect_ratios == (0.25, 1.0) and cfg.anchors_per_location == 6
    with pytest.raises(dataclasses.FrozenInstanceError):
        cfg.topk = 7
    back = DetectorConfig.from_dict(json.loads(json.dumps(cfg.to_dict())))
    assert back == cfg and isinstance(back.aspect_ratios, tuple)
    flat = cfg.to_dict()
    assert all(isinstance(v, (str, int, float, bool, tuple)) for v in flat.values())
