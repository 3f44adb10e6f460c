"""jobs/testdev.py on the real 10-image test-dev slice: submission, validation, MLflow, TTA."""
from __future__ import annotations

import json
import sys
import zipfile
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "jobs"))

import testdev as testdev_job  # noqa: E402

from pipeline.submission import SubmissionError, source_run_id  # noqa: E402

TINY = ["--test-min-size", "96", "--max-size", "160", "--batch-size", "1"]
TINY_TTA = json.dumps({"test_min_size": 96, "test_max_size": 160, "scales": [64, 128],
                       "scale_ranges": [[24, None], [0, 64]], "max_size": 160})


@pytest.fixture(scope="module")
def testdev(shared_data):
    root = shared_data / "coco_testdev_sample"
    return root / "annotations/image_info_test-dev2017.json", root / "test2017"


def _checkpoint(path: Path, categories: list[dict], extra: dict | None = None) -> Path:
    """An untrained tiny 80-class detector with a low score threshold, so every image gets boxes."""
    from detector import build_detector, get_preset
    from pipeline.checkpoint import build_state, save_state

    torch.manual_seed(0)
    cfg = get_preset("tiny", num_classes=len(categories), score_thresh=0.005)
    save_state(build_state(build_detector(cfg), cfg, categories, 0, train_config={"preset": "tiny"},
                           extra=extra), path)
    return path


@pytest.fixture(scope="module")
def coco_categories(testdev):
    info = json.loads(testdev[0].read_text())
    return sorted(({"id": c["id"], "name": c["name"]} for c in info["categories"]), key=lambda c: c["id"])


def _uri(tmp_path: Path) -> str:
    return (tmp_path / "mlruns").as_uri()  # file store: fast; conftest allows it


@pytest.mark.coco
@pytest.mark.ray
def test_submission_for_the_testdev_slice_on_ray_workers(ray_cluster, testdev, coco_categories, tmp_path, capsys):
    from mlflow import MlflowClient

    info, images = testdev
    ckpt = _checkpoint(tmp_path / "ckpt", coco_categories)
    out = tmp_path / "out"
    summary = testdev_job.main(["--checkpoint", str(ckpt), "--image-info", str(info), "--images", str(images),
                                "--name", "tiny", "--out", str(out), "--workers", "2",
                                "--mlflow-uri", _uri(tmp_path), "--json", *TINY])
    assert json.loads(capsys.readouterr().out.strip().splitlines()[-1]) == summary
    json_path = out / "detections_test-dev2017_tiny_results.json"
    zip_path = out / "detections_test-dev2017_tiny_results.zip"
    assert summary["json"] == str(json_path) and summary["zip"] == str(zip_path)
    dets = json.loads(json_path.read_text())
    image_info = json.loads(info.read_text())
    sizes = {im["id"]: (im["width"], im["height"]) for im in image_info["images"]}
    assert {d["image_id"] for d in dets} == set(sizes) and summary["images"] == 10
    for d in dets:  # original pixels, original ids
        x, y, w, h = d["bbox"]
        W, H = sizes[d["image_id"]]
        assert w > 0 and h > 0 and x >= 0 and y >= 0 and x + w <= W + 1e-2 and y + h <= H + 1e-2
        assert d["category_id"] in {c["id"] for c in coco_categories} and 0 <= d["score"] <= 1
    assert max(d["bbox"][2] for d in dets) > 160  # boxes were mapped back from the 96-160 px input
    with zipfile.ZipFile(zip_path) as zf:
        assert zf.namelist() == [json_path.name]
    # the file round-trips through pycocotools and the CLI validator
    from pycocotools.coco import COCO
    gt = COCO()
    gt.dataset = {**image_info, "annotations": []}
    gt.createIndex()
    assert len(gt.loadRes(str(json_path)).anns) == len(dets) == summary["detections"]
    assert testdev_job.main(["--validate", str(zip_path), "--image-info", str(info)])["valid"]
    # no MLflow run behind the checkpoint: a new run, tagged with the checkpoint path, holds both files
    client = MlflowClient(_uri(tmp_path))
    run = client.get_run(summary["run_id"])
    assert run.data.tags["atss.checkpoint"] == str(ckpt)
    assert sorted(a.path for a in client.list_artifacts(run.info.run_id, "testdev")) == \
        ["testdev/" + json_path.name, "testdev/" + zip_path.name]


@pytest.mark.coco
def test_tta_submission_from_an_mlflow_uri_logs_to_that_run(testdev, coco_categories, tmp_path):
    """A checkpoint given as runs:/<id>/model is loaded from the run's artifacts, and the
    submission lands in that same run."""
    from mlflow import MlflowClient

    from pipeline import tracking
    from pipeline.checkpoint import STATE_FILE

    info, images = testdev
    uri = _uri(tmp_path)
    train_run = tracking.create_run(uri, "atss", run_name="training")
    ckpt = _checkpoint(tmp_path / "ckpt", coco_categories)
    client = MlflowClient(uri)
    client.log_artifact(train_run, str(ckpt / STATE_FILE), artifact_path="model")
    summary = testdev_job.main(["--checkpoint", f"runs:/{train_run}/model", "--image-info", str(info),
                                "--images", str(images), "--name", "tiny_tta", "--out", str(tmp_path / "out"),
                                "--workers", "0", "--tta-config", TINY_TTA, "--max-dets", "30",
                                "--mlflow-uri", uri, *TINY])
    assert summary["tta"] and summary["run_id"] == train_run
    dets = json.loads(Path(summary["json"]).read_text())
    counts = {}
    for d in dets:
        counts[d["image_id"]] = counts.get(d["image_id"], 0) + 1
    assert len(counts) == 10 and max(counts.values()) <= 30
    assert len(client.list_artifacts(train_run, "testdev")) == 2
    assert client.get_run(train_run).data.tags["testdev.tiny_tta.tta"] == "True"


@pytest.mark.coco
def test_corrupted_submission_files_are_rejected_by_name(testdev, tmp_path):
    info, _ = testdev
    image_info = json.loads(info.read_text())
    good = [{"image_id": im["id"], "category_id": 1, "bbox": [1.0, 1.0, 10.0, 10.0], "score": 0.5}
            for im in image_info["images"]]
    cases = {
        "missing": (good[1:], f"image {good[0]['image_id']} ({image_info['images'][0]['file_name']}): no detection"),
        "category": ([dict(good[0], category_id=12)] + good[1:], "category_id 12 is not a category"),
        "nan": (good[:-1] + [dict(good[-1], score=float("nan"))],
                f"detection 9 (image {good[-1]['image_id']}): score nan"),
    }
    for name, (results, message) in cases.items():
        path = tmp_path / f"detections_test-dev2017_{name}_results.json"
        path.write_text(json.dumps(results))
        with pytest.raises(SubmissionError) as e:
            testdev_job.main(["--validate", str(path), "--image-info", str(info)])
        assert message in str(e.value)


@pytest.mark.coco
def test_model_categories_must_exist_in_the_image_info(testdev, tmp_path):
    info, images = testdev
    ckpt = _checkpoint(tmp_path / "ckpt", [{"id": 1, "name": "person"}, {"id": 95, "name": "robot"}])
    with pytest.raises(ValueError, match=r"category id\(s\) \[95\]"):
        testdev_job.main(["--checkpoint", str(ckpt), "--image-info", str(info), "--images", str(images),
                          "--out", str(tmp_path / "out"), "--no-mlflow", *TINY])
    assert not (tmp_path / "out").exists()
    with pytest.raises(ValueError, match="submission name"):
        testdev_job.main(["--checkpoint", str(ckpt), "--image-info", str(info), "--images", str(images),
                          "--name", "a b", "--no-mlflow"])


def test_source_run_of_mlflow_uris(tmp_path, monkeypatch):
    from mlflow import MlflowClient

    from pipeline import tracking

    monkeypatch.chdir(tmp_path)  # nothing may land in the caller's working directory
    uri = _uri(tmp_path)
    assert source_run_id("runs:/abc123/model", {}, uri) == "abc123"
    assert source_run_id(str(tmp_path), {"extra": {"mlflow_run_id": "r9"}}, uri) == "r9"
    assert source_run_id(str(tmp_path), {}, uri) is None
    run_id = tracking.create_run(uri, "atss", run_name="train")
    client = MlflowClient(uri, registry_uri=uri)
    client.create_registered_model("atss-tiny")
    client.create_model_version("atss-tiny", f"runs:/{run_id}/model", run_id=run_id)
    assert source_run_id("models:/atss-tiny/1", {}, uri) == run_id
    assert source_run_id("models:/atss-tiny/latest", {}, uri) == run_id
    assert not (tmp_path / "mlflow.db").exists()


# ------------------------------------------------------------------------------------------------
# --validate: the same rules as jobs/evaluate.py --results, exit code 2 naming the file (issue 15)
# ------------------------------------------------------------------------------------------------
def _exit(argv, capsys) -> tuple[int, str]:
    """Exit code and stderr of jobs/testdev.py as its ``__main__`` runs it."""
    from pipeline.inference_cli import exit_code

    capsys.readouterr()
    code = exit_code(testdev_job.main, argv)
    return code, capsys.readouterr().err


def test_validate_refuses_non_numbers_corrupt_zips_and_non_utf8_files(tmp_path, capsys):
    info = tmp_path / "image_info.json"
    info.write_text(json.dumps({"images": [{"id": 1, "width": 100, "height": 80, "file_name": "1.jpg"}],
                                "categories": [{"id": 5, "name": "thing"}]}))
    good = {"image_id": 1, "category_id": 5, "bbox": [1.0, 1.0, 10.0, 10.0], "score": 0.5}
    name = "detections_test-dev2017_x_results.json"
    path = tmp_path / name
    path.write_text(json.dumps([good]))
    assert _exit(["--validate", str(path), "--image-info", str(info)], capsys)[0] == 0
    for field, value, message in (("score", "0.93", "score '0.93' is not a finite number in [0, 1]"),
                                  ("score", None, "score None is not a finite number"),
                                  ("bbox", [1.0, 1.0, "10", 10.0], "holds a non-finite or non-numeric value"),
                                  ("bbox", [1.0, 1.0, 10.0, -2.0], "non-positive width or height")):
        path.write_text(json.dumps([dict(good, **{field: value})]))
        with pytest.raises(SubmissionError, match="detection 0 \\(image 1\\)"):
            testdev_job.main(["--validate", str(path), "--image-info", str(info)])
        code, err = _exit(["--validate", str(path), "--image-info", str(info)], capsys)
        assert code == 2 and message in err and str(path) in err and "Traceback" not in err
    corrupt = tmp_path / "detections_test-dev2017_x_results.zip"
    corrupt.write_bytes(b"PK\x03\x04 truncated")
    code, err = _exit(["--validate", str(corrupt), "--image-info", str(info)], capsys)
    assert code == 2 and str(corrupt) in err and "not a readable zip archive" in err
    with zipfile.ZipFile(corrupt, "w") as zf:
        zf.writestr(name, '[{"image_id": 1, "note": "caf\u00e9"}]'.encode("latin-1"))
    code, err = _exit(["--validate", str(corrupt), "--image-info", str(info)], capsys)
    assert code == 2 and str(corrupt) in err and "not UTF-8 text" in err
    path.write_bytes('[{"image_id": 1, "note": "caf\u00e9"}]'.encode("latin-1"))
    code, err = _exit(["--validate", str(path), "--image-info", str(info)], capsys)
    assert code == 2 and str(path) in err and "not UTF-8 text" in err
    for bad in ("0", "-1"):
        code, err = _exit(["--validate", str(path), "--image-info", str(info), "--max-dets", bad], capsys)
        assert code == 2 and "--max-dets" in err


def test_help_documents_exit_codes(capsys):
    with pytest.raises(SystemExit) as e:
        testdev_job.main(["--help"])
    out = capsys.readouterr().out
    assert e.value.code == 0 and "exit codes:" in out and "2    bad input" in out and "corrupt .zip" in out
