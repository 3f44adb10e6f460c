"""The Parquet annotation index yields exactly the samples of the json path."""
from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch

from pipeline.data import CocoDetection, DataConfig, DetectionTransform, build_dataset, build_index, read_index
from pipeline.data.annotations import load_coco_json
from pipeline.synthetic import SyntheticSpec, generate_split

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def synth(tmp_path_factory):
    root = tmp_path_factory.mktemp("synidx")
    generate_split(SyntheticSpec(num_train=30, num_val=0, image_size=(64, 112), seed=3), "train", root)
    return root


def _assert_same_samples(a: CocoDetection, b: CocoDetection, keys):
    assert len(a) == len(b)
    assert a.category_map == b.category_map
    assert np.array_equal(a.image_ids, b.image_ids)
    for key in keys:
        (ia, ta), (ib, tb) = a[key], b[key]
        assert torch.equal(ia, ib)
        assert ta.keys() == tb.keys()
        for k in ta:
            if isinstance(ta[k], torch.Tensor):
                assert ta[k].dtype == tb[k].dtype and torch.equal(ta[k], tb[k]), k
            else:
                assert ta[k] == tb[k], k


@pytest.mark.parametrize("train, suffix", [(True, ".parquet"), (False, ".parquet"), (True, ".arrow")])
def test_index_matches_json_on_synthetic(synth, tmp_path, train, suffix):
    ann = synth / "annotations/instances_train2017.json"
    idx = tmp_path / f"train{suffix}"
    build_index(ann, idx)
    tf = DetectionTransform((64, 96), 160, 0.5 if train else 0.0)
    a = CocoDetection(ann, synth / "train2017", train=train, transform=tf)
    b = CocoDetection(idx, synth / "train2017", train=train, transform=tf)
    _assert_same_samples(a, b, [(i, 1000 + i) for i in range(len(a))])
    for i in range(len(a)):
        ta, tb = a.annotations(i), b.annotations(i)
        assert all(torch.equal(ta[k], tb[k]) for k in ("boxes", "labels", "crowd_boxes"))


@pytest.mark.coco
def test_index_matches_json_on_coco(shared_data, tmp_path):
    root = shared_data / "coco_tiny"
    ann = root / "annotations/instances_val2017.json"
    idx = tmp_path / "val.parquet"
    build_index(ann, idx)
    tf = DetectionTransform(160, 256, 0.0)
    a = CocoDetection(ann, root / "val2017", train=False, transform=tf)
    b = CocoDetection(idx, root / "val2017", train=False, transform=tf)
    _assert_same_samples(a, b, [0, 17, 79])
    for i in range(len(a)):
        ta, tb = a.annotations(i), b.annotations(i)
        assert all(torch.equal(ta[k], tb[k]) for k in ("boxes", "labels", "crowd_boxes"))
    # The COCO ground truth rebuilt from the index evaluates like the json's (same boxes/areas).
    ca, cb = a.coco, b.coco
    assert sorted(ca.getImgIds()) == sorted(cb.getImgIds()) and len(ca.anns) == len(cb.anns) == 815
    for ann_id in list(ca.anns)[:50]:
        x, y = ca.anns[ann_id], cb.anns[ann_id]
        assert np.allclose(x["bbox"], y["bbox"], atol=1e-3) and abs(x["area"] - y["area"]) < 1e-2 * max(1, x["area"])
        assert (x["category_id"], x["iscrowd"], x["image_id"]) == (y["category_id"], y["iscrowd"], y["image_id"])


@pytest.mark.parametrize("suffix", [".parquet", ".arrow"])
def test_index_file_layout(synth, tmp_path, suffix):
    ann = synth / "annotations/instances_train2017.json"
    idx = tmp_path / f"i{suffix}"
    table = build_index(ann, idx)
    pf = pq.read_table(idx) if suffix == ".parquet" else pa.ipc.open_file(pa.memory_map(str(idx))).read_all()
    assert pf.num_rows == table.num_images
    assert pf.column_names == ["image_id", "file_name", "height", "width", "ann_ids", "boxes",
                               "category_ids", "areas", "iscrowd"]
    assert b"atss_ray.categories" in pf.schema.metadata
    back = read_index(idx)
    ref, _ = load_coco_json(ann)
    for f in ("image_ids", "heights", "widths", "offsets", "ann_ids", "boxes", "category_ids", "areas", "iscrowd"):
        assert np.array_equal(getattr(back, f), getattr(ref, f)), f
    assert back.file_names.to_pylist() == ref.file_names.to_pylist()
    assert back.categories == ref.categories
    if suffix == ".arrow":  # zero-copy: the boxes are the mapped file's bytes, not a decoded copy
        assert not back.boxes.flags.owndata and not back.boxes.flags.writeable


def test_index_through_data_config(synth, tmp_path):
    idx = tmp_path / "train.parquet"
    build_index(synth / "annotations/instances_train2017.json", idx)
    cfg = DataConfig(source="files", train_ann=str(idx), train_images=str(synth / "train2017"),
                     train_min_size=64, max_size=128)
    ds = build_dataset(cfg, "train", train=True)
    assert ds.table.source == str(idx) and len(ds) > 0


def test_build_index_job(synth, tmp_path):
    out = tmp_path / "job.parquet"
    r = subprocess.run([sys.executable, str(REPO / "jobs/build_index.py"),
                        str(synth / "annotations/instances_train2017.json"), "--out", str(out)],
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    assert out.exists() and '"images": 30' in r.stdout
    r = subprocess.run([sys.executable, str(REPO / "jobs/build_index.py"), str(tmp_path / "nope.json")],
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 2 and "nope.json" in r.stderr
