"""The driver: checks what would fail inside a worker, opens the MLflow run, and trains.

:func:`run_training` trains a :class:`TrainConfig` on a Ray Train ``TorchTrainer`` (built by
:func:`build_trainer`, which the sweeps also fit inside their Tune trials) or, with
``num_workers=0``, in this process without Ray. :func:`tracked_training` is the run's MLflow
lifecycle on the driver side: the run exists (and its id is in the config the workers get) before
any worker starts, and ends FINISHED, FAILED with the worker's own error, or KILLED on a stop.
"""
from __future__ import annotations

import contextlib
import json
import os
import re
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterator, Optional

from pipeline import tracking
from pipeline.data import resolve_split
from pipeline.resources import torch_backend

from .config import TrainConfig, read_categories
from .reporting import ray_train_logging
from .store import Store, known_mlflow_run, remember_mlflow_run

__all__ = ["TrainResult", "run_training", "build_trainer", "tracked_training", "connect_ray", "worker_error",
           "check_data_paths", "check_workers", "has_checkpoints"]

@dataclass
class TrainResult:
    run_name: str
    run_dir: str
    iteration: int
    metrics: dict  # last reported metrics (losses, lr, images/s and the final AP metrics)
    checkpoint_path: Optional[str]
    mlflow_run_id: Optional[str]
    tracking_uri: Optional[str]
    wall_s: float  # the whole call, worker start-up and evaluation included
    eval: Optional[dict] = None  # final COCO metrics incl. per_category
    train_images_per_s: Optional[float] = None  # global images/s of the loop (data + steps only)
    summary: dict = field(default_factory=dict)  # rank 0's full summary (see worker.train_worker)

    @property
    def ap(self) -> Optional[float]:
        return self.eval["AP"] if self.eval else self.metrics.get("AP")


# ----------------------------------------------------------------------------------------------
# checks before any worker starts
# ----------------------------------------------------------------------------------------------
def check_workers(cfg: TrainConfig, num_workers: int) -> None:
    """The global batch must split evenly over the workers."""
    world = max(num_workers, 1)
    if cfg.batch_size % world:
        raise ValueError(f"batch_size {cfg.batch_size} (global) is not divisible by {world} workers; "
                         f"use a multiple of {world}")


def check_data_paths(cfg: TrainConfig) -> None:
    """The train (and, when evaluating, val) annotation file and image folder must exist.

    A synthetic source is generated here once (cached), so workers never race to create it."""
    splits = ["train"] + (["val"] if cfg.evaluates else [])
    for split in splits:
        hint = " (evaluation needs the val split; --no-eval / eval_at_end=False skips it)" if split == "val" else ""
        try:
            ann, images = resolve_split(cfg.data, split)
        except (ValueError, FileNotFoundError) as e:
            raise type(e)(f"data for the {split} split: {e}{hint}") from None
        if "://" in ann:
            continue
        if not Path(ann).is_file():
            raise FileNotFoundError(f"{split} annotation file not found: {ann} (data source "
                                    f"{cfg.data.source!r}){hint}")
        if not Path(images).is_dir():
            raise FileNotFoundError(f"{split} image folder not found: {images} (data source "
                                    f"{cfg.data.source!r}){hint}")
        read_categories(cfg.data, split)  # the file parses as COCO here, not first in a worker


def has_checkpoints(store: Store) -> bool:
    """Ray's (or a plain run's) ``checkpoint_*`` folders exist in the run directory."""
    return any(e.is_dir and e.name.startswith("checkpoint_") and not e.name.endswith(".tmp") for e in store.list())


# ----------------------------------------------------------------------------------------------
# Ray
# ----------------------------------------------------------------------------------------------
def _driver_env() -> None:
    # report() blocks one health-check interval (2 s by default, RAY_NOTES section 0); prints once.
    os.environ.setdefault("RAY_TRAIN_HEALTH_CHECK_INTERVAL_S", "0.2")
    os.environ.setdefault("RAY_TRAIN_ENABLE_PRINT_PATCH", "0")


def connect_ray(**init_kwargs) -> None:
    """``ray.init()`` on the cluster named by ``RAY_ADDRESS`` (set under ``ray job submit``), or on a
    new local one when it is unset.

    Ray Train's placement-group cleaner runs in its own actor and finds its cluster through
    ``RAY_ADDRESS``, else by scanning this machine's processes, which fails when several Ray clusters
    run here. So when the address is a GCS ``host:port``, every task and actor of this job gets it
    through the job's runtime env. Ray merges that with the runtime env the job was submitted with;
    a job that sets ``RAY_ADDRESS`` itself keeps its own.
    """
    import ray

    address = os.environ.get("RAY_ADDRESS", "")
    runtime_env = None
    if re.fullmatch(r"[\w.\-]+:\d+", address):
        submitted = json.loads(os.environ.get("RAY_JOB_CONFIG_JSON_ENV_VAR") or "{}")
        submitted_vars = (submitted.get("runtime_env") or {}).get("env_vars") or {}
        if "RAY_ADDRESS" not in submitted_vars:
            runtime_env = {"env_vars": {"RAY_ADDRESS": address}}
    ray.init(runtime_env=runtime_env, **init_kwargs)


def build_trainer(cfg: TrainConfig, num_workers: int = 2, use_gpu: bool = False,
                  resources_per_worker: Optional[dict] = None, max_failures: int = 0,
                  callbacks: Optional[list] = None, scaling_kwargs: Optional[dict] = None,
                  train_loop: Optional[Callable[[dict], Any]] = None):
    """A ``TorchTrainer`` for ``cfg`` (``train_loop_config = cfg.to_dict()``) running ``train_loop``
    (default :func:`~pipeline.training.worker.train_loop_per_worker`); the sweeps call ``.fit()``
    on it inside their Tune trials (with ``callbacks=[TuneReportCallback()]``)."""
    # The trainer and the loop load torch; imported where a trainer is built, so that this module
    # (connect_ray, check_data_paths, tracked_training) leaves a sweep's driver torch-free.
    import ray.train
    from ray.train.torch import TorchConfig, TorchTrainer

    from .worker import train_loop_per_worker

    _driver_env()
    check_workers(cfg, num_workers)
    scaling = dict(num_workers=num_workers, use_gpu=use_gpu)
    if resources_per_worker is not None:
        scaling["resources_per_worker"] = resources_per_worker
    scaling.update(scaling_kwargs or {})
    run_config = ray.train.RunConfig(
        name=cfg.run_name, storage_path=cfg.storage_path,
        failure_config=ray.train.FailureConfig(max_failures=max_failures),
        checkpoint_config=ray.train.CheckpointConfig(num_to_keep=cfg.checkpoints_to_keep,
                                                     checkpoint_score_attribute="iteration",
                                                     checkpoint_score_order="max"),
        callbacks=callbacks or None,
        # Ray Train logs every report and checkpoint at INFO on each worker's console; the loop
        # prints its own progress. Ray's system log files under logs/train/ keep every level.
        logging_config=ray_train_logging(),
    )
    return TorchTrainer(train_loop or train_loop_per_worker, train_loop_config=cfg.to_dict(),
                        torch_config=TorchConfig(backend=torch_backend(use_gpu)),
                        scaling_config=ray.train.ScalingConfig(**scaling), run_config=run_config)


def worker_error(error: BaseException) -> BaseException:
    """The first worker's exception inside a Ray ``WorkerGroupError`` (else ``error``)."""
    failures = getattr(error, "worker_failures", None)
    if failures:
        return failures[min(failures)]
    return error


# ----------------------------------------------------------------------------------------------
# the run
# ----------------------------------------------------------------------------------------------
@contextlib.contextmanager
def tracked_training(cfg: TrainConfig, run_name: Optional[str] = None,
                     clear_tags: tuple[str, ...] = ()) -> Iterator[TrainConfig]:
    """The run's MLflow lifecycle around training, from the driver (or a Tune trial).

    Yields ``cfg`` carrying the run id (``cfg.mlflow.run_id``): the run the config names, else the
    one this run directory already has (a resumed run continues it), else a new one (named
    ``run_name`` or the run name). Ends it FINISHED, FAILED with the worker's own error, or KILLED
    on a stop; a no-op without MLflow.
    """
    if cfg.mlflow is None:
        yield cfg
        return
    store = Store(cfg.storage_path, cfg.run_name)
    mlflow = cfg.mlflow
    if mlflow.run_id is None:
        mlflow = mlflow.replace(run_id=known_mlflow_run(store, mlflow.uri))
    with tracking.run_lifecycle(mlflow, run_name or cfg.run_name, tags={"atss.run_dir": store.uri},
                                clear_tags=clear_tags, error_of=worker_error) as run:
        remember_mlflow_run(store, run.uri, run.run_id)
        yield cfg.replace(mlflow=mlflow.replace(run_id=run.run_id))


def run_training(cfg: TrainConfig, num_workers: int = 2, use_gpu: bool = False, max_failures: int = 0,
                 resources_per_worker: Optional[dict] = None, callbacks: Optional[list] = None,
                 require_resume: bool = False, verbose: bool = True) -> TrainResult:
    """Train ``cfg`` and return the final metrics, checkpoint and MLflow run.

    ``num_workers >= 1``: a Ray Train ``TorchTrainer`` (connects to ``RAY_ADDRESS`` or starts a local
    Ray); ``num_workers=0``: this process, no Ray at all. A run name that already has checkpoints
    resumes from the latest one (``require_resume`` makes their absence an error). The data paths
    and the worker count are checked before anything starts.
    """
    t0 = time.perf_counter()
    check_workers(cfg, num_workers)
    check_data_paths(cfg)
    store = Store(cfg.storage_path, cfg.run_name)
    previous = has_checkpoints(store)
    if require_resume and not previous:
        raise FileNotFoundError(f"nothing to resume: no checkpoint under {store.uri}")
    leader = num_workers > 0 or int(os.environ.get("RANK", "0")) == 0  # torchrun: rank 0 is the driver
    say = print if verbose and leader else (lambda *a, **k: None)
    say(f"[driver] run {cfg.run_name}: {'resuming from ' if previous else 'checkpoints to '}{store.uri}")
    say(f"[driver] {cfg.schedule.describe()}; {max(num_workers, 1)} worker(s) x "
        f"{cfg.batch_size // max(num_workers, 1)} images; "
        f"{'fp32' if cfg.amp is None else cfg.amp + ' autocast (evaluation in fp32)'}")

    tracked = tracked_training(cfg) if leader else contextlib.nullcontext(cfg)
    with tracked as cfg:
        if cfg.mlflow is not None and cfg.mlflow.run_id is not None:
            say(f"[driver] MLflow run {cfg.mlflow.run_id} in {cfg.mlflow.uri} (experiment "
                f"{cfg.mlflow.experiment!r}); view with: {tracking.ui_command(cfg.mlflow.uri)}")
        try:
            summary, metrics, checkpoint_path = _fit(cfg, num_workers, use_gpu, max_failures,
                                                     resources_per_worker, callbacks)
        except BaseException as e:
            cause = worker_error(e)
            if cause is not e and isinstance(cause, Exception):
                raise cause from e  # the worker's own error (e.g. NonFiniteLossError), not Ray's wrapper
            raise
    run_id = cfg.mlflow.run_id if cfg.mlflow else None
    res = TrainResult(run_name=cfg.run_name, run_dir=store.uri,
                      iteration=int(summary.get("iteration", metrics.get("iteration", 0))),
                      metrics=metrics, checkpoint_path=checkpoint_path, mlflow_run_id=run_id,
                      tracking_uri=cfg.mlflow.uri if cfg.mlflow else None, wall_s=time.perf_counter() - t0,
                      eval=summary.get("eval"), train_images_per_s=summary.get("train_images_per_s"),
                      summary=dict(summary))
    if res.ap is not None:
        say(f"[driver] finished at iteration {res.iteration}: COCO AP {res.ap:.4f}; checkpoint {checkpoint_path}")
    return res


def _fit(cfg: TrainConfig, num_workers: int, use_gpu: bool, max_failures: int,
         resources_per_worker: Optional[dict], callbacks: Optional[list]) -> tuple[dict, dict, Optional[str]]:
    """(rank 0's summary, the last reported metrics, the checkpoint) of one fit."""
    if num_workers == 0:
        from .worker import train_in_process  # this process trains: torch loads here (build_trainer)

        summary = train_in_process(cfg)
        return summary, dict(summary.get("metrics") or {}), summary.get("checkpoint")
    import ray

    _driver_env()
    if not ray.is_initialized():
        # Train V2 passes the RAY_TRAIN_* variables on to its controller and workers.
        connect_ray()
    result = build_trainer(cfg, num_workers, use_gpu, resources_per_worker, max_failures, callbacks).fit()
    checkpoint = result.checkpoint.path if result.checkpoint is not None else None
    return result.return_value or {}, dict(result.metrics or {}), checkpoint
