"""MLflow helpers: absolute default store, one run lifecycle (never left RUNNING), params flattening, plots."""
import os

import pytest
from mlflow import MlflowClient

from pipeline import tracking
from pipeline.tracking import TrackingConfig, run_lifecycle


@pytest.fixture()
def store(tmp_path):
    # The file store takes ~0.1 s per run (SQLite needs ~7 s to create its schema); conftest allows it.
    return (tmp_path / "mlruns").as_uri()


def test_default_tracking_uri_is_absolute_and_honours_the_environment(tmp_path, monkeypatch):
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    assert tracking.default_tracking_uri(tmp_path) == f"sqlite:///{tmp_path.resolve()}/mlflow.db"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "http://127.0.0.1:5055")
    assert tracking.default_tracking_uri(tmp_path) == "http://127.0.0.1:5055"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "sqlite:///rel/m.db")
    assert tracking.default_tracking_uri(tmp_path) == f"sqlite:///{tmp_path.resolve()}/rel/m.db"
    assert tracking.absolute_tracking_uri("mlruns", tmp_path) == (tmp_path / "mlruns").resolve().as_uri()
    assert "mlflow ui --backend-store-uri sqlite:///" in tracking.ui_command("sqlite:////x/mlflow.db")


def test_flatten_config_nested_lists_none_and_long_values():
    flat = tracking.flatten_config({"a": {"b": 1, "c": {"d": (1, 2)}}, "e": None, "f": {}, "g": "x" * 7000})
    assert flat["a.b"] == "1" and flat["a.c.d"] == "[1, 2]" and flat["e"] == "None" and flat["f"] == "{}"
    assert len(flat["g"]) == tracking.MAX_PARAM_LENGTH and flat["g"].endswith("...")


def test_run_finishes_with_params_and_metrics(store):
    with run_lifecycle(TrackingConfig(store, "exp"), "ok", tags={"k": "v"}, activate=True) as run:
        rid = run.run_id
        tracking.log_params(rid, {f"p{i}": i for i in range(150)}, store)  # > one batch of 100
        tracking.log_metrics(rid, {"loss": 1.5, "nan": float("nan"), "flag": True}, step=3, tracking_uri=store)
    r = MlflowClient(store).get_run(rid)
    assert r.info.status == "FINISHED"
    assert len(r.data.params) == 150 and r.data.tags["k"] == "v"
    assert r.data.metrics == {"loss": 1.5}


def test_crashing_run_is_failed_with_the_error_and_reattaching_clears_it(store):
    with pytest.raises(RuntimeError, match="boom"):
        with run_lifecycle(TrackingConfig(store, "exp"), "crash", activate=True) as run:
            rid = run.run_id
            raise RuntimeError("boom at iteration 7")
    client = MlflowClient(store)
    r = client.get_run(rid)
    assert r.info.status == "FAILED"
    assert r.data.tags["error"] == "RuntimeError: boom at iteration 7"
    assert "error.txt" in [a.path for a in client.list_artifacts(rid)]
    # a retry re-attaches to the same run and ends it cleanly
    with run_lifecycle(TrackingConfig(store, "exp", run_id=rid), activate=True):
        assert client.get_run(rid).info.status == "RUNNING"
    r = client.get_run(rid)
    assert r.info.status == "FINISHED" and "error" not in r.data.tags


def test_interrupted_run_is_killed_and_driver_side_failure(store):
    with pytest.raises(KeyboardInterrupt):
        with run_lifecycle(TrackingConfig(store, "exp"), activate=True) as run:
            raise KeyboardInterrupt
    assert tracking.run_status(store, run.run_id) == "KILLED"
    rid = tracking.create_run(store, "exp", run_name="child", parent_run_id=run.run_id,
                              tags={"atss.key": "a'b"})
    tracking.mark_run_failed(store, rid, RuntimeError("worker died"))
    r = MlflowClient(store).get_run(rid)
    assert (r.info.status, r.data.tags["error"]) == ("FAILED", "RuntimeError: worker died")
    assert r.data.tags["mlflow.parentRunId"] == run.run_id


def test_lifecycle_without_activation_child_runs_unwrapped_errors_and_stops(store):
    parent = TrackingConfig(store, "exp", tags={"suite": "x"})
    with run_lifecycle(parent, "sweep") as sweep:
        assert sweep.status == "RUNNING"
        child = parent.replace(parent_run_id=sweep.run_id)
        wrapped = RuntimeError("wrapper")
        with pytest.raises(RuntimeError, match="wrapper"):
            with run_lifecycle(child, "trial", error_of=lambda e: ValueError("the worker's error")) as trial:
                raise wrapped
        # a run its caller already ended keeps that status
        with run_lifecycle(child, "stopped") as stopped:
            stopped.finish("KILLED")
    client = MlflowClient(store)
    t = client.get_run(trial.run_id)
    assert (t.info.status, t.data.tags["error"]) == ("FAILED", "ValueError: the worker's error")
    assert t.data.tags["mlflow.parentRunId"] == sweep.run_id and t.data.tags["suite"] == "x"
    assert client.get_run(stopped.run_id).info.status == "KILLED"
    assert sweep.status == "FINISHED"
    # attaching revives a run: RUNNING again, the error and the named tags cleared
    client.set_tag(trial.run_id, "ablation.stopped", "yes")
    with run_lifecycle(child.replace(run_id=trial.run_id), clear_tags=("ablation.stopped",)) as again:
        assert again.status == "RUNNING"
        tags = client.get_run(trial.run_id).data.tags
        assert "error" not in tags and "ablation.stopped" not in tags
    assert again.status == "FINISHED"
    with pytest.raises(SystemExit):
        with run_lifecycle(parent, "sigterm"):
            raise SystemExit(143)
    (killed,) = client.search_runs([client.get_experiment_by_name("exp").experiment_id],
                                   filter_string="attributes.run_name = 'sigterm'")
    assert killed.info.status == "KILLED"


def test_plots_are_pngs(tmp_path):
    p = tracking.plot_loss_curves({"loss": [(0, 2.0), (10, 1.0), (20, float("nan"))], "empty": []},
                                  tmp_path / "loss.png")
    q = tracking.plot_per_category_ap({"person": 0.5, "dog": 0.1, "none": -1.0}, tmp_path / "ap.png")
    r = tracking.plot_per_category_ap({}, tmp_path / "empty.png")
    for f in (p, q, r):
        assert f.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and os.path.getsize(f) > 1000


def test_experiments_are_marked_model_training_and_the_link_opens_the_runs_table(store):
    client = MlflowClient(store)
    exp_id = tracking.get_or_create_experiment("fresh", store)
    assert client.get_experiment(exp_id).tags[tracking.EXPERIMENT_KIND_TAG] == "custom_model_development"
    # an experiment made elsewhere gets the mark when we use it; one with a kind keeps its own
    older = client.create_experiment("older")
    genai = client.create_experiment("genai", tags={tracking.EXPERIMENT_KIND_TAG: "genai_development"})
    assert tracking.get_or_create_experiment("older", store) == older
    assert client.get_experiment(older).tags[tracking.EXPERIMENT_KIND_TAG] == "custom_model_development"
    tracking.get_or_create_experiment("genai", store)
    assert client.get_experiment(genai).tags[tracking.EXPERIMENT_KIND_TAG] == "genai_development"
    # MLflow 3.17's UI chooses the runs table by the workflowType query, not by the tag
    assert (tracking.runs_table_url("sqlite:////x/mlflow.db", "3")
            == "http://127.0.0.1:5000/#/experiments/3?workflowType=machine_learning")
    assert (tracking.runs_table_url("https://mlflow.example.org/", "7")
            == "https://mlflow.example.org/#/experiments/7?workflowType=machine_learning")
