"""The same machine, config and seed give bit-identical weights whatever the timing, and every run
records the environment its numbers depend on (issue 14).

Timing is what differs between two runs of one command on one machine: the data loader's worker
processes deliver batches early or late, and other processes take the CPU away at random moments.
None of it may reach the numbers. Every run here trains the tiny detector in this process with
one intra-op thread (the thread count is part of the recorded environment, not of the timing),
and every tensor of the weights is compared with ``torch.equal``. Across CPU types the numbers do
differ (other kernels): docs/ablation.md, "Reproducibility", and ``bench/reproducibility.py``.
Exact resume (a killed run continued from its checkpoint equals the straight run) is tested in
tests/test_train.py.
"""
from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import torch
from mlflow import MlflowClient

from pipeline import checkpoint as ck
from pipeline.environment import Environment, collect_environment, data_fingerprint
from pipeline.training import build_train_config, run_training

ITERATIONS, CHECKPOINT_PERIOD = 6, 3
SMALL_DATA = dict(synthetic_train_images=24, synthetic_val_images=4, synthetic_image_size=[96, 128],
                  train_min_size=(80, 96), test_min_size=96, max_size=128)


@pytest.fixture(scope="module")
def data_cache(tmp_path_factory):
    return str(tmp_path_factory.mktemp("synthetic_cache"))


def _train(tmp_path: Path, data_cache: str, name: str, loader_workers: int) -> dict[int, dict[str, torch.Tensor]]:
    """The weights after every checkpoint ({iteration: state_dict}) of one short run."""
    cfg = build_train_config(preset="tiny", batch_size=2, iterations=ITERATIONS, checkpoint_period=CHECKPOINT_PERIOD,
                             log_period=0, eval_at_end=False, storage_path=str(tmp_path / "runs"), run_name=name,
                             mlflow_enabled=False, torch_threads=1, seed=3,
                             data={**SMALL_DATA, "cache_dir": data_cache, "num_workers": loader_workers})
    result = run_training(cfg, num_workers=0, verbose=False)
    assert result.iteration == ITERATIONS
    return {int(p.name.rsplit("_", 1)[1]): ck.load_state(p)["model"]
            for p in sorted(Path(result.run_dir).glob("checkpoint_*"))}


def _differences(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> list[str]:
    assert a.keys() == b.keys()
    return [f"{k}: max |diff| {(a[k].double() - b[k].double()).abs().max().item():.3g}"
            for k in a if not torch.equal(a[k], b[k])]


def test_same_seed_same_weights_whatever_the_loader_workers_and_the_load(tmp_path, data_cache):
    reference = _train(tmp_path, data_cache, "in_process_loader", loader_workers=0)
    assert sorted(reference) == [CHECKPOINT_PERIOD, ITERATIONS]
    # the weights moved between the checkpoints, so equality below means the same training, not none
    assert _differences(reference[CHECKPOINT_PERIOD], reference[ITERATIONS])

    # batches made ahead of time by two loader processes, in whatever order they finish
    prefetched = _train(tmp_path, data_cache, "two_loader_workers", loader_workers=2)
    # and again while two busy processes compete for the (2) cores at random moments
    busy = [subprocess.Popen([sys.executable, "-c", "while True: pass"]) for _ in range(2)]
    try:
        contended = _train(tmp_path, data_cache, "two_loader_workers_busy_cpu", loader_workers=2)
    finally:
        for p in busy:
            p.kill()
            p.wait()
    for name, run in (("2 loader workers", prefetched), ("2 loader workers, busy CPU", contended)):
        assert sorted(run) == sorted(reference)
        for it in reference:
            diff = _differences(reference[it], run[it])
            assert not diff, f"{name}: weights at iteration {it} differ from the reference run: {diff[:5]}"


def test_every_run_records_its_environment_in_mlflow(tmp_path, data_cache):
    """What the numbers depend on (CPU kernels, threads, versions, data) is in the run's params and tags."""
    store = f"sqlite:///{tmp_path / 'mlflow.db'}"
    cfg = build_train_config(preset="tiny", batch_size=2, iterations=1, checkpoint_period=0, log_period=1,
                             eval_at_end=False, storage_path=str(tmp_path / "runs"), run_name="recorded",
                             mlflow_uri=store, log_model=False, torch_threads=1,
                             data={**SMALL_DATA, "cache_dir": data_cache})
    result = run_training(cfg, num_workers=0, verbose=False)
    run = MlflowClient(store).get_run(result.mlflow_run_id)
    # the run trained in this process: its environment is this one (1 thread, this CPU, this data)
    expected = collect_environment("cpu", cfg.data)
    assert Environment.from_tags(run.data.tags) == expected
    params = run.data.params
    assert {k: params[k] for k in expected.to_params()} == expected.to_params()
    assert params["env.cpu_capability"] == torch.backends.cpu.get_cpu_capability() and params["env.threads"] == "1"
    assert params["env.data"] == data_fingerprint(cfg.data).digest
    assert run.data.tags["env.footer"].startswith(f"Environment {expected.key()}: ")
