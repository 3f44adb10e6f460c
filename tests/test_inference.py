"""Running a model: predict (original pixels, fp32 whatever the caller's autocast), COCO results
conversion, and the TTA loop on a tiny real detector."""
from __future__ import annotations

import json
import math

import pytest
import torch

from pipeline.evaluation import write_results_json
from pipeline.inference import predict, predict_tta, to_coco_results, tta_detect
from pipeline.tta import TTAConfig, TTAPass


def test_to_coco_results_converts_boxes_labels_and_drops_degenerate(tmp_path):
    outputs = [{"image_id": 12,
                "boxes": torch.tensor([[10.0, 20.0, 40.0, 80.0], [5.0, 5.0, 5.0, 9.0]]),
                "scores": torch.tensor([0.8, 0.7]), "labels": torch.tensor([2, 1])}]
    res = to_coco_results(outputs, category_map=[3, 7])  # label 1 -> COCO 3, label 2 -> COCO 7
    assert res == [{"image_id": 12, "category_id": 7, "bbox": [10.0, 20.0, 30.0, 60.0],
                    "score": pytest.approx(0.8)}]
    targets = [{"image_id": 11}]
    assert to_coco_results(outputs, targets, {1: 3, 2: 7})[0]["image_id"] == 11
    with pytest.raises(ValueError, match=r"label\(s\) \[3\]"):
        to_coco_results([dict(outputs[0], labels=torch.tensor([3, 1]))], category_map=[3, 7])
    path = write_results_json(res, tmp_path / "sub" / "dets.json")
    assert json.loads(path.read_text()) == [dict(res[0], score=pytest.approx(0.8))]
    assert not list(path.parent.glob("*.tmp"))


def test_predict_returns_original_pixels_and_restores_the_mode():
    from detector import build_detector, get_preset
    from pipeline.data import DetectionTransform, collate

    torch.manual_seed(0)
    model = build_detector(get_preset("tiny", num_classes=2, score_thresh=0.005)).train()
    g = torch.Generator().manual_seed(0)
    batch = []
    for image_id, (h0, w0) in ((5, (300, 420)), (6, (380, 260))):
        img = torch.randint(0, 256, (3, h0, w0), dtype=torch.uint8, generator=g)
        batch.append(DetectionTransform(96, 160)(img, {"boxes": torch.zeros(0, 4), "crowd_boxes": torch.zeros(0, 4),
                                                      "image_id": image_id, "orig_size": (h0, w0)}, None))
    out = predict(model, [collate(batch)], category_map=[3, 7])
    assert model.training, "predict must give the model back in the mode it found it"
    assert [o["image_id"] for o in out] == [5, 6]
    for o, (h0, w0), (_, t) in zip(out, ((300, 420), (380, 260)), batch):
        b = o["boxes"]
        assert len(b) > 0 and b.dtype == torch.float32
        assert (b[:, 2] <= w0).all() and (b[:, 3] <= h0).all() and (b >= 0).all()
        assert b[:, 2].max() > t["image_size"][1] or b[:, 3].max() > t["image_size"][0]  # not input pixels
        assert set(o["category_ids"].tolist()) <= {3, 7}
        assert torch.equal(o["category_ids"], torch.tensor([3, 7])[o["labels"] - 1])


# ------------------------------------------------------------------------------------------------
# TTA on a tiny real detector
# ------------------------------------------------------------------------------------------------
_TINY_TTA = dict(test_min_size=64, test_max_size=256, scales=(32, 96), max_size=256,
                 scale_ranges=((16, math.inf), (0, 48)))


@pytest.fixture(scope="module")
def tiny_model():
    from detector import build_detector, get_preset

    torch.manual_seed(0)
    # untrained: the classifier starts at p = 0.01, so a low threshold gives boxes to check
    return build_detector(get_preset("tiny", score_thresh=0.005)).eval()


def test_tta_runs_every_scale_and_flip(tiny_model):

    cfg = TTAConfig(**_TINY_TTA, max_per_image=150)
    seen = []
    hook = tiny_model.backbone.register_forward_pre_hook(lambda m, args: seen.append(tuple(args[0].shape)))
    g = torch.Generator().manual_seed(1)
    images = [torch.randint(0, 256, (3, 64, 128), dtype=torch.uint8, generator=g),
              torch.randint(0, 256, (3, 100, 60), dtype=torch.uint8, generator=g)]
    try:
        merged, passes = tta_detect(tiny_model, images, cfg, return_passes=True)
    finally:
        hook.remove()
    # one forward per scale, the image and its mirror batched together (2 images x 2)
    assert len(seen) == 3 and all(s[0] == 4 for s in seen)
    assert [s[-2:] for s in seen] == [(128, 128), (64, 64), (160, 192)]  # padded to /32
    for per_image, (h0, w0) in zip(passes, [(64, 128), (100, 60)]):
        assert [(p.min_size, p.hflip) for p, _, _ in per_image] == \
               [(64, False), (64, True), (32, False), (32, True), (96, False), (96, True)]
        assert sum(len(out["scores"]) for _, _, out in per_image) > 0
        for p, (h, w), out in per_image:
            assert min(h, w) == p.min_size
            b = out["boxes"]
            assert ((b >= 0).all() and (b[:, 2] <= w0).all() and (b[:, 3] <= h0).all())
            # area ranges hold in the pass's own pixels: (16, inf) at 32 px, (0, 48) at 96 px
            area = ((b[:, 2:] - b[:, :2]) * torch.tensor([w / w0, h / h0])).prod(1)
            if p.min_size == 32:
                assert (area > 16 ** 2).all()
            if p.min_size == 96:
                assert (area < 48 ** 2).all()
    # the filter did remove boxes: the same pass unfiltered keeps more
    unfiltered = tta_detect(tiny_model, images[:1], cfg, passes=[TTAPass(96, 256, False, None)],
                            return_passes=True)[1][0][0][2]
    filtered = passes[0][4][2]
    assert len(filtered["scores"]) < len(unfiltered["scores"])
    for det in merged:
        assert 0 < len(det["scores"]) <= 150
        assert torch.all(det["scores"][:-1] >= det["scores"][1:])
        assert det["labels"].min() >= 1


def test_tta_flip_pass_mirrors_the_identity_pass(tiny_model):
    """Running TTA on a mirrored image, its flip pass sees the original image: after mapping
    back it must give the identity pass's boxes of the original, mirrored."""
    from pipeline.data import hflip_boxes

    cfg = TTAConfig(**_TINY_TTA)
    img = torch.randint(0, 256, (3, 64, 128), dtype=torch.uint8, generator=torch.Generator().manual_seed(2))
    _, [plain] = tta_detect(tiny_model, [img], cfg, return_passes=True)
    _, [mirrored] = tta_detect(tiny_model, [img.flip(-1)], cfg, return_passes=True)
    for (p, _, a), (q, _, b) in zip(plain[0::2], mirrored[1::2]):
        assert (p.min_size, p.hflip, q.min_size, q.hflip) == (p.min_size, False, p.min_size, True)
        assert len(a["scores"]) == len(b["scores"]) > 0
        torch.testing.assert_close(b["scores"], a["scores"], rtol=1e-4, atol=1e-5)
        torch.testing.assert_close(b["boxes"], hflip_boxes(a["boxes"], 128), rtol=1e-4, atol=1e-3)
        assert torch.equal(b["labels"], a["labels"])


def test_identity_pass_equals_plain_single_scale_inference(tiny_model):
    """TTA resizes originals itself; its identity pass must match the data pipeline + predict."""
    from pipeline.data import DetectionTransform, collate

    img = torch.randint(0, 256, (3, 90, 140), dtype=torch.uint8, generator=torch.Generator().manual_seed(3))
    image, target = DetectionTransform(64, 256)(img, {"boxes": torch.zeros(0, 4), "crowd_boxes": torch.zeros(0, 4),
                                                      "image_id": 7, "orig_size": (90, 140)}, None)
    [plain] = predict(tiny_model, [collate([(image, target)])])
    _, [[(_, size, identity)]] = tta_detect(tiny_model, [img], TTAConfig(test_min_size=64, test_max_size=256),
                                            passes=[TTAPass(64, 256, False, None)], return_passes=True)
    assert size == target["image_size"] and len(plain["scores"]) > 0
    torch.testing.assert_close(identity["boxes"], plain["boxes"])
    torch.testing.assert_close(identity["scores"], plain["scores"])
    assert torch.equal(identity["labels"], plain["labels"])


def test_prediction_runs_in_fp32_inside_an_autocast_region(tiny_model):
    """A training step under bf16 autocast that evaluates must still get fp32 detections: predict
    and the TTA loop switch autocast off, so the results equal those of a plain fp32 call."""
    from pipeline.data import DetectionTransform, collate

    img = torch.randint(0, 256, (3, 90, 140), dtype=torch.uint8, generator=torch.Generator().manual_seed(4))
    image, target = DetectionTransform(64, 256)(img, {"boxes": torch.zeros(0, 4), "crowd_boxes": torch.zeros(0, 4),
                                                      "image_id": 9, "orig_size": (90, 140)}, None)
    batch = collate([(image, target)])
    cfg = TTAConfig(**_TINY_TTA)
    [plain] = predict(tiny_model, [batch])
    [plain_tta] = tta_detect(tiny_model, [img], cfg)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        [inside] = predict(tiny_model, [batch])
        [inside_tta] = tta_detect(tiny_model, [img], cfg)
        with torch.inference_mode():  # the same forward without the guard does run in bf16
            [raw] = tiny_model(batch[0], image_sizes=[target["image_size"]], original_sizes=[(90, 140)])
    assert len(plain["scores"]) > 0 and len(plain_tta["scores"]) > 0
    for a, b in ((plain, inside), (plain_tta, inside_tta)):
        assert b["boxes"].dtype == b["scores"].dtype == torch.float32
        assert torch.equal(a["boxes"], b["boxes"]) and torch.equal(a["scores"], b["scores"])
        assert torch.equal(a["labels"], b["labels"])
    assert raw["scores"].shape != plain["scores"].shape or not torch.equal(raw["scores"].float(), plain["scores"])


def test_predict_tta_gives_predicts_format_with_category_ids(tiny_model):
    images = [torch.randint(0, 256, (3, 64, 96), dtype=torch.uint8, generator=torch.Generator().manual_seed(5))]
    out = predict_tta(tiny_model, [(images, [{"image_id": 3}])], "cpu", TTAConfig(**_TINY_TTA, merge="vote"),
                      category_map=list(range(11, 91)))  # the tiny preset's 80 classes
    assert [o["image_id"] for o in out] == [3] and len(out[0]["scores"]) > 0
    assert torch.equal(out[0]["category_ids"], out[0]["labels"] + 10)
