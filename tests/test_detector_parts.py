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


def test_nine_anchor_shapes_keep_area_and_ratio():
    cell = cell_anchors(8, 4.0, 3, (0.5, 1.0, 2.0))
    w, h = cell[:, 2] - cell[:, 0], cell[:, 3] - cell[:, 1]
    sizes = torch.tensor([32 * 2 ** (i / 3) for i in range(3)] * 3)
    assert torch.allclose((w * h).sqrt(), sizes, rtol=2e-3)
    assert torch.allclose(h / w, torch.tensor([0.5] * 3 + [1.0] * 3 + [2.0] * 3), rtol=3e-3)
    assert torch.equal((cell[:, :2] + cell[:, 2:]) / 2, torch.zeros(9, 2))  # exact midpoints


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
    assert model.head.box_tower[-3].offset_mask.weight.abs().sum() == 0  # offsets start at zero
    targets = [{"boxes": torch.tensor([[8.0, 8, 50, 40]]), "labels": torch.tensor([1])}]
    losses = model(torch.randn(1, 3, 64, 64), targets)
    sum(losses.values()).backward()
    offsets = body.layer3[0].conv2.offset_mask
    assert offsets.weight.grad is not None and offsets.weight.grad.abs().sum() > 0


def test_dcn_starts_as_the_regular_conv_times_half():
    conv = torch.nn.Conv2d(4, 6, 3, stride=2, padding=1, bias=False)
    dcn = ModulatedDeformConv2d.from_conv(conv)
    x = torch.randn(2, 4, 9, 9)
    assert torch.allclose(dcn(x), conv(x) * 0.5, atol=1e-5)  # zero offsets, masks sigmoid(0)


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
    with pytest.raises(ValueError, match="float\\[B, 3, H, W\\]"):
        model(torch.randn(3, 64, 64), [])
