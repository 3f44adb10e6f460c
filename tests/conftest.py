"""Shared fixtures: the real COCO slices beside the checkout, and one local Ray cluster per session."""
from __future__ import annotations

import os
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
SHARED_DATA = Path(os.environ.get("ATSS_SHARED_DATA", REPO.parent / "shared" / "data"))

# Ray Train's report() blocks for one health-check interval (2 s by default); see RAY_NOTES.md.
os.environ.setdefault("RAY_TRAIN_HEALTH_CHECK_INTERVAL_S", "0.2")
os.environ.setdefault("RAY_TRAIN_ENABLE_PRINT_PATCH", "0")
os.environ.setdefault("MLFLOW_ALLOW_FILE_STORE", "true")
# Idle OpenMP threads spin on cores other processes (Ray workers) need; see docs/training.md.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")


@pytest.fixture(autouse=True)
def _one_torch_thread():
    """One intra-op thread per test: on 2 shared cores, OpenMP barriers make 2 threads many times slower."""
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="session")
def shared_data() -> Path:
    """The folder of real COCO 2017 slices; tests that need it skip when it is absent."""
    if not (SHARED_DATA / "coco_tiny").is_dir():
        pytest.skip(f"real COCO slices not found at {SHARED_DATA}")
    return SHARED_DATA


@pytest.fixture(scope="session")
def ray_cluster(tmp_path_factory):
    """One local Ray cluster for the whole test session (starting one costs ~7 s and ~0.7 GB)."""
    import ray

    if not ray.is_initialized():
        ray.init(
            num_cpus=2,
            object_store_memory=300 * 1024 * 1024,
            include_dashboard=True,  # keeps the placement-group cleaner alive (RAY_NOTES section 0)
            log_to_driver=True,
            runtime_env={"env_vars": {
                "RAY_TRAIN_HEALTH_CHECK_INTERVAL_S": "0.2",
                "RAY_TRAIN_ENABLE_PRINT_PATCH": "0",
                "PYTHONPATH": str(REPO),
            }},
        )
    yield ray
    ray.shutdown()
