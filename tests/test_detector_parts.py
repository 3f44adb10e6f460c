"""Anchors, box coders, backbones (weights, freezing, DCN) and the inference contract."""
from __future__ import annotations

import math

import pytest
import torch
import torchvision
from torchvision.ops import FrozenBatchNorm2d

from detector import build_detector, get_preset
from detector.anchors import AnchorGenerator, cell_anchors
from detector.backbone import ModulatedDeformConv2d, ResNetBody
from detector.box_coder import DeltaBoxCoder, PointCoder


# ------------------------------------------------------------------------------------------ anchors
def test_anchor_centres_sizes_and_order():
    gen = AnchorGenerator((8, 16, 32, 64, 128), 8.0, 1, (1.0,))
    a = gen([(2, 3), (1, 2), (1, 1), (1, 1), (1, 1)], torch.device("cpu"))
    assert a.num_per_level == [6, 2, 1, 1, 1]
    # P3: row-major (row, col), centres at (col + 0.5) * 8, side 64.
    assert a.centers[:6].tolist() == [[4, 4], [12, 4], [20, 4], [4, 12], [12, 12], [20, 12]]
    assert a.anchors[0].tolist() == [-28, -28, 36, 36]
    assert a.anchors[6].tolist() == [8 - 64, 8 - 64, 8 + 64, 8 + 64]
    assert a.strides.tolist() == [8] * 6 + [16] * 2 + [32, 64, 128]
    assert a.levels.tolist() == [0] * 6 + [1] * 2 + [2, 3, 4]


# The official rule (maskrcnn-benchmark generate_anchors), worked out by hand per stride s and ratio
# r = h/w: on the s x s base box, w0 = round(sqrt(s*s / r)), h0 = round(w0 * r), rounding half to
# even (np.round); the anchor is then (w0, h0) x scale. Base boxes (w0, h0):
#   r = 1/4: (2s, s/2), exact.            r = 4: (s/2, 2s), exact.
#   r = 1/2: s=8: sqrt(128)=11.31->11, 5.5->6;     s=16: 22.63->23, 11.5->12;
#            s=32: 45.25->45, 22.5->22 (half to even); s=64: 90.51->91, 45.5->46;
#            s=128: 181.02->181, 90.5->90 (half to even).
#   r = 2:   s=8: 5.66->6, 12;  s=16: 11.31->11, 22;  s=32: 22.63->23, 46;  s=64: 45.25->45, 90;
#            s=128: 90.51->91, 182.
_BASE_WH = {
    0.25: {8: (16, 4), 16: (32, 8), 32: (64, 16), 64: (128, 32), 128: (256, 64)},
    0.5: {8: (11, 6), 16: (23, 12), 32: (45, 22), 64: (91, 46), 128: (181, 90)},
    1.0: {8: (8, 8), 16: (16, 16), 32: (32, 32), 64: (64, 64), 128: (128, 128)},
    2.0: {8: (6, 12), 16: (11, 22), 32: (23, 46), 64: (45, 90), 128: (91, 182)},
    4.0: {8: (4, 16), 16: (8, 32), 32: (16, 64), 64: (32, 128), 128: (64, 256)},
}
STRIDES = (8, 16, 32, 64, 128)


def _level_shapes(strides, anchor_scale, scales_per_octave, ratios):
    """Widths/heights [A, 2] of each level's anchors, and a check that they share their location's centre."""
    gen = AnchorGenerator(strides, anchor_scale, scales_per_octave, ratios)
    a = gen([(2, 3)] * len(strides), torch.device("cpu"))
    shapes = []
    for lvl, stride in enumerate(strides):
        boxes = a.anchors[a.levels == lvl].view(2, 3, -1, 4)  # (row, col, anchor type)
        centres = (boxes[..., :2] + boxes[..., 2:]) / 2
        grid = (torch.stack(torch.meshgrid(torch.arange(2.0), torch.arange(3.0), indexing="ij")[::-1], -1)
                + 0.5) * stride
        assert torch.equal(centres, grid[:, :, None, :].expand_as(centres))  # exact, every shape
        shapes.append(boxes[0, 0, :, 2:] - boxes[0, 0, :, :2])
    return shapes


@pytest.mark.parametrize("ratio", [0.25, 0.5, 1.0, 2.0, 4.0])
def test_table6_anchor_shapes_are_the_official_ones(ratio):
    # Table 6: one anchor per location, scale 8S, h/w = ratio; sizes are whole pixels, so exact.
    shapes = _level_shapes(STRIDES, 8.0, 1, (ratio,))
    for stride, wh in zip(STRIDES, shapes):
        w0, h0 = _BASE_WH[ratio][stride]
        assert wh.tolist() == [[w0 * 8, h0 * 8]], (ratio, stride)
    if ratio == 2.0:
        assert shapes[0].tolist() == [[48, 96]]  # not 45.25 x 90.5 (the example)


@pytest.mark.parametrize("scales_per_octave, anchor_scale, ratios", [
    (3, 4.0, (0.5, 1.0, 2.0)),  # RetinaNet #A=9 rows
    (3, 4.0, (1.0,)),
    (1, 8.0, (0.5, 1.0, 2.0)),
    (1, 8.0, (1.0,)),
])
def test_table7_anchor_shapes_are_the_official_ones(scales_per_octave, anchor_scale, ratios):
    shapes = _level_shapes(STRIDES, anchor_scale, scales_per_octave, ratios)
    for stride, wh in zip(STRIDES, shapes):
        # Official order: ratio outer, scale inner; scale = anchor_scale * 2 ** (i / #sc).
        expected = torch.tensor([[_BASE_WH[r][stride][0] * anchor_scale * 2 ** (i / scales_per_octave),
                                  _BASE_WH[r][stride][1] * anchor_scale * 2 ** (i / scales_per_octave)]
                                 for r in ratios for i in range(scales_per_octave)], dtype=torch.float64)
        # Whole-pixel sizes are exact; the 2 ** (1/3) steps are held to 1/256 px per half-side.
        assert (wh.double() - expected).abs().max() <= 1 / 256, (stride, wh, expected)
        whole = expected == expected.round()
        assert torch.equal(wh.double()[whole], expected[whole])
    if scales_per_octave == 3 and len(ratios) == 3:
        assert shapes[0][0].tolist() == [44, 24]  # RetinaNet #A=9, ratio 0.5 at P3 (the example)


def test_tiny_presets_keep_their_square_anchors():
    for stride in STRIDES:
        half = 4.0 * stride
        assert cell_anchors(stride, 8.0, 1, (1.0,)).tolist() == [[-half, -half, half, half]]


# ------------------------------------------------------------------------------------------ coders
def test_delta_coder_round_trip_and_clamp():
    coder = DeltaBoxCoder()
    anchors = torch.tensor([[0.0, 0, 64, 64], [100, 50, 228, 178]])
    boxes = torch.tensor([[5.0, 10, 40, 70], [90, 60, 300, 160]])
    deltas = coder.encode(boxes, anchors)
    assert torch.allclose(coder.decode(deltas, anchors), boxes, atol=1e-4)
    assert deltas[0, 0].item() == pytest.approx(10 * (22.5 - 32) / 64)
    assert deltas[0, 2].item() == pytest.approx(5 * math.log(35 / 64))
    huge = coder.decode(torch.tensor([[0.0, 0, 100, -10]]), anchors[:1])
    assert (huge[0, 2] - huge[0, 0]).item() == pytest.approx(64 * 1000 / 16, rel=1e-4)  # clamped above
    assert (huge[0, 3] - huge[0, 1]).item() == pytest.approx(64 * math.exp(-2), rel=1e-4)  # not clamped below


def test_point_coder_is_stride_normalised():
    coder = PointCoder()
    points = torch.tensor([[12.0, 20.0]])
    box = torch.tensor([[4.0, 4, 44, 28]])
    d = coder.encode(box, points, torch.tensor([8.0]))
    assert d.tolist() == [[1.0, 2.0, 4.0, 1.0]]
    assert coder.decode(d, points, torch.tensor([8.0])).tolist() == box.tolist()


# ------------------------------------------------------------------------------------------ backbones
@pytest.mark.parametrize("name", ["resnet34", "resnet101", "resnext101_32x8d", "resnext101_64x4d"])
def test_backbones_build_and_run(name):
    body = ResNetBody(name, frozen_bn=True, frozen_stages=2)
    c3, c4, c5 = body(torch.randn(1, 3, 64, 64))
    assert [c3.shape[1], c4.shape[1], c5.shape[1]] == list(body.out_channels)
    assert (c3.shape[-1], c4.shape[-1], c5.shape[-1]) == (8, 4, 2)


def test_frozen_stages_and_frozen_bn():
    body = ResNetBody("resnet18", frozen_bn=True, frozen_stages=2)
    assert not any(p.requires_grad for p in body.stem.parameters())
    assert not any(p.requires_grad for p in body.layer1.parameters())
    assert all(p.requires_grad for p in body.layer2.parameters())
    assert isinstance(body.stem[1], FrozenBatchNorm2d)
    assert not any(isinstance(m, torch.nn.BatchNorm2d) for m in body.modules())


def test_deformable_convs_in_backbone_and_tower():
    torch.manual_seed(0)
    model = build_detector(get_preset("tiny", num_classes=2, dcn_stages=(3, 4, 5), dcn_in_tower=True)).train()
    body = model.backbone.body
    for layer in (body.layer2, body.layer3, body.layer4):
        assert all(isinstance(block.conv2, ModulatedDeformConv2d) for block in layer)
    assert not any(isinstance(m, ModulatedDeformConv2d) for m in body.layer1.modules())
    assert isinstance(model.head.cls_tower[-3], ModulatedDeformConv2d)  # conv, GN, ReLU
    assert isinstance(model.head.box_tower[-3], ModulatedDeformConv2d)
    targets = [{"boxes": torch.tensor([[8.0, 8, 50, 40]]), "labels": torch.tensor([1])}]
    losses = model(torch.randn(1, 3, 64, 64), targets)
    sum(losses.values()).backward()
    offsets = body.layer3[0].conv2.offset_mask
    assert offsets.weight.grad is not None and offsets.weight.grad.abs().sum() > 0


def test_dcn_with_zero_offsets_is_the_regular_conv_times_half():
    conv = torch.nn.Conv2d(4, 6, 3, stride=2, padding=1, bias=False)
    dcn = ModulatedDeformConv2d.from_conv(conv)
    assert torch.equal(dcn.weight, conv.weight)
    torch.nn.init.zeros_(dcn.offset_mask.weight)
    x = torch.randn(2, 4, 9, 9)
    assert torch.allclose(dcn(x), conv(x) * 0.5, atol=1e-5)  # zero offsets, masks sigmoid(0)


def _uniform_bound_holds(weight, bound):
    """Values within +-bound and spread over it like U(-bound, bound) (std bound / sqrt(3))."""
    std = weight.std().item()
    return weight.abs().max().item() <= bound and abs(std - bound / math.sqrt(3)) < 0.1 * bound


def test_dcn_initialisation_is_the_official_one():
    torch.manual_seed(0)
    model = build_detector(get_preset("tiny", num_classes=2, dcn_stages=(3, 4, 5), dcn_in_tower=True))
    for tower in (model.head.cls_tower, model.head.box_tower):
        dcn = tower[-3]
        # Deformable weights: the official ModulatedDeformConv's U(+-1/sqrt(in_channels * 3 * 3)), bias 0.
        assert _uniform_bound_holds(dcn.weight, 1 / math.sqrt(dcn.weight.shape[1] * 9))
        assert dcn.bias.abs().sum() == 0
        # Offset conv: an nn.Conv2d in the official head, so re-initialised N(0, 0.01) with it.
        assert abs(dcn.offset_mask.weight.std().item() - 0.01) < 0.001
        assert dcn.offset_mask.bias.abs().sum() == 0
    # Backbone offset convs: the official DFConv2d's kaiming_uniform(a=1) = U(+-sqrt(3 / fan_in)), bias 0,
    # so the starting offsets are not zero.
    body = model.backbone.body
    for block in list(body.layer2) + list(body.layer3) + list(body.layer4):
        offsets = block.conv2.offset_mask
        fan_in = offsets.weight[0].numel()
        assert _uniform_bound_holds(offsets.weight, math.sqrt(3 / fan_in))
        assert offsets.bias.abs().sum() == 0
    x = torch.randn(1, body.layer3[0].conv2.offset_mask.in_channels, 8, 8)
    assert body.layer3[0].conv2.offset_mask(x)[:, :18].abs().max() > 0


def test_pretrained_weights_load_from_a_local_file(tmp_path):
    reference = torchvision.models.resnet18(weights=None)
    path = tmp_path / "resnet18.pth"
    torch.save(reference.state_dict(), path)
    body = ResNetBody("resnet18", pretrained_path=str(path))
    assert torch.equal(body.layer3[0].conv1.weight, reference.layer3[0].conv1.weight)
    assert torch.equal(body.stem[1].running_var, reference.bn1.running_var)
    model = build_detector(get_preset("tiny", pretrained_path=str(path)))
    assert torch.equal(model.backbone.body.layer4[1].conv2.weight, reference.layer4[1].conv2.weight)


def test_pretrained_path_errors_are_clear(tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        ResNetBody("resnet18", pretrained_path=str(tmp_path / "missing.pth"))
    wrong = tmp_path / "resnet34.pth"
    torch.save(torchvision.models.resnet34(weights=None).state_dict(), wrong)
    with pytest.raises(ValueError, match="does not fit backbone 'resnet18'"):
        ResNetBody("resnet18", pretrained_path=str(wrong))
    junk = tmp_path / "junk.pth"
    junk.write_bytes(b"not a checkpoint")
    with pytest.raises(ValueError, match="not a readable torch state_dict"):
        ResNetBody("resnet18", pretrained_path=str(junk))


# ------------------------------------------------------------------------------------------ inference
def _eval_model(**overrides):
    torch.manual_seed(0)
    return build_detector(get_preset("tiny", num_classes=4, score_thresh=0.0, **overrides)).eval()


def test_eval_rescales_to_original_sizes_and_clips_to_the_valid_region():
    model = _eval_model(detections_per_img=50)
    images = torch.randn(2, 3, 64, 96)
    with torch.no_grad():
        plain = model(images, image_sizes=[(64, 96), (50, 70)])
        scaled = model(images, image_sizes=[(64, 96), (50, 70)], original_sizes=[(128, 192), (100, 140)])
    for det, (h, w) in zip(plain, [(64, 96), (50, 70)]):
        assert det["boxes"].shape == (50, 4) and det["scores"].shape == (50,)
        assert (det["boxes"][:, 0::2] <= w).all() and (det["boxes"][:, 1::2] <= h).all()
        assert (det["boxes"] >= 0).all() and (det["scores"][:-1] >= det["scores"][1:]).all()
    for a, b in zip(plain, scaled):
        assert torch.allclose(a["boxes"] * 2, b["boxes"], atol=1e-4)
        assert torch.equal(a["labels"], b["labels"]) and torch.equal(a["scores"], b["scores"])


def test_list_of_images_is_padded_by_the_model():
    model = _eval_model()
    small, big = torch.randn(3, 40, 50), torch.randn(3, 64, 70)
    padded = torch.zeros(2, 3, 64, 96)
    padded[0, :, :40, :50] = small
    padded[1, :, :64, :70] = big
    with torch.no_grad():
        from_list = model([small, big])
        from_tensor = model(padded, image_sizes=[(40, 50), (64, 70)])
    for a, b in zip(from_list, from_tensor):
        assert torch.allclose(a["boxes"], b["boxes"], atol=1e-4) and torch.equal(a["labels"], b["labels"])


def test_score_is_sqrt_of_class_times_centerness_and_nms_is_per_class():
    model = _eval_model(detections_per_img=1000, pre_nms_top_n=5)
    with torch.no_grad():
        det = model(torch.randn(1, 3, 64, 64))[0]
    # pre_nms_top_n is per level: at most 5 candidates from each of the 5 levels.
    assert det["boxes"].shape[0] <= 25
    no_ctr = _eval_model(centerness=False, detections_per_img=1000, pre_nms_top_n=5)
    with torch.no_grad():
        det2 = no_ctr(torch.randn(1, 3, 64, 64))[0]
    assert (det2["scores"] < 0.02).all()  # raw class probabilities near the 0.01 prior


def test_bad_inputs_are_clear_errors():
    model = build_detector(get_preset("tiny", num_classes=3)).train()
    images = torch.randn(1, 3, 64, 64)
    with pytest.raises(ValueError, match="needs targets"):
        model(images)
    with pytest.raises(ValueError, match=r"target 0 'boxes'\[1\].*degenerate"):
        model(images, [{"boxes": torch.tensor([[0.0, 0, 10, 10], [5.0, 5, 5, 9]]), "labels": torch.tensor([1, 2])}])
    with pytest.raises(ValueError, match=r"'labels' must be in 1..3"):
        model(images, [{"boxes": torch.tensor([[0.0, 0, 10, 10]]), "labels": torch.tensor([4])}])
    with pytest.raises(ValueError, match="1 boxes but 2 labels"):
        model(images, [{"boxes": torch.tensor([[0.0, 0, 10, 10]]), "labels": torch.tensor([1, 2])}])
    with pytest.raises(ValueError, match="\\[B, 3, H, W\\]"):
        model(torch.randn(3, 64, 64), [])
