"""The main job end to end on the session's local Ray cluster: a 2-trial Tune sweep (1-worker trials
train inside their Tune trial; tiny preset, tiny images, a few iterations), MLflow parent/child runs,
the results table in Markdown and Parquet, the restore of a sweep by its name, and a trial that fails
once and resumes from its Tune checkpoint, and a sweep whose driver never loads torch. Without Ray:
the progress table's columns, the short swept keys and the sweep's ETA line."""
from __future__ import annotations

import importlib.util
import os
import subprocess
import sys
from pathlib import Path

import pyarrow.parquet as pq
import pytest

REPO = Path(__file__).resolve().parents[1]
_spec = importlib.util.spec_from_file_location("ablation_job", REPO / "jobs" / "ablation.py")
ablation_job = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(ablation_job)


@pytest.mark.ray
@pytest.mark.timeout(420)
def test_two_trial_sweep_tracks_tables_and_restores(ray_cluster, tmp_path, monkeypatch, capsys):
    from mlflow import MlflowClient

    monkeypatch.chdir(tmp_path)
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    args = ["--smoke", "--name", "smoke", "--storage-path", str(tmp_path / "rr"), "--mlflow-uri", uri,
            "--experiment", "ablation-test", "--quiet"]
    assert ablation_job.main(args) == 0
    out = capsys.readouterr().out
    assert "Table 4" in out and f"mlflow ui --backend-store-uri {uri}" in out

    # the table: one row per trial, ours beside the paper's
    results = tmp_path / "rr" / "smoke" / "ablation"
    table = pq.read_table(results / "results.parquet").to_pandas()
    assert list(table["label"]) == ["k=5", "k=9"]
    assert list(table["topk"]) == ["5", "9"]
    assert list(table["status"]) == ["done", "done"]
    assert list(table["iterations"]) == [ablation_job.SMOKE_ITERATIONS] * 2
    assert list(table["paper_AP"]) == [38.8, 39.3]
    assert table["AP"].notna().all()  # the AP of the final evaluation came back through Tune
    assert (table["diff_AP"] == table["AP"] - table["paper_AP"]).all()
    assert "| k=9 | ours |" in (results / "results.md").read_text()
    assert (results / "ap.png").read_bytes()[:4] == b"\x89PNG"

    # Tune's ResultGrid carries each trial's real config: the swept field is a column
    from ray import tune

    grid = tune.ResultGrid(tune.ExperimentAnalysis(str(tmp_path / "rr" / "smoke"))).get_dataframe()
    assert sorted(grid["config/topk"]) == [5, 9]  # the short key: the progress table's column
    assert sorted(grid["config/train/detector/topk"]) == [5, 9]
    assert {"iteration", "images_per_s", "AP", "eta_s", "mean_loss"} <= set(grid.columns)
    assert set(grid["config/train/detector/num_classes"]) == {5}

    # MLflow: a parent per sweep, a child per trial with the varied param and the table's tags
    client = MlflowClient(uri)
    exp = client.get_experiment_by_name("ablation-test")
    parents = client.search_runs([exp.experiment_id], "tags.`ablation.role` = 'sweep'")
    assert len(parents) == 1 and parents[0].info.status == "FINISHED"
    parent = parents[0]
    assert parent.data.tags["ablation.table"] == "k" and parent.data.tags["ablation.varied"] == "topk"
    logged = {a.path for a in client.list_artifacts(parent.info.run_id, "ablation")}
    assert {"ablation/results.md", "ablation/results.parquet", "ablation/ap.png", "ablation/plan.json"} <= logged
    children = client.search_runs([exp.experiment_id], f"tags.mlflow.parentRunId = '{parent.info.run_id}'")
    assert sorted(c.data.params["detector.topk"] for c in children) == ["5", "9"]
    for child in children:
        assert child.info.status == "FINISHED"
        assert child.data.tags["ablation.table"] == "k" and child.data.tags["ablation.varied"] == "topk"
        assert child.data.tags["ablation.row"] == f"k={child.data.params['detector.topk']}"
        assert "eval/AP" in child.data.metrics

    # the same name again restores the finished sweep from Tune's state: nothing retrains
    assert ablation_job.main(args) == 0
    out = capsys.readouterr().out
    assert "restoring smoke" in out
    again = pq.read_table(results / "results.parquet").to_pandas()
    assert list(again["AP"]) == list(table["AP"])
    assert len(client.search_runs([exp.experiment_id], f"tags.mlflow.parentRunId = '{parent.info.run_id}'")) == 2


def test_sweep_store_local_and_uri(tmp_path):
    """Plan/state/results files live under <storage>/<name>/ablation on a path or a pyarrow URI."""
    from pipeline.ablation.sweep import STATE_FILE, find_latest_sweep, load_state, sweep_store

    for storage in (str(tmp_path / "local"), (tmp_path / "uri").as_uri()):
        assert find_latest_sweep(storage) is None
        for name in ("first", "second"):
            store = sweep_store(storage, name)
            assert store.read_text(STATE_FILE) is None
            where = store.write_text(STATE_FILE, '{"name": "%s"}' % name)
            assert where.endswith(f"/{name}/ablation/{STATE_FILE}")
        assert load_state(storage, "first") == {"name": "first"}
        assert find_latest_sweep(storage) == "second"
    assert (tmp_path / "uri" / "second" / "ablation" / STATE_FILE).is_file()


@pytest.mark.ray
@pytest.mark.timeout(600)
def test_in_trial_training_fails_once_and_resumes_from_its_tune_checkpoint(ray_cluster, tmp_path, monkeypatch):
    """A 1-worker trial trains inside its Tune trial; an injected failure at iteration 2 makes Tune
    restart the trial (FailureConfig), which resumes from the checkpoint of iteration 2 and logs to
    the same MLflow child run."""
    from mlflow import MlflowClient

    monkeypatch.chdir(tmp_path)
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    args = ["--smoke", "--table", "k", "--values", "5", "--name", "fault", "--storage-path", str(tmp_path / "rr"),
            "--mlflow-uri", uri, "--experiment", "fault-test", "--quiet", "--max-failures", "1",
            "--train-set", "fail_at_iteration=2", "--train-set", "checkpoint_period=1"]
    assert ablation_job.main(args) == 0
    results = tmp_path / "rr" / "fault" / "ablation"
    table = pq.read_table(results / "results.parquet").to_pandas()
    assert list(table["status"]) == ["done"] and list(table["iterations"]) == [ablation_job.SMOKE_ITERATIONS]
    trial_dir = tmp_path / "rr" / "fault" / "trials" / "t00_k=5_s0"
    assert (trial_dir / "atss" / "fault_injected_2.json").is_file()  # it did fail at iteration 2
    assert not (trial_dir / "checkpoint_000000").exists()  # no Ray Train run: Tune kept the checkpoints

    client = MlflowClient(uri)
    exp = client.get_experiment_by_name("fault-test")
    children = client.search_runs([exp.experiment_id], "tags.`ablation.trial` = 't00_k=5_s0'")
    assert len(children) == 1 and children[0].info.status == "FINISHED"
    resumed = client.get_metric_history(children[0].info.run_id, "resumed_from_iteration")
    assert [(m.step, m.value) for m in resumed] == [(2, 2.0)]
    assert "eval/AP" in children[0].data.metrics


@pytest.mark.ray
@pytest.mark.timeout(600)
def test_the_sweep_driver_never_loads_torch(ray_cluster, tmp_path):
    """`python jobs/ablation.py` plans, starts, watches and reports the sweep without importing
    torch (about 0.5 GB in every process that does, docs/ablation.md "Footprint"); only the trials
    load it. Run as `ray job submit` would: a separate driver attached to this session's cluster."""
    env = {**os.environ, "RAY_ADDRESS": ray_cluster.get_runtime_context().gcs_address, "RAY_AUTH_MODE": "token"}
    cmd = [sys.executable, "-X", "importtime", str(REPO / "jobs" / "ablation.py"), "--smoke", "--values", "5",
           "--name", "light", "--storage-path", str(tmp_path / "rr"), "--mlflow-uri",
           f"sqlite:///{tmp_path / 'mlflow.db'}", "--quiet"]
    proc = subprocess.run(cmd, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=540)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    table = pq.read_table(tmp_path / "rr" / "light" / "ablation" / "results.parquet").to_pandas()
    assert list(table["status"]) == ["done"]  # the trial trained (with torch, in its own process)
    imported = {line.rsplit("|", 1)[-1].strip() for line in proc.stderr.splitlines()
                if line.startswith("import time:")}
    assert {"ray.tune", "mlflow", "pipeline.ablation.sweep", "pipeline.training.driver"} <= imported
    heavy = sorted(m for m in imported if m.split(".")[0] in ("torch", "torchvision") or m == "detector.model")
    assert not heavy, f"the driver imported {heavy[:10]}"


def test_progress_results_lead_with_the_table_columns():
    """Tune's table takes the first four numeric keys of the first results: iteration, images/s,
    AP (the latest evaluation's, None before) and the trial's ETA; the loss as mean_loss ("loss")."""
    from pipeline.training.reporting import TuneProgress

    progress = TuneProgress(max_iter=10)
    first = progress.result({"iteration": 1, "loss": 2.0, "loss_cls": 1.0, "images_per_s": 3.0})
    assert list(first)[:5] == ["iteration", "images_per_s", "AP", "eta_s", "mean_loss"]
    assert first["AP"] is None and first["eta_s"] is None and first["mean_loss"] == 2.0 and "loss" not in first
    evaluated = progress.result({"iteration": 5, "loss": 1.0, "images_per_s": 3.0, "AP": 0.25, "AP50": 0.5})
    assert evaluated["AP"] == 0.25 and evaluated["AP50"] == 0.5 and evaluated["eta_s"] >= 0
    later = progress.result({"iteration": 6, "loss": 1.0, "images_per_s": 3.0})
    assert later["AP"] == 0.25  # the latest known AP stays in the column
    # a 1-worker trial knows its batch: an ETA from the first report, at the loop's own rate
    one_worker = TuneProgress(max_iter=10, batch_size=6).result({"iteration": 4, "loss": 2.0, "images_per_s": 3.0})
    assert one_worker["eta_s"] == (10 - 4) * 6 / 3.0


def test_short_swept_keys_hold_the_trained_values(tmp_path):
    """param_space names the swept fields by their short names; the trial trains with the values
    under those keys (the planned config only supplies everything else)."""
    from pipeline.ablation import SweepConfig, plan_table
    from pipeline.ablation.sweep import PlannedTrials, param_space
    from pipeline.ablation.trial import trial_config

    config = SweepConfig(name="s", storage_path=str(tmp_path), mlflow_uri=f"sqlite:///{tmp_path}/m.db",
                         iterations=4).resolve_paths()
    plan = plan_table("k", "tiny", values="5,9", seeds=[0, 1], config=config)
    assert set(param_space(plan)) == {"topk", "seed"}
    suggested = PlannedTrials(plan).suggest("x")
    assert (suggested["topk"], suggested["seed"]) == (5, 0) and suggested["train"]["detector"]["topk"] == 5
    trial = trial_config({**suggested, "topk": 13, "seed": 7})
    assert trial.train.detector.topk == 13 and trial.train.seed == 7
    assert trial_config(suggested) == plan.trials[0]


def test_sweep_eta_line():
    from types import SimpleNamespace as T

    from pipeline.ablation.sweep import sweep_eta_line

    trials = [T(status="TERMINATED", last_result={"time_total_s": 100.0}),
              T(status="RUNNING", last_result={"time_total_s": 40.0, "eta_s": 60.0}),
              T(status="PENDING", last_result={})]
    assert sweep_eta_line(trials, 1) == "[sweep] 1/3 trials done, 1 running, 1 pending; ETA 0:02:40"
    assert sweep_eta_line(trials, 2) == "[sweep] 1/3 trials done, 1 running, 1 pending; ETA 0:01:20"
    starting = [T(status="RUNNING", last_result={}), T(status="PENDING", last_result={})]
    assert sweep_eta_line(starting, 1).endswith("ETA: after the first reports")
