"""Ray Train V2 runs of the training loop: 2 CPU workers (gloo DDP), checkpoints, MLflow, fault tolerance.

Each TorchTrainer fit costs ~20-40 s here, so the file holds exactly two.
"""
from pathlib import Path

import pytest
import torch
from mlflow import MlflowClient

from pipeline import checkpoint as ck
from pipeline.training import build_train_config, run_training

pytestmark = pytest.mark.ray

SMALL_DATA = dict(synthetic_train_images=32, synthetic_val_images=8, synthetic_image_size=[96, 128],
                  train_min_size=96, test_min_size=96, max_size=128)


@pytest.fixture(scope="module")
def data_cache(tmp_path_factory):
    return str(tmp_path_factory.mktemp("synthetic_cache"))


def _history(client, run_id, key):
    return [m.value for m in sorted(client.get_metric_history(run_id, key), key=lambda m: m.step)]


def test_two_worker_run_trains_checkpoints_evaluates_and_logs(ray_cluster, tmp_path, data_cache):
    store = (tmp_path / "mlruns").as_uri()
    cfg = build_train_config(preset="tiny", batch_size=4, iterations=24, base_lr=0.04, log_period=4,
                             checkpoint_period=12, storage_path=str(tmp_path / "runs"), run_name="two_workers",
                             mlflow_uri=store, mlflow_experiment="train_test", mlflow_tags={"suite": "ray"},
                             data={**SMALL_DATA, "cache_dir": data_cache})
    res = run_training(cfg, num_workers=2)

    # the loop ran to the end on 2 workers, and the final AP came back through the checkpoint's report
    assert res.iteration == 24 and res.metrics["iteration"] == 24
    assert 0.0 <= res.metrics["AP"] <= 1.0 and res.eval is not None and res.eval["AP"] == res.metrics["AP"]
    # a real checkpoint, reloadable as a detector
    model, det_cfg, meta = ck.load_detector(res.checkpoint_path)
    assert meta["iteration"] == 24 and det_cfg.num_classes == 5
    assert (Path(res.checkpoint_path) / "results.json").is_file()
    state = ck.load_state(res.checkpoint_path)
    assert len(state["rng"]["per_rank"]) == 2 and "optimizer" in state and "scheduler" in state

    client = MlflowClient(store)
    run = client.get_run(res.mlflow_run_id)
    assert run.info.status == "FINISHED"
    p = run.data.params
    assert p["train.batch_size"] == "4" and p["num_workers"] == "2" and p["batch_per_worker"] == "2"
    assert p["detector.topk"] == "9" and p["schedule.base_lr"] == "0.01"  # 0.04 @ 16 -> 0.01 @ 4
    assert run.data.tags["suite"] == "ray"
    losses = _history(client, res.mlflow_run_id, "train/loss")
    assert len(losses) >= 5 and losses[-1] < losses[0], f"losses did not fall: {losses}"
    for key in ("train/lr", "train/images_per_s", "assign/pos_per_gt", "assign/gt_without_pos",
                "assign/pos_level_0", "eval/AP", "eval/AP50", "eval/APl"):
        assert key in run.data.metrics, key
    arts = {a.path for d in ("", "config", "eval", "plots") for a in client.list_artifacts(res.mlflow_run_id, d or None)}
    assert {"config/train_config.json", "config/detector_config.json", "eval/results_iter_000000024.json",
            "plots/loss_curves.png", "plots/ap_per_category.png"} <= arts
    # the final model through mlflow.pytorch (a logged model of the run) loads back with the same weights
    logged, _, _ = ck.load_detector(f"runs:/{res.mlflow_run_id}/model", tracking_uri=store)
    a, b = model.state_dict(), logged.state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_worker_failure_resumes_from_the_last_checkpoint(ray_cluster, tmp_path, data_cache):
    store = (tmp_path / "mlruns").as_uri()
    cfg = build_train_config(preset="tiny", batch_size=4, iterations=8, checkpoint_period=3, log_period=1,
                             eval_at_end=False, log_model=False, fail_at_iteration=5,
                             storage_path=str(tmp_path / "runs"), run_name="faulty", mlflow_uri=store,
                             data={**SMALL_DATA, "cache_dir": data_cache})
    res = run_training(cfg, num_workers=2, max_failures=1)

    assert res.iteration == 8 and res.metrics["iteration"] == 8
    assert ck.load_state(res.checkpoint_path)["iteration"] == 8
    assert (tmp_path / "runs" / "faulty" / "atss" / "fault_injected_5.json").is_file()
    run = MlflowClient(store).get_run(res.mlflow_run_id)
    assert run.info.status == "FINISHED" and "error" not in run.data.tags
    # rank 1 died before iteration 5; the group restarted from the checkpoint at 3: steps 3-4 redone, none lost
    assert run.data.metrics["resumed_from_iteration"] == 3
    steps = sorted({m.step for m in MlflowClient(store).get_metric_history(res.mlflow_run_id, "train/loss")})
    assert steps == list(range(1, 9))


def test_ray_train_console_shows_warnings_by_default_and_names_a_bad_level(tmp_path, monkeypatch):
    from pipeline.training import build_trainer

    cfg = build_train_config(preset="tiny", batch_size=2, iterations=2, storage_path=str(tmp_path),
                             run_name="logging", mlflow_uri=None)
    monkeypatch.delenv("ATSS_RAY_TRAIN_LOG_LEVEL", raising=False)
    assert build_trainer(cfg, num_workers=1).run_config.logging_config.log_level == "WARNING"
    monkeypatch.setenv("ATSS_RAY_TRAIN_LOG_LEVEL", "info")
    assert build_trainer(cfg, num_workers=1).run_config.logging_config.log_level == "INFO"
    monkeypatch.setenv("ATSS_RAY_TRAIN_LOG_LEVEL", "LOUD")
    with pytest.raises(ValueError, match="ATSS_RAY_TRAIN_LOG_LEVEL='LOUD'"):
        build_trainer(cfg, num_workers=1)
