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


# ------------------------------------------------------------------------------------------------
# bad input: exit code 2 and a message naming the option, file or record (issue 15)
# ------------------------------------------------------------------------------------------------
def _exit(main, argv, capsys) -> tuple[int, str]:
    """Exit code and stderr of a job's main run as its ``__main__`` does (pipeline.inference_cli.run_job)."""
    capsys.readouterr()
    code = cli.exit_code(main, argv)
    return code, capsys.readouterr().err


def _gt_files(tmp_path: Path, annotations: bool = True) -> tuple[Path, Path]:
    gt = {"images": [{"id": 1, "width": 100, "height": 80, "file_name": "1.jpg"}],
          "categories": [{"id": 5, "name": "thing"}],
          "annotations": [{"id": 1, "image_id": 1, "category_id": 5, "bbox": [10, 10, 50, 50], "area": 2500,
                           "iscrowd": 0}] if annotations else []}
    dets = [{"image_id": 1, "category_id": 5, "bbox": [10.0, 10.0, 50.0, 50.0], "score": 0.9}]
    (tmp_path / "gt.json").write_text(json.dumps(gt))
    (tmp_path / "dets.json").write_text(json.dumps(dets))
    return tmp_path / "gt.json", tmp_path / "dets.json"


def test_results_mode_bad_input_exits_2_naming_the_problem(tmp_path, capsys):
    gt, dets = _gt_files(tmp_path)
    negative = tmp_path / "negative.json"
    negative.write_text(json.dumps([{"image_id": 1, "category_id": 5, "bbox": [10.0, 10.0, -5.0, 20.0], "score": 0.9}]))
    code, err = _exit(evaluate_job.main, ["--results", str(negative), "--annotations", str(gt)], capsys)
    assert code == 2 and "negative.json" in err and "detection 0 (image 1): bbox" in err and "non-positive width" in err
    for bad in ("0", "-1", "x"):
        code, err = _exit(evaluate_job.main, ["--results", str(dets), "--annotations", str(gt), "--max-dets", bad], capsys)
        assert code == 2 and "--max-dets" in err and "integer >= 1" in err
    (tmp_path / "empty").mkdir()
    _gt_files(tmp_path / "empty", annotations=False)
    code, err = _exit(evaluate_job.main, ["--results", str(dets), "--annotations", str(tmp_path / "empty/gt.json")], capsys)
    assert code == 2 and "empty/gt.json: no (non-crowd) annotation" in err
    code, _ = _exit(evaluate_job.main, ["--results", str(dets), "--annotations", str(gt)], capsys)
    assert code == 0
    code, err = _exit(lambda argv: (_ for _ in ()).throw(RuntimeError("a bug")), [], capsys)
    assert code == 1 and "Traceback" in err and "RuntimeError: a bug" in err


def test_checkpoint_mode_bad_options_exit_2_before_inference(synthetic_checkpoint, tmp_path, capsys, monkeypatch):
    import pipeline.inference

    def no_inference(*a, **k):
        raise AssertionError("inference must not start on bad input")

    monkeypatch.setattr(pipeline.inference, "predict_sharded", no_inference)
    ckpt = ["--checkpoint", str(synthetic_checkpoint)]
    no_gpu = "cuda" if not torch.cuda.is_available() else f"cuda:{torch.cuda.device_count()}"
    gt, _ = _gt_files(tmp_path, annotations=False)
    (tmp_path / "images").mkdir()
    for argv, expected in (
            (["--tta-config", "{nope"], "--tta-config '{nope': neither valid JSON"),
            (["--tta-config", '{"merge": "max"}'], "--tta-config: TTAConfig.merge='max': expected one of 'soft-vote', 'vote', 'nms'"),
            (["--tta-config", '{"scales": "abc"}'], "--tta-config: TTAConfig.scales='abc': expected a non-empty list of ints"),
            (["--device", no_gpu], f"--device '{no_gpu}'"),
            (["--device", "tpu"], "--device 'tpu': allowed: cpu, cuda or cuda:N"),
            (["--workers", "-1"], "--workers"),
            (["--annotations", str(gt), "--images", str(tmp_path / "images")], "gt.json: no (non-crowd) annotation"),
    ):
        code, err = _exit(evaluate_job.main, ckpt + argv, capsys)
        assert code == 2, (argv, err)
        assert expected in err, (argv, err)
    code, err = _exit(evaluate_job.main, ["--checkpoint", "runs:/0123abcd/model", "--mlflow-uri",
                                          str(tmp_path / "store")], capsys)
    assert code == 2 and "a plain path is not a tracking URI" in err


def test_mismatched_checkpoint_and_missing_mlflow_model_exit_2(synthetic_checkpoint, tmp_path, capsys):
    from pipeline.checkpoint import load_state, save_state

    state = load_state(synthetic_checkpoint)
    state["detector_config"] = dict(state["detector_config"], num_classes=4)  # weights are for 3
    save_state(state, tmp_path / "mismatch")
    code, err = _exit(evaluate_job.main, ["--checkpoint", str(tmp_path / "mismatch")], capsys)
    assert code == 2 and "mismatch" in err and "checkpoint weights do not match the detector config" in err
    assert "shape differs for" in err and "cls_logits" in err
    store = f"sqlite:///{tmp_path / 'mlflow.db'}"
    for uri in ("runs:/0123456789abcdef0123456789abcdef/model", "models:/no_such_model/1"):
        code, err = _exit(evaluate_job.main, ["--checkpoint", uri, "--mlflow-uri", store], capsys)
        assert code == 2 and f"MLflow model {uri} not found in the tracking store {store}" in err, err


def test_help_documents_exit_codes_and_main_exits_2(tmp_path, capsys):
    with pytest.raises(SystemExit) as e:
        evaluate_job.main(["--help"])
    assert e.value.code == 0
    out = capsys.readouterr().out
    assert "exit codes:" in out and "2    bad input" in out and "1    internal failure" in out
    assert "bad input handled (exit 2)" in out and "--tta-config" in out
    gt, _ = _gt_files(tmp_path)
    (tmp_path / "scores.json").write_text(json.dumps([{"image_id": 1, "category_id": 5, "bbox": [1, 1, 5, 5],
                                                      "score": "0.93"}]))
    out = subprocess.run([sys.executable, str(REPO / "jobs/evaluate.py"), "--results", str(tmp_path / "scores.json"),
                          "--annotations", str(gt)], capture_output=True, text=True, timeout=120, cwd=tmp_path)
    assert out.returncode == 2 and "score '0.93' is not a finite number" in out.stderr and "Traceback" not in out.stderr


def test_checkpoint_mode_with_parquet_ground_truth(synthetic_checkpoint, tmp_path, capsys):
    from pipeline.data import build_index, resolve_split
    from pipeline.inference import load_model_state

    ann, images = resolve_split(cli.data_config_of(load_model_state(synthetic_checkpoint)), "val")
    build_index(ann, tmp_path / "val.parquet")
    ckpt = ["--checkpoint", str(synthetic_checkpoint), "--images", str(images), "--json"]
    from_json = evaluate_job.main(ckpt + ["--annotations", str(ann)])
    from_parquet = evaluate_job.main(ckpt + ["--annotations", str(tmp_path / "val.parquet")])
    assert {k: from_parquet[k] for k in METRIC_KEYS} == pytest.approx({k: from_json[k] for k in METRIC_KEYS})
    assert from_parquet["per_category"] == pytest.approx(from_json["per_category"])
