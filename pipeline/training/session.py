"""Sessions: what differs between a Ray Train worker and a plain process.

A session knows the worker's rank, world size and device, finds the state to resume from, and
reports metrics (with a checkpoint) to whoever runs the loop. :class:`RaySession` talks to Ray Train
(``ray.train.get_checkpoint`` / ``ray.train.report``); :class:`TuneSession` is a Tune function
trainable that trains itself, one worker without Ray Train (``tune.get_checkpoint`` / ``tune.report``
with a ``tune.Checkpoint``: checkpoints and restarts go through Tune). :class:`LocalSession` keeps
checkpoints in ``<storage>/<run>/checkpoint_<iteration>`` itself (one process or ``torchrun`` ranks).
"""
from __future__ import annotations

import json
import logging
import os
import shutil
import tempfile
import time
from pathlib import Path
from typing import Any, Optional

import torch
import torch.distributed as dist

from pipeline import checkpoint as ckpt_lib
from pipeline.resources import compute_device, placement_tags

from .config import TrainConfig
from .store import Store

__all__ = ["Session", "RaySession", "TuneSession", "LocalSession", "TuneProgress", "ray_train_logging",
           "quiet_ray_train_reports", "quiet_ray_workers"]

# Train's autoscaling coordinator client warns, with a traceback, whenever its request to the
# coordinator actor takes over 5 s (the first request of every TorchTrainer on a loaded node, as the
# actor starts); on a fixed-size trial there is nothing to autoscale.
COORDINATOR_LOGGER = "ray.train.v2._internal.execution.scaling_policy.autoscaling_coordinator_client"


def ray_train_logging():
    """``ray.train.LoggingConfig`` at ``ATSS_RAY_TRAIN_LOG_LEVEL`` (default WARNING)."""
    import ray.train

    level = os.environ.get("ATSS_RAY_TRAIN_LOG_LEVEL", "WARNING")
    try:
        return ray.train.LoggingConfig(log_level=level)
    except ValueError as e:
        raise ValueError(f"ATSS_RAY_TRAIN_LOG_LEVEL={level!r}: {e}") from None


def quiet_ray_train_reports() -> None:
    """Apply ``ATSS_RAY_TRAIN_LOG_LEVEL`` to Ray Train's per-report line on this worker.

    Ray 2.60's ``execution/context.py`` names its logger after its file path instead of its module,
    so the line escapes ``LoggingConfig`` (which filters ``ray.train.*``) and prints every metric
    of every report from every rank. Without that module (another Ray version) nothing is changed.
    """
    try:
        from ray.train.v2._internal.execution import context
    except ImportError:
        return
    logging.getLogger(context.__file__).setLevel(ray_train_logging().log_level)


class _DemoteToDebug(logging.Filter):
    """Keep the record (Ray Train's system log file has no level filter and keeps it, traceback and
    all) but below the level of the console and the app log."""

    def filter(self, record: logging.LogRecord) -> bool:
        record.levelno = logging.DEBUG  # levelname stays WARNING in the file
        return True


def quiet_ray_workers() -> None:
    """Ray's ``worker_process_setup_hook`` for every process of a job (the TrainControllers
    included): the coordinator's timeouts go to Ray Train's log file only, not the console."""
    logging.getLogger(COORDINATOR_LOGGER).addFilter(_DemoteToDebug())


class TuneProgress:
    """Turns the loop's reports into Tune results whose first keys are the columns of Tune's
    progress table: ``iteration`` (the training's; Tune's own ``iter`` counts reports),
    ``images_per_s``, ``AP`` (the latest evaluation's, None before the first) and ``eta_s`` (this
    trial's remaining training time at its rate so far); the loss goes in as ``mean_loss``, which
    Tune shows as ``loss``. Tune picks its first four numeric keys for the table once, from the
    first results, so every result has them from the first on."""

    COLUMNS = ("iteration", "images_per_s", "AP", "eta_s", "mean_loss")

    def __init__(self, max_iter: int):
        self.max_iter = max_iter
        self.ap: Optional[float] = None
        self.start: Optional[tuple[float, int]] = None

    def result(self, metrics: dict) -> dict:
        it = int(metrics["iteration"])
        now = time.monotonic()
        if self.start is None:
            self.start = (now, it)
        t0, it0 = self.start
        if metrics.get("AP") is not None:
            self.ap = metrics["AP"]
        out = {"iteration": it, "images_per_s": metrics.get("images_per_s"), "AP": self.ap,
               "eta_s": (now - t0) / (it - it0) * (self.max_iter - it) if it > it0 else None,
               "mean_loss": metrics.get("loss")}
        out.update((k, v) for k, v in metrics.items() if k not in out and k != "loss")
        return out


def _write_checkpoint_dir(directory: Path, state: dict, files: Optional[dict]) -> None:
    ckpt_lib.save_state(state, directory)
    for name, src in (files or {}).items():
        Path(directory, name).write_bytes(Path(src).read_bytes())


class Session:
    """The loop's view of where it runs."""

    rank = 0
    world_size = 1
    local_rank = 0

    def __init__(self, cfg: TrainConfig):
        self.cfg = cfg
        self.store = Store(cfg.storage_path, cfg.run_name)

    @property
    def device(self) -> torch.device:
        if torch.cuda.is_available():
            return torch.device("cuda", self.local_rank)
        return torch.device("cpu")

    def placement_tags(self) -> dict[str, str]:
        """Where this worker runs, for its MLflow run (Ray workers: node id and type, compute device)."""
        return {}

    def default_threads(self) -> Optional[int]:
        """Intra-op threads when ``TrainConfig.torch_threads`` is None (None: leave torch's choice)."""
        return None

    def latest_state(self) -> Optional[dict]:
        """The state of the latest checkpoint of this run (None: start from scratch)."""
        raise NotImplementedError

    def checkpoint_metrics(self) -> dict:
        """Metrics saved with the latest checkpoint (plain runs; Ray's driver has ``result.metrics``)."""
        return {}

    def latest_checkpoint_path(self) -> Optional[str]:
        return None

    def report(self, metrics: dict, checkpoint: bool = False, state: Optional[dict] = None,
               files: Optional[dict] = None) -> Optional[str]:
        """Report metrics; all ranks call it equally often and with the same ``checkpoint`` flag.
        With ``checkpoint``, rank 0 passes the ``state`` to save (``state.pt`` plus ``files``:
        ``{name: local path}``). Returns the checkpoint location where known."""
        raise NotImplementedError


class RaySession(Session):
    """A Ray Train V2 worker."""

    def __init__(self, cfg: TrainConfig):
        import ray.train

        super().__init__(cfg)
        quiet_ray_train_reports()
        ctx = ray.train.get_context()
        self.rank, self.world_size, self.local_rank = (ctx.get_world_rank(), ctx.get_world_size(),
                                                       ctx.get_local_rank())

    @property
    def device(self) -> torch.device:
        import ray
        import ray.train.torch

        # GPU workers compute on CUDA unless the cluster declares CPU (the local rehearsal's
        # simulated GPUs); a GPU worker without CUDA otherwise raises instead of falling back.
        if compute_device(bool(ray.get_gpu_ids()), torch.cuda.is_available()) == "cpu":
            return torch.device("cpu")
        return ray.train.torch.get_device()

    def placement_tags(self) -> dict[str, str]:
        return placement_tags()

    def ray_checkpoint(self):
        import ray.train

        return ray.train.get_checkpoint()

    def ray_report(self, metrics: dict, checkpoint_dir: Optional[str]) -> None:
        import ray.train

        checkpoint = ray.train.Checkpoint.from_directory(checkpoint_dir) if checkpoint_dir else None
        ray.train.report(metrics, checkpoint=checkpoint)

    def latest_state(self) -> Optional[dict]:
        ck = self.ray_checkpoint()
        if ck is None:
            return None
        with ck.as_directory() as d:
            return ckpt_lib.load_state(d)

    def report(self, metrics, checkpoint=False, state=None, files=None):
        with tempfile.TemporaryDirectory(prefix="atss_ckpt_") as tmp:
            saved = checkpoint and state is not None  # rank 0 uploads; the others only take part
            if saved:
                _write_checkpoint_dir(Path(tmp), state, files)
            self.ray_report(metrics, tmp if saved else None)
        return None


class TuneSession(Session):
    """A Tune function trainable that runs the loop itself: one worker, no Ray Train actors.

    Checkpoints are ``tune.Checkpoint`` s in the trial's directory (kept by the Tuner's
    ``CheckpointConfig``); after a failure Tune restarts the trial (``FailureConfig(max_failures)``)
    and :meth:`latest_state` reads ``tune.get_checkpoint()``, as does a restored sweep."""

    def __init__(self, cfg: TrainConfig):
        super().__init__(cfg)
        self.progress = TuneProgress(cfg.max_iter)
        self.checkpoint_path: Optional[str] = None
        self.metrics_of_checkpoint: dict = {}

    @property
    def device(self) -> torch.device:
        import ray

        gpus = ray.get_gpu_ids()  # the trial's own GPU (Tune sets CUDA_VISIBLE_DEVICES to it)
        if compute_device(bool(gpus), torch.cuda.is_available()) == "cuda":
            return torch.device("cuda", 0)
        return torch.device("cpu")

    def placement_tags(self) -> dict[str, str]:
        return placement_tags()

    def default_threads(self) -> Optional[int]:
        """The trial's CPUs (at least 1), as Ray Train gives its workers. Ray sets ``OMP_NUM_THREADS`` for
        an actor only when the variable is not set at all, and several trials that each use every core
        oversubscribe the machine: the demo's three trials on two cores ran 7x slower before this (and
        ``OMP_WAIT_POLICY=PASSIVE`` in jobs/ablation.py) were set."""
        import math

        import ray

        return max(1, math.floor(ray.get_runtime_context().get_assigned_resources().get("CPU", 1)))

    def latest_state(self) -> Optional[dict]:
        from ray import tune

        ck = tune.get_checkpoint()
        if ck is None:
            return None
        self.checkpoint_path = ck.path
        with ck.as_directory() as d:
            if Path(d, "metrics.json").is_file():
                self.metrics_of_checkpoint = json.loads(Path(d, "metrics.json").read_text())
            return ckpt_lib.load_state(d)

    def latest_checkpoint_path(self) -> Optional[str]:
        return self.checkpoint_path

    def checkpoint_metrics(self) -> dict:
        return self.metrics_of_checkpoint

    def report(self, metrics, checkpoint=False, state=None, files=None):
        from ray import tune

        result = self.progress.result(metrics)
        if not checkpoint:
            tune.report(result)
            return None
        with tempfile.TemporaryDirectory(prefix="atss_ckpt_") as tmp:
            _write_checkpoint_dir(Path(tmp), state, files)
            Path(tmp, "metrics.json").write_text(json.dumps(metrics, indent=1, default=str))
            tune.report(result, checkpoint=tune.Checkpoint.from_directory(tmp))
        return None


class LocalSession(Session):
    """A plain process (or a ``torchrun`` rank): checkpoints in ``<storage>/<run>/checkpoint_<iter>``."""

    def __init__(self, cfg: TrainConfig):
        super().__init__(cfg)
        if not self.store.is_local:
            raise ValueError(f"training without Ray (num_workers=0) needs a local storage_path, "
                             f"got {cfg.storage_path!r}")
        if int(os.environ.get("WORLD_SIZE", "1")) > 1 and not dist.is_initialized():
            dist.init_process_group("nccl" if torch.cuda.is_available() else "gloo")  # torchrun
        if dist.is_initialized():
            self.rank, self.world_size = dist.get_rank(), dist.get_world_size()
            self.local_rank = int(os.environ.get("LOCAL_RANK", self.rank))

    def _checkpoints(self) -> list[Path]:
        root = self.store.local_path()
        found = sorted(root.glob("checkpoint_*[0-9]")) if root.is_dir() else []
        return [p for p in found if (p / ckpt_lib.STATE_FILE).is_file()]

    def latest_state(self):
        found = self._checkpoints()
        return ckpt_lib.load_state(found[-1]) if found else None

    def latest_checkpoint_path(self):
        found = self._checkpoints()
        return str(found[-1]) if found else None

    def checkpoint_metrics(self):
        path = self.latest_checkpoint_path()
        if path and Path(path, "metrics.json").is_file():
            return json.loads(Path(path, "metrics.json").read_text())
        return {}

    def report(self, metrics: dict[str, Any], checkpoint=False, state=None, files=None):
        if not checkpoint:
            return None
        path = self.store.local_path(f"checkpoint_{int(metrics['iteration']):09d}")
        if self.rank == 0:
            tmp = path.with_name(path.name + ".tmp")
            _write_checkpoint_dir(tmp, state, files)
            (tmp / "metrics.json").write_text(json.dumps(metrics, indent=1))
            if path.exists():  # the same iteration saved again (a resumed, finished run)
                shutil.rmtree(path)
            os.replace(tmp, path)
            for old in self._checkpoints()[: -self.cfg.checkpoints_to_keep]:
                shutil.rmtree(old, ignore_errors=True)
        if dist.is_initialized():
            dist.barrier()
        return str(path)
