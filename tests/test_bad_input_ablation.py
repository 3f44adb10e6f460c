"""jobs/ablation.py: no silent fallback and no traceback for bad input; exit 2 before Ray or MLflow start."""
from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest

from pipeline import ablation as ab
from pipeline.cli import call_main

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def ablation_job():
    spec = importlib.util.spec_from_file_location("ablation_job_bad_input", REPO / "jobs" / "ablation.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture
def run(ablation_job, tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)

    def call(*args):
        code = call_main(ablation_job.main, [*args, "--storage-path", str(tmp_path / "rr")])
        err = capsys.readouterr().err
        assert not (tmp_path / "rr").exists() and not (tmp_path / "mlflow.db").exists()
        return code, err
    return call


@pytest.mark.parametrize("args, message", [
    (["--space", ""], "empty search space"),  # was: silently the default demo
    (["--space", "   "], "empty search space"),
    (["--set", "topk=-3"], "DetectorConfig.topk=-3: expected an int >= 1"),  # was: dropped, k = 5, 9, 13 planned
    (["--set", "topk=0"], "DetectorConfig.topk=0: expected an int >= 1"),
    (["--set", "k=5"], "cannot fix topk=5 on table 'k': its rows set ['topk'] themselves"),
    (["--set", "topk=2.5"], "bad value 2.5 for field 'topk'"),
    (["--table", "anchors_per_location", "--set", "group_norm=false"], "cannot fix group_norm=False on table"),
    (["--train-set", "learning_rate=0.1"], "--train-set learning_rate=0.1: build_train_config has no field "
                                           "'learning_rate'"),  # was: a TypeError traceback
    (["--train-set", "lr_steps=a,b"], "--train-set lr_steps=a,b: build_train_config.lr_steps expects a list of ints"),
    (["--data-set", "num_workers=-1"], "--data-set num_workers=-1: DataConfig.num_workers expects an int >= 0"),
    (["--data-set", "min_size=800"], "--data-set min_size=800: DataConfig has no field 'min_size'"),
    (["--workers-per-trial", "-1"], "workers_per_trial"),
    (["--space", "k=0,5"], "DetectorConfig.topk=0: expected an int >= 1"),
])
@pytest.mark.parametrize("dry_run", [True, False])
def test_bad_input(run, args, message, dry_run):
    code, err = run(*args, *(["--dry-run"] if dry_run else []))
    assert code == 2, err
    assert err.startswith("error: ") and message in err and "Traceback" not in err and err.count("\n") == 1, err


def test_set_on_a_field_the_table_does_not_sweep_still_applies():
    plan = ab.plan_table("k", "tiny", values="5,9", overrides={"group_norm": False})
    assert [(t.detector.topk, t.detector.group_norm) for t in plan.trials] == [(5, False), (9, False)]


def test_help_documents_exit_codes(ablation_job):
    text = ablation_job.build_parser().format_help()
    assert "exit codes:" in text and "  2    bad input" in text and "--set of a field the table's rows set" in text


@pytest.mark.parametrize("dry_run", [True, False])
def test_val_annotations_that_are_not_json(run, tmp_path, dry_run):
    root = tmp_path / "coco"
    for d in ("annotations", "train2017", "val2017"):
        (root / d).mkdir(parents=True)
    good = '{"images": [], "annotations": [], "categories": [{"id": 1, "name": "a"}]}'
    (root / "annotations" / "instances_train2017.json").write_text(good)
    (root / "annotations" / "instances_val2017.json").write_text('{"images": [')
    code, err = run("--data", f"coco:{root}", "--values", "5", *(["--dry-run"] if dry_run else []))
    assert code == 2 and "instances_val2017.json is not valid JSON" in err and "Traceback" not in err, err
