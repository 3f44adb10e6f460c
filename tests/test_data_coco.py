"""The COCO dataset on the real COCO 2017 slices in ../shared/data (skipped when absent)."""
from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from pycocotools.coco import COCO

from pipeline.data import (CategoryMap, CocoDetection, DataConfig, DetectionTransform, build_dataset, build_index,
                           collate, read_image)

pytestmark = pytest.mark.coco


@pytest.fixture(scope="module")
def tiny(shared_data):
    return shared_data / "coco_tiny"


@pytest.fixture(scope="module")
def val(tiny):
    return CocoDetection(tiny / "annotations/instances_val2017.json", tiny / "val2017", train=False,
                         transform=DetectionTransform(800, 1333, 0.0))


def _all_targets(ds):
    return [ds.annotations(i) for i in range(len(ds))]


def test_val_counts_match_the_file(val):
    targets = _all_targets(val)
    assert len(val) == 80
    assert sum(len(t["boxes"]) for t in targets) + sum(len(t["crowd_boxes"]) for t in targets) == 815
    assert sum(len(t["crowd_boxes"]) for t in targets) == 11
    assert val.category_map.num_classes == 80


def test_train_counts_and_split_resolution(tiny):
    ds = build_dataset(DataConfig(source=f"coco:{tiny}"), "train", train=True)
    targets = _all_targets(ds)
    assert sum(len(t["boxes"]) + len(t["crowd_boxes"]) for t in targets) == 705
    assert sum(len(t["crowd_boxes"]) for t in targets) == 6
    assert len(ds) == 80  # every image of the slice has a usable box
    assert ds._coco is None and len(ds.coco.anns) == 705  # training drops the json, reloads on demand


def test_labels_round_trip_to_coco_ids(val, tiny):
    coco = COCO(str(tiny / "annotations/instances_val2017.json"))
    cmap = val.category_map
    assert list(cmap.ids) == sorted(coco.getCatIds()) and max(cmap.ids) == 90
    assert list(cmap.to_labels(cmap.ids)) == list(range(1, 81))
    assert cmap.to_list() == [{"id": c["id"], "name": c["name"]} for c in coco.loadCats(sorted(coco.getCatIds()))]
    assert CategoryMap.from_list(cmap.to_list()) == cmap
    for i in range(0, len(val), 7):
        t = val.annotations(i)
        anns = [a for a in coco.loadAnns(coco.getAnnIds(imgIds=t["image_id"])) if not a["iscrowd"]]
        assert sorted(cmap.to_coco_ids(t["labels"]).tolist()) == sorted(a["category_id"] for a in anns)
        got = sorted(map(tuple, np.round(t["boxes"].numpy(), 2).tolist()))
        want = sorted(tuple(np.round(np.float32([x, y, x + w, y + h]), 2).tolist())
                      for x, y, w, h in (a["bbox"] for a in anns))
        assert got == want


def test_image_ids_preserved(val, tiny):
    data = json.loads((tiny / "annotations/instances_val2017.json").read_text())
    assert val.image_ids.tolist() == [im["id"] for im in data["images"]]
    assert [val[i][1]["image_id"] for i in (0, 5)] == [data["images"][0]["id"], data["images"][5]["id"]]


def test_flip_and_resize_land_boxes_on_the_right_pixels(tiny):
    ds = CocoDetection(tiny / "annotations/instances_val2017.json", tiny / "val2017", train=True,
                       transform=DetectionTransform((320, 400), 640, flip_prob=0.5))
    idx = 3
    big = read_image(ds.image_path(idx)).float()
    seen = set()
    for seed in range(40):
        image, t = ds[(idx, seed)]
        h0, w0 = t["orig_size"]
        h, w = t["image_size"]
        assert 320 <= min(h, w) <= 400 and max(h, w) <= 640
        assert image.shape == (3, h, w)
        orig = ds.annotations(idx)["boxes"]
        sx, sy = w / w0, h / h0
        want = orig * torch.tensor([sx, sy, sx, sy])
        if t["flipped"]:
            want = torch.stack([w - want[:, 2], want[:, 1], w - want[:, 0], want[:, 3]], 1)
        torch.testing.assert_close(t["boxes"], want)
        if t["flipped"] not in seen:
            seen.add(t["flipped"])
            # The pixels inside each big box match the original pixels there (mean colour).
            assert image.dtype == torch.uint8
            img = image.float()
            checked = 0
            for b, o in zip(t["boxes"], orig):
                if (o[2] - o[0]) * (o[3] - o[1]) < 60 * 60:
                    continue
                # Crop the box from the transformed image, bring it back to the original crop's
                # size and orientation: it must show the same pixels as the original crop.
                x1, y1, x2, y2 = b.round().int().tolist()
                ox1, oy1, ox2, oy2 = o.round().int().tolist()
                crop = img[:, y1:y2, x1:x2]
                back = torch.nn.functional.interpolate(crop[None], size=(oy2 - oy1, ox2 - ox1),
                                                       mode="bilinear", antialias=True)[0]
                if t["flipped"]:
                    back = back.flip(-1)
                err = (back - big[:, oy1:oy2, ox1:ox2]).abs().mean()
                assert err < 12, (seed, t["flipped"], float(err))
                # Sanity of the check itself: the un-mirrored crop of a flipped image differs.
                if t["flipped"]:
                    assert (back.flip(-1) - big[:, oy1:oy2, ox1:ox2]).abs().mean() > 3 * err
                checked += 1
            assert checked >= 1
    assert seen == {True, False}


def test_collated_batch_shapes(val):
    images, targets = collate([val[0], val[1], val[2]])
    assert images.shape[0] == 3 and images.shape[2] % 32 == 0 and images.shape[3] % 32 == 0
    assert all(min(t["image_size"]) == 800 or max(t["image_size"]) == 1333 for t in targets)


def test_testdev_image_info_without_annotations(shared_data):
    root = shared_data / "coco_testdev_sample"
    ds = CocoDetection(root / "annotations/image_info_test-dev2017.json", root / "test2017", train=False,
                       transform=DetectionTransform(200, 333))
    assert len(ds) == 10 and ds.category_map.num_classes == 80
    image, t = ds[0]
    assert t["boxes"].shape == (0, 4) and t["labels"].shape == (0,) and t["crowd_boxes"].shape == (0, 4)
    assert image.shape[1:] == t["image_size"] and min(t["image_size"]) == 200
    with pytest.raises(Exception, match="no image has a usable"):
        CocoDetection(root / "annotations/image_info_test-dev2017.json", root / "test2017", train=True)


def test_testdev_image_info_through_an_index(shared_data, tmp_path):
    root = shared_data / "coco_testdev_sample"
    idx = tmp_path / "test-dev.parquet"
    build_index(root / "annotations/image_info_test-dev2017.json", idx)
    ds = CocoDetection(idx, root / "test2017", train=False, transform=DetectionTransform(200, 333))
    ref = CocoDetection(root / "annotations/image_info_test-dev2017.json", root / "test2017", train=False,
                        transform=DetectionTransform(200, 333))
    assert ds.image_ids.tolist() == ref.image_ids.tolist() and not ds.table.has_annotations
    assert torch.equal(ds[4][0], ref[4][0]) and ds.category_map == ref.category_map
    assert "annotations" not in ds.coco.dataset and len(ds.coco.imgs) == 10
