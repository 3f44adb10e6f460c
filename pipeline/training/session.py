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
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any, Optional

import torch
import torch.distributed as dist

from pipeline import checkpoint as ckpt_lib
from pipeline.resources import compute_device, placement_tags

from .config import TrainConfig
from .reporting import TuneProgress, quiet_ray_train_reports
from .store import Store

__all__ = ["Session", "RaySession", "TuneSession", "LocalSession"]


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
        self.progress = TuneProgress(cfg.max_iter, cfg.batch_size)  # one worker: its images are the batch
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
