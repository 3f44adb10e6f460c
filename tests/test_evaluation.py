"""COCO evaluation: metrics against known figures, both backends, bad input, one results validator."""
from __future__ import annotations

import json
import multiprocessing as mp
import os

import pytest
import torch

from pipeline.evaluation import METRIC_KEYS, ResultsError, evaluate_coco, gather_across_workers, load_ground_truth

REFERENCE = {"AP": 0.626, "AP50": 0.817, "AP75": 0.698, "APs": 0.461, "APm": 0.691, "APl": 0.797}


def _gt() -> dict:
    """3 images, 2 categories (COCO ids 3 and 7), one small, one medium and one large box each."""
    images = [{"id": i, "width": 640, "height": 480, "file_name": f"{i}.jpg"} for i in (10, 11, 12)]
    anns, aid = [], 1
    for img in (10, 11, 12):
        for cat, (x, y, w, h) in ((3, (10, 10, 20, 20)), (7, (100, 100, 60, 60)), (3, (200, 150, 200, 150))):
            anns.append({"id": aid, "image_id": img, "category_id": cat, "bbox": [x, y, w, h],
                         "area": w * h, "iscrowd": 0})
            aid += 1
    cats = [{"id": 3, "name": "car"}, {"id": 7, "name": "train"}]
    return {"images": images, "annotations": anns, "categories": cats}


def _perfect(gt: dict) -> list[dict]:
    return [{"image_id": a["image_id"], "category_id": a["category_id"], "bbox": list(a["bbox"]),
             "score": 0.9} for a in gt["annotations"]]


@pytest.mark.coco
@pytest.mark.parametrize("backend", ["pycocotools", "faster"])
def test_reproduces_reference_detections(shared_data, backend):
    root = shared_data / "coco_testdev_sample"
    m = evaluate_coco(root / "annotations/instances_val2017.json",
                      root / "reference_results/mask_rcnn_r50_fpn_1x_val_bbox.json", backend=backend)
    assert {k: round(m[k], 3) for k in METRIC_KEYS} == REFERENCE
    assert len(m["per_category"]) == 20 and all(0 <= v <= 1 for v in m["per_category"].values())


@pytest.mark.parametrize("backend", ["pycocotools", "faster"])
def test_perfect_detections_score_one_and_empty_scores_zero(backend, tmp_path):
    gt = _gt()
    path = tmp_path / "gt.json"
    path.write_text(json.dumps(gt))
    m = evaluate_coco(path, _perfect(gt), backend=backend)
    assert all(m[k] == pytest.approx(1.0) for k in METRIC_KEYS)
    assert m["per_category"] == {"car": pytest.approx(1.0), "train": pytest.approx(1.0)}
    empty = evaluate_coco(gt, [], backend=backend)
    assert all(empty[k] == 0.0 for k in METRIC_KEYS)
    assert empty["per_category"] == {"car": 0.0, "train": 0.0}


@pytest.mark.parametrize("backend", ["pycocotools", "faster"])
def test_summary_is_quiet_unless_verbose(backend, caplog, capsys):
    """Ray workers log at INFO: the summary must not reach their logs unless asked for."""
    gt = _gt()
    with caplog.at_level("INFO"):
        evaluate_coco(gt, _perfect(gt), backend=backend)
    assert not [r for r in caplog.records if "Average Precision" in r.getMessage()]
    assert capsys.readouterr().out == ""
    evaluate_coco(gt, _perfect(gt), backend=backend, verbose=True)
    printed = capsys.readouterr().out.splitlines()
    assert len([line for line in printed if "Average Precision" in line]) == 6, printed


def test_wrong_category_halves_ap_and_input_is_not_mutated():
    gt = _gt()
    dets = _perfect(gt)
    for d in dets:  # "train" boxes relabelled "car" at a lower score: train AP 0, car AP stays 1
        if d["category_id"] == 7:
            d["category_id"], d["score"] = 3, 0.5
    before = json.dumps(dets)
    m = evaluate_coco(gt, dets)
    assert m["per_category"]["train"] == 0.0
    assert m["per_category"]["car"] == pytest.approx(1.0)
    assert m["AP"] == pytest.approx(0.5)
    assert json.dumps(dets) == before, "the COCO API must not add keys to the caller's dicts"


def test_backends_agree_on_noisy_detections():
    gt = _gt()
    g = torch.Generator().manual_seed(0)
    dets = []
    for a in gt["annotations"]:
        for _ in range(3):
            jitter = (torch.rand(4, generator=g) - 0.5) * torch.tensor(a["bbox"]) * 0.4
            dets.append({"image_id": a["image_id"], "category_id": a["category_id"],
                         "bbox": (torch.tensor(a["bbox"], dtype=torch.float) + jitter).tolist(),
                         "score": float(torch.rand(1, generator=g))})
    a = evaluate_coco(gt, dets, backend="pycocotools")
    b = evaluate_coco(gt, dets, backend="faster")
    for k in METRIC_KEYS:
        assert a[k] == pytest.approx(b[k], abs=1e-9)
    assert 0.0 < a["AP"] < 1.0


def test_bad_inputs_name_the_problem(tmp_path):
    gt = _gt()
    with pytest.raises(FileNotFoundError, match="nope.json"):
        evaluate_coco(tmp_path / "nope.json", [])
    broken = tmp_path / "broken.json"
    broken.write_text("[{")
    with pytest.raises(ValueError, match="broken.json is not valid JSON"):
        evaluate_coco(gt, broken)
    dets = _perfect(gt)
    with pytest.raises(ValueError, match=r"detection 9 \(image 999\): image_id 999 is not in the ground truth"):
        evaluate_coco(gt, dets + [dict(dets[0], image_id=999)])
    with pytest.raises(ValueError, match=r"detection 9 \(image 10\): category_id 5 is not a category"):
        evaluate_coco(gt, dets + [dict(dets[0], category_id=5)])
    with pytest.raises(ValueError, match=r"detection 0 \(image 10\): missing field\(s\) score"):
        evaluate_coco(gt, [{k: v for k, v in dets[0].items() if k != "score"}])
    with pytest.raises(ValueError, match="score nan is not a finite number"):
        evaluate_coco(gt, [dict(dets[0], score=float("nan"))])
    with pytest.raises(ValueError, match="unknown backend"):
        evaluate_coco(gt, dets, backend="detectron")
    info = {k: v for k, v in gt.items() if k != "annotations"}
    with pytest.raises(ValueError, match="no 'annotations'"):
        evaluate_coco(info, dets)


def test_gather_without_process_group_is_identity_and_dedupes():
    items = [{"image_id": 1}, {"image_id": 2}, {"image_id": 1}]
    assert gather_across_workers(items) == items
    assert gather_across_workers(items, dedupe_key="image_id") == items[:2]


def _gather_worker(rank: int, init_file: str, out_dir: str) -> None:
    import torch.distributed as dist

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=2)
    # rank 1 repeats image 1, as DistributedSampler's padding does
    mine = [{"image_id": 0, "r": 0}, {"image_id": 2, "r": 0}] if rank == 0 else \
        [{"image_id": 1, "r": 1}, {"image_id": 1, "r": 1}]
    got = gather_across_workers(mine, dedupe_key="image_id")
    with open(os.path.join(out_dir, f"{rank}.json"), "w") as f:
        json.dump(got, f)
    dist.destroy_process_group()


def test_gather_across_two_gloo_ranks(tmp_path):
    ctx = mp.get_context("fork")
    procs = [ctx.Process(target=_gather_worker, args=(r, str(tmp_path / "init"), str(tmp_path)))
             for r in range(2)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(60)
        assert p.exitcode == 0
    expected = [{"image_id": 0, "r": 0}, {"image_id": 2, "r": 0}, {"image_id": 1, "r": 1}]
    for r in range(2):
        assert json.loads((tmp_path / f"{r}.json").read_text()) == expected


# ------------------------------------------------------------------------------------------------
# one set of rules for a results file, scored or validated for submission (issue 15)
# ------------------------------------------------------------------------------------------------
def _image_info(gt: dict) -> dict:
    return {"images": gt["images"], "categories": gt["categories"]}


@pytest.mark.parametrize("field, value, expected", [
    ("bbox", [100.0, 100.0, -60.0, 60.0], r"bbox \[100.0, 100.0, -60.0, 60.0\] has non-positive width or height"),
    ("bbox", [100.0, 100.0, 60.0, -1.0], r"has non-positive width or height"),
    ("bbox", [100.0, "100", 60.0, 60.0], r"holds a non-finite or non-numeric value"),
    ("bbox", [600.0, 100.0, 60.0, 60.0], r"leaves the 640x480 image"),
    ("score", "0.93", r"score '0.93' is not a finite number in \[0, 1\]"),
    ("score", True, r"score True is not a finite number"),
    ("score", 1.5, r"score 1.5 is not a finite number"),
    ("image_id", "11", r"image_id '11' is not an integer"),
    ("category_id", 7.0, r"category_id 7.0 is not an integer"),
    ("segmentation", [], r"unexpected field\(s\) segmentation"),
])
def test_results_follow_the_same_rules_when_scored_and_when_submitted(tmp_path, field, value, expected):
    from pipeline.submission import SubmissionError, validate_results

    gt = _gt()
    dets = _perfect(gt)
    validate_results(dets, _image_info(gt))  # the unchanged file passes both
    dets[4] = dict(dets[4], **{field: value})
    path = tmp_path / "dets.json"
    path.write_text(json.dumps(dets))
    with pytest.raises(ResultsError, match=expected) as scored:
        evaluate_coco(gt, path)
    with pytest.raises(SubmissionError, match=expected) as submitted:
        validate_results(json.loads(path.read_text()), _image_info(gt))
    assert str(path) in str(scored.value)
    assert scored.value.problems[0].startswith("detection 4 (image ")
    assert scored.value.problems == [p.replace("image-info file", "ground truth")
                                     for p in submitted.value.problems]


def test_results_rules_hold_for_random_mutations():
    """Property: a mutated results file is accepted by both evaluation and submission validation
    (and then scored by pycocotools without error) or refused by both, naming the detection."""
    from hypothesis import HealthCheck, given, settings
    from hypothesis import strategies as st

    from pipeline.submission import SubmissionError, validate_results

    gt = _gt()
    base = _perfect(gt)
    values = st.one_of(st.none(), st.booleans(), st.integers(-5, 700), st.floats(allow_nan=True, allow_infinity=True),
                       st.text(max_size=3), st.lists(st.floats(-10, 700), min_size=3, max_size=5),
                       st.sampled_from([10, 11, 12, 3, 7, [1.0, 2.0, 3.0, 4.0]]))
    mutation = st.tuples(st.integers(0, len(base) - 1),
                         st.sampled_from(["image_id", "category_id", "bbox", "score", "extra", "bbox_item"]),
                         values, st.integers(0, 3))

    @settings(max_examples=int(os.environ.get("ATSS_HYPOTHESIS_EXAMPLES", 60)), deadline=None, derandomize=True,
              suppress_health_check=list(HealthCheck))
    @given(st.lists(mutation, min_size=1, max_size=3))
    def check(mutations):
        dets = [dict(d, bbox=list(d["bbox"])) for d in base]
        for i, field, value, k in mutations:
            if field == "bbox_item":
                if isinstance(dets[i]["bbox"], list) and len(dets[i]["bbox"]) > k:
                    dets[i]["bbox"][k] = value
            elif field == "extra":
                dets[i]["extra"] = value
            else:
                dets[i][field] = value
        try:
            metrics = evaluate_coco(gt, dets, backend="pycocotools")
            scored = None
        except ResultsError as e:
            scored = e
        try:
            validate_results(dets, _image_info(gt), require_all_images=False)
            submitted = None
        except SubmissionError as e:
            submitted = e
        assert (scored is None) == (submitted is None), (scored, submitted)
        if scored is None:
            assert all(0.0 <= metrics[k] <= 1.0 for k in METRIC_KEYS)
        else:
            assert all(p.startswith("detection ") for p in scored.problems)
            assert scored.problems == [p.replace("image-info file", "ground truth") for p in submitted.problems]

    check()


def test_parquet_ground_truth_scores_like_its_json(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    from pipeline.data import AnnotationError, build_index

    gt = _gt()
    (tmp_path / "gt.json").write_text(json.dumps(gt))
    build_index(tmp_path / "gt.json", tmp_path / "gt.parquet")
    dets = _perfect(gt)[:5]
    m_json = evaluate_coco(tmp_path / "gt.json", dets)
    m_parquet = evaluate_coco(tmp_path / "gt.parquet", dets)
    assert m_parquet == m_json and 0 < m_json["AP"] < 1
    pq.write_table(pa.table({"a": [1]}), tmp_path / "other.parquet")
    with pytest.raises(AnnotationError, match=r"other.parquet is a Parquet file but not an atss-ray annotation index"):
        evaluate_coco(tmp_path / "other.parquet", dets)
    (tmp_path / "junk.parquet").write_bytes(b"not parquet at all")
    with pytest.raises(AnnotationError, match=r"junk.parquet is not a readable Parquet annotation index"):
        load_ground_truth(tmp_path / "junk.parquet")


def test_ground_truth_without_annotations_and_non_utf8_files_are_refused_by_name(tmp_path):
    gt = _gt()
    for anns in ([], [dict(a, iscrowd=1) for a in gt["annotations"]]):
        (tmp_path / "empty.json").write_text(json.dumps(dict(gt, annotations=anns)))
        with pytest.raises(ValueError, match=r"empty.json: no \(non-crowd\) annotation to score against"):
            evaluate_coco(tmp_path / "empty.json", [])
    (tmp_path / "latin1.json").write_bytes('[{"image_id": 10, "name": "caf\u00e9"}]'.encode("latin-1"))
    with pytest.raises(ValueError, match=r"results file .*latin1.json is not valid JSON: not UTF-8 text"):
        evaluate_coco(gt, tmp_path / "latin1.json")
