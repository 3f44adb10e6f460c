"""The main job end to end on the session's local Ray cluster: a 2-trial Tune sweep of Ray Train
trainings (tiny preset, tiny images, a few iterations), MLflow parent/child runs, the results table
in Markdown and Parquet, and the restore of a sweep by its name."""
from __future__ import annotations

import importlib.util
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
    assert sorted(grid["config/train/detector/topk"]) == [5, 9]
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
