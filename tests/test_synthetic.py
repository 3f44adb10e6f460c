"""The synthetic COCO-format generator: deterministic, pycocotools-loadable, realistic sizes."""
from __future__ import annotations

import contextlib
import io
import json
import subprocess
import sys
import threading
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from pycocotools.coco import COCO
from pycocotools.cocoeval import COCOeval

from pipeline.data import DataConfig, build_dataset, get_resize_size
from pipeline.synthetic import SyntheticSpec, ensure_synthetic, generate_split, render_image

REPO = Path(__file__).resolve().parents[1]
SPEC = SyntheticSpec(num_train=60, num_val=0, image_size=(128, 256), num_classes=5, seed=11)


@pytest.fixture(scope="module")
def train_root(tmp_path_factory):
    root = tmp_path_factory.mktemp("syn")
    generate_split(SPEC, "train", root)
    return root


def test_deterministic_by_seed(train_root, tmp_path):
    generate_split(SPEC, "train", tmp_path / "again", workers=2)  # other worker count, same output
    a = (train_root / "annotations/instances_train2017.json").read_bytes()
    assert a == (tmp_path / "again/annotations/instances_train2017.json").read_bytes()
    for name in ("000000000001.jpg", "000000000042.jpg"):
        assert (train_root / "train2017" / name).read_bytes() == (tmp_path / "again/train2017" / name).read_bytes()
    img_a, anns_a = render_image(SPEC, "train", 5)
    img_b, anns_b = render_image(SyntheticSpec(**{**SPEC.__dict__, "seed": 12}), "train", 5)
    assert anns_a != anns_b or np.asarray(img_a).shape != np.asarray(img_b).shape or \
        not np.array_equal(np.asarray(img_a), np.asarray(img_b))


def test_loads_with_pycocotools_and_is_self_consistent(train_root):
    ann_file = str(train_root / "annotations/instances_train2017.json")
    with contextlib.redirect_stdout(io.StringIO()):
        gt = COCO(ann_file)
        assert len(gt.getImgIds()) == 60 and sorted(gt.getCatIds()) == [1, 2, 4, 5, 8]
        # Ground truth scored as detections must give AP 1: boxes, areas and ids are consistent.
        dets = [{"image_id": a["image_id"], "category_id": a["category_id"], "bbox": a["bbox"], "score": 1.0}
                for a in gt.dataset["annotations"] if not a["iscrowd"]]
        ev = COCOeval(gt, gt.loadRes(dets), "bbox")
        ev.evaluate(), ev.accumulate(), ev.summarize()
    assert ev.stats[0] == pytest.approx(1.0)
    for img in gt.loadImgs(gt.getImgIds()[:5]):
        with Image.open(train_root / "train2017" / img["file_name"]) as im:
            assert (im.height, im.width) == (img["height"], img["width"]) and im.mode == "RGB"


def test_realistic_content(train_root):
    data = json.loads((train_root / "annotations/instances_train2017.json").read_text())
    anns = [a for a in data["annotations"] if not a["iscrowd"]]
    crowd = [a for a in data["annotations"] if a["iscrowd"]]
    per_image = np.bincount([a["image_id"] for a in anns], minlength=61)[1:]
    assert crowd, "some iscrowd regions"
    assert per_image.max() >= 12, "some crowded images"
    assert {a["category_id"] for a in anns} == {1, 2, 4, 5, 8}
    sides = np.array([min(a["bbox"][2:]) for a in anns])
    assert sides.min() <= 10 and np.sqrt([a["bbox"][2] * a["bbox"][3] for a in anns]).max() >= 100
    # Occlusion: some objects show clearly fewer pixels than their full outline (segmentation) holds.
    def outline_area(a):
        x, y = np.asarray(a["segmentation"][0]).reshape(-1, 2).T
        return 0.5 * abs(np.dot(x, np.roll(y, 1)) - np.dot(y, np.roll(x, 1)))

    visible = np.array([a["area"] / outline_area(a) for a in anns if outline_area(a) > 100])
    assert (visible < 0.8).sum() >= 3 and np.median(visible) > 0.85


def test_sizes_cover_every_fpn_level(train_root):
    """At the paper's input size each of P3..P7 gets objects (anchor sizes 8 * stride = 64..1024)."""
    data = json.loads((train_root / "annotations/instances_train2017.json").read_text())
    imgs = {im["id"]: im for im in data["images"]}
    levels = []
    for a in data["annotations"]:
        if a["iscrowd"]:
            continue
        im = imgs[a["image_id"]]
        *_, scale = get_resize_size(im["height"], im["width"], 800, 1333)
        side = np.sqrt(a["bbox"][2] * a["bbox"][3]) * scale
        levels.append(int(np.clip(np.round(np.log2(side / 64)), 0, 4)))
    counts = np.bincount(levels, minlength=5)
    assert (counts >= 0.01 * len(levels)).all() and counts[4] >= 3, counts


def test_ensure_synthetic_cache_is_reused_and_race_safe(tmp_path):
    spec = SyntheticSpec(num_train=6, num_val=2, image_size=(64, 96))
    roots, errors = [], []

    def worker():
        try:
            roots.append(ensure_synthetic(spec, tmp_path))
        except Exception as e:  # surfaced below
            errors.append(e)

    threads = [threading.Thread(target=worker) for _ in range(3)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors and len(set(roots)) == 1
    root = roots[0]
    assert sorted(p.name for p in tmp_path.iterdir()) == [root.name]  # no temp dirs left behind
    stamp = (root / ".complete").stat().st_mtime_ns
    assert ensure_synthetic(spec, tmp_path) == root and (root / ".complete").stat().st_mtime_ns == stamp
    other = ensure_synthetic(SyntheticSpec(num_train=6, num_val=2, image_size=(64, 96), seed=1), tmp_path)
    assert other != root


def test_synthetic_source_in_data_config(tmp_path):
    cfg = DataConfig.tiny(cache_dir=str(tmp_path), synthetic_train_images=8, synthetic_val_images=4,
                          synthetic_image_size=(64, 96))
    train, val = build_dataset(cfg, "train", True), build_dataset(cfg, "val", False)
    assert len(val) == 4 and 0 < len(train) <= 8
    assert train.category_map == val.category_map and val.category_map.num_classes == 5
    assert not set(train.image_ids) & set(val.image_ids)


def test_make_synthetic_job(tmp_path):
    cmd = [sys.executable, str(REPO / "jobs/make_synthetic.py"), "--out", str(tmp_path / "s"),
           "--train-images", "5", "--val-images", "3", "--min-size", "64", "--max-size", "80"]
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    assert json.loads(r.stdout)["val"]["images"] == 3
    assert len(list((tmp_path / "s/train2017").glob("*.jpg"))) == 5
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
    assert r.returncode != 0 and "--force" in r.stderr  # never silently overwrites
