"""jobs/evaluate.py: scoring a results file, evaluating a checkpoint (plain, TTA, sharded on Ray)."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from pipeline import inference_cli as cli
from pipeline.evaluation import METRIC_KEYS, evaluate_coco
from pipeline.inference import predict, to_coco_results

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "jobs"))

import evaluate as evaluate_job  # noqa: E402

TINY_TTA = json.dumps({"test_min_size": 96, "test_max_size": 160, "scales": [64, 128],
                       "scale_ranges": [[24, None], [0, 64]], "max_size": 160})


@pytest.fixture(scope="module")
def synthetic_checkpoint(tmp_path_factory):
    """An untrained tiny detector whose checkpoint says it was trained on a 6-image synthetic set
    (low score threshold, so it outputs boxes to score)."""
    from detector import build_detector, get_preset
    from pipeline.checkpoint import build_state, save_state
    from pipeline.synthetic import CATEGORIES

    tmp = tmp_path_factory.mktemp("evaljob")
    data = {"source": "synthetic", "synthetic_train_images": 2, "synthetic_val_images": 6,
            "synthetic_image_size": [96, 128], "synthetic_num_classes": 3, "cache_dir": str(tmp / "cache"),
            "test_min_size": 96, "max_size": 160}
    torch.manual_seed(0)
    cfg = get_preset("tiny", num_classes=3, score_thresh=0.005)
    cats = [{"id": i, "name": n} for i, n, _ in CATEGORIES[:3]]
    save_state(build_state(build_detector(cfg), cfg, cats, 0,
                           train_config={"preset": "tiny", "data": data}), tmp / "ckpt")
    return tmp / "ckpt"


def _assert_same_results(a: list[dict], b: list[dict]) -> None:
    key = lambda d: (d["image_id"], -round(d["score"], 4), d["category_id"], d["bbox"])  # noqa: E731
    assert len(a) == len(b)
    for x, y in zip(sorted(a, key=key), sorted(b, key=key)):
        assert (x["image_id"], x["category_id"]) == (y["image_id"], y["category_id"])
        assert x["bbox"] == pytest.approx(y["bbox"], abs=1e-3)
        assert x["score"] == pytest.approx(y["score"], abs=1e-5)


def test_results_mode_prints_json_metrics_on_the_last_line(tmp_path):
    gt = {"images": [{"id": 1, "width": 100, "height": 100}],
          "categories": [{"id": 5, "name": "thing"}],
          "annotations": [{"id": 1, "image_id": 1, "category_id": 5, "bbox": [10, 10, 50, 50],
                           "area": 2500, "iscrowd": 0}]}
    dets = [{"image_id": 1, "category_id": 5, "bbox": [10, 10, 50, 50], "score": 0.9}]
    (tmp_path / "gt.json").write_text(json.dumps(gt))
    (tmp_path / "dets.json").write_text(json.dumps(dets))
    out = subprocess.run([sys.executable, str(REPO / "jobs/evaluate.py"), "--results", str(tmp_path / "dets.json"),
                          "--annotations", str(tmp_path / "gt.json"), "--json"],
                         capture_output=True, text=True, timeout=120, cwd=tmp_path)
    assert out.returncode == 0, out.stderr
    last = json.loads(out.stdout.strip().splitlines()[-1])
    assert list(last) == list(METRIC_KEYS)
    assert last["AP"] == pytest.approx(1.0) and last["APs"] == -1.0  # no small GT: undefined
    with pytest.raises(FileNotFoundError, match="results file not found: .*nope.json"):
        evaluate_job.main(["--results", str(tmp_path / "nope.json"), "--annotations", str(tmp_path / "gt.json")])


@pytest.mark.coco
def test_results_mode_reproduces_the_reference_figures(shared_data, capsys):
    root = shared_data / "coco_testdev_sample"
    m = evaluate_job.main(["--results", str(root / "reference_results/mask_rcnn_r50_fpn_1x_val_bbox.json"),
                           "--annotations", str(root / "annotations/instances_val2017.json"), "--json",
                           "--backend", "pycocotools"])
    last = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert {k: round(v, 3) for k, v in last.items()} == \
        {"AP": 0.626, "AP50": 0.817, "AP75": 0.698, "APs": 0.461, "APm": 0.691, "APl": 0.797}
    assert m["per_category"]["cow"] == pytest.approx(1.0)


def test_checkpoint_mode_uses_its_data_and_matches_plain_predict(synthetic_checkpoint, tmp_path, capsys):
    from pipeline.data import build_dataloader, build_dataset
    from pipeline.inference import load_model_state, model_category_map
    from pipeline.checkpoint import load_detector

    saved = tmp_path / "dets.json"
    m = evaluate_job.main(["--checkpoint", str(synthetic_checkpoint), "--json", "--save-results", str(saved)])
    last = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert list(last) == list(METRIC_KEYS)

    # the same numbers straight from predict() on the checkpoint's own val split
    state = load_model_state(synthetic_checkpoint)
    data_cfg = cli.data_config_of(state)
    ds = build_dataset(data_cfg, "val", train=False)
    model, _, _ = load_detector(synthetic_checkpoint)
    results = to_coco_results(predict(model, build_dataloader(data_cfg, "val", 2, train=False, dataset=ds)),
                              category_map=model_category_map(state))
    assert len(results) > 0
    _assert_same_results(json.loads(saved.read_text()), results)
    direct = evaluate_coco(ds.coco, results)
    assert {k: m[k] for k in METRIC_KEYS} == pytest.approx({k: direct[k] for k in METRIC_KEYS})


def test_checkpoint_mode_with_tta(synthetic_checkpoint, tmp_path, capsys):
    saved = tmp_path / "tta.json"
    evaluate_job.main(["--checkpoint", str(synthetic_checkpoint), "--tta-config", TINY_TTA,
                       "--save-results", str(saved), "--max-dets", "50"])
    out = capsys.readouterr().out
    assert "TTA (6 passes)" in out
    dets = json.loads(saved.read_text())
    per_image = {}
    for d in dets:
        per_image[d["image_id"]] = per_image.get(d["image_id"], 0) + 1
    assert len(per_image) == 6 and max(per_image.values()) <= 50


def test_bad_arguments_are_reported(synthetic_checkpoint, tmp_path):
    with pytest.raises(SystemExit):
        evaluate_job.main(["--checkpoint", str(synthetic_checkpoint), "--results", "x.json"])
    with pytest.raises(FileNotFoundError, match="no checkpoint at"):
        evaluate_job.main(["--checkpoint", str(tmp_path / "missing")])
    with pytest.raises(ValueError, match="--tta-config"):
        evaluate_job.main(["--checkpoint", str(synthetic_checkpoint), "--tta-config", "{nope"])


@pytest.mark.ray
def test_sharding_over_ray_tasks_gives_the_same_results(ray_cluster, synthetic_checkpoint):
    from pipeline.inference import InferenceSpec, load_model_state, predict_sharded
    from pipeline.data import resolve_split

    state = load_model_state(synthetic_checkpoint)
    data_cfg = cli.data_config_of(state)
    ann, images = resolve_split(data_cfg, "val")
    # batch size 1: padding a batch changes the detections, so shards must batch alike
    spec = InferenceSpec(str(ann), str(images), test_min_size=96, max_size=160, batch_size=1)
    local = predict_sharded(state, spec, workers=0)
    sharded = predict_sharded(state, spec, workers=2)
    assert len(local) > 0
    _assert_same_results(sharded, local)
