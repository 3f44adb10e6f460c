"""jobs/train.py: bad input is one line naming the option or file, exit 2, found before Ray or MLflow start."""
from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest

from pipeline.cli import call_main

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def train_job():
    spec = importlib.util.spec_from_file_location("train_job_under_test", REPO / "jobs" / "train.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _call(train_job, tmp_path, capsys, *args):
    """Exit code and stderr of ``jobs/train.py args`` with storage and MLflow under ``tmp_path``."""
    argv = ["--storage-path", str(tmp_path / "runs"), "--mlflow-uri", f"sqlite:///{tmp_path / 'mlflow.db'}",
            "--data-opt", f"cache_dir={tmp_path / 'cache'}", *args]
    code = call_main(train_job.main, argv)
    return code, capsys.readouterr().err


@pytest.mark.parametrize("args, message", [
    (["--detector", "topk=2.5"], "--detector topk=2.5: DetectorConfig.topk expects an int >= 1"),
    (["--detector", "topk=abc"], "--detector topk=abc: DetectorConfig.topk expects an int >= 1"),
    (["--detector", "topk=true"], "--detector topk=true: DetectorConfig.topk expects an int >= 1"),
    (["--detector", "aspect_ratios=abc"], "--detector aspect_ratios=abc: DetectorConfig.aspect_ratios expects a "
                                          "non-empty list of numbers, each > 0"),
    (["--detector", "topK=5"], "--detector topK=5: DetectorConfig has no field 'topK'"),
    (["--data-opt", "num_workers=-1"], "--data-opt num_workers=-1: DataConfig.num_workers expects an int >= 0"),
    (["--lr-steps", "a,b"], "--lr-steps a,b: build_train_config.lr_steps expects a list of ints"),
    (["--workers", "-1"], "--workers -1: expected an int >= 0"),
    (["--tag", "novalue"], "--tag 'novalue': expected KEY=VALUE"),
])
@pytest.mark.parametrize("dry_run", [True, False])
def test_bad_options(train_job, tmp_path, capsys, args, message, dry_run):
    code, err = _call(train_job, tmp_path, capsys, *args, *(["--dry-run"] if dry_run else []))
    assert code == 2 and "Traceback" not in err
    assert err.startswith("error: ") and message in err and err.count("\n") == 1, err
    # refused before anything started: no run directory, no MLflow store
    assert not (tmp_path / "runs").exists() and not (tmp_path / "mlflow.db").exists()


def test_config_file_values_are_typed(train_job, tmp_path, capsys):
    config = tmp_path / "train.yaml"
    config.write_text("base_lr: 1e-3\niterations: 4\nbatch_size: 2\n")  # YAML reads 1e-3 as a string
    code, err = _call(train_job, tmp_path, capsys, "--config", str(config), "--workers", "0", "--dry-run",
                      "--data-opt", "synthetic_train_images=4", "--data-opt", "synthetic_val_images=2")
    assert code == 0, err
    config.write_text("iterations: four\n")
    code, err = _call(train_job, tmp_path, capsys, "--config", str(config), "--dry-run")
    assert code == 2 and f"--config {config} iterations='four': build_train_config.iterations expects" in err
    config.write_text("learning_rate: 0.1\n")
    code, err = _call(train_job, tmp_path, capsys, "--config", str(config), "--dry-run")
    assert code == 2 and "learning_rate" in err and "Traceback" not in err


def _coco_root(tmp_path: Path, train: bytes, val: bytes) -> Path:
    root = tmp_path / "coco"
    (root / "annotations").mkdir(parents=True)
    (root / "train2017").mkdir()
    (root / "val2017").mkdir()
    (root / "annotations" / "instances_train2017.json").write_bytes(train)
    (root / "annotations" / "instances_val2017.json").write_bytes(val)
    return root


GOOD = json.dumps({"images": [], "annotations": [], "categories": [{"id": 1, "name": "a"}]}).encode()


@pytest.mark.parametrize("train, val, bad_file", [
    (b"\xff\xfe not json", GOOD, "instances_train2017.json"),
    (b"not json at all", GOOD, "instances_train2017.json"),
    (GOOD, b"{\"images\": [", "instances_val2017.json"),  # the val file is read only for evaluation
])
@pytest.mark.parametrize("dry_run", [True, False])
def test_annotation_files_that_are_not_json(train_job, tmp_path, capsys, train, val, bad_file, dry_run):
    root = _coco_root(tmp_path, train, val)
    code, err = _call(train_job, tmp_path, capsys, "--data", f"coco:{root}", "--workers", "0",
                      *(["--dry-run"] if dry_run else []))
    assert code == 2 and bad_file in err and "not valid JSON" in err and "Traceback" not in err, err
    assert not (tmp_path / "runs").exists() and not (tmp_path / "mlflow.db").exists()


def test_help_documents_exit_codes(train_job):
    text = train_job.build_parser().format_help()
    assert "exit codes:" in text and "  2    bad input" in text and "--lr-steps that are not integers" in text
