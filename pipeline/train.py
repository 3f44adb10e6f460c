"""Training: one loop for Ray Train V2 workers and for a plain process, plus the driver around it.

* :class:`TrainConfig`: everything a run needs (validated; ``from_dict`` names unknown keys).
* :func:`train_loop_per_worker`: the Ray Train loop (``TorchTrainer(train_loop_per_worker, ...)``);
  DDP over gloo (CPU) or NCCL (GPU) is set up by Ray Train.
* :func:`run_training`: the driver. Validates the config and data paths before any worker starts,
  creates the MLflow run, builds the ``TorchTrainer`` (:func:`build_trainer`, also used by the Tune
  sweeps) and fits it; ``num_workers=0`` runs the same loop in this process without Ray (a GPU box
  without Ray, unit tests; ``torchrun`` works too).

What a run does (the paper's recipe, spec sections 3.6 and 5): SGD with biases at LR x2 and no
decay, constant 1/3 warm-up, step decay, linear scaling of LR and schedule with the global batch;
loss normalisers averaged over workers (inside the detector's losses) so 1 worker x 16 images and
8 workers x 2 images give the same loss; bf16 autocast on CUDA; a non-finite loss or gradient stops
the run with :class:`NonFiniteLossError` and leaves the last good checkpoint in place; checkpoints
every ``checkpoint_period`` iterations through ``ray.train.Checkpoint`` (model, optimiser, scheduler,
iteration, every rank's RNG state, and the data position) so a restarted worker group continues at
the exact iteration; COCO evaluation sharded over workers every ``eval_period`` iterations and at
the end; MLflow logging from rank 0.
"""
from __future__ import annotations

import contextlib
import copy
import dataclasses
import datetime
import hashlib
import json
import math
import os
import re
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Optional

import torch
import torch.distributed as dist

from . import checkpoint as ckpt_lib
from . import tracking
from .optim import Schedule, WarmupMultiStepLR, build_optimizer, grad_norm, resolve_schedule

LOSS_KEYS = ("loss_cls", "loss_reg", "loss_centerness")
ASSIGN_KEYS = ("num_gt", "num_pos", "pos_per_gt", "gt_without_pos",
               "pos_level_0", "pos_level_1", "pos_level_2", "pos_level_3", "pos_level_4")
METRIC_KEYS = ("AP", "AP50", "AP75", "APs", "APm", "APl")
WARMUP_STEPS = 2  # iterations left out of the images/s figure (first-step initialisation)
_MARKERS = "atss"  # our files inside <storage>/<run name>/, beside Ray's checkpoint_* folders


class NonFiniteLossError(FloatingPointError):
    """The loss or the gradient norm became NaN/inf; the run stops and keeps its last good checkpoint."""


# ----------------------------------------------------------------------------------------------
# configuration
# ----------------------------------------------------------------------------------------------
def _is_tiny(preset: str) -> bool:
    return preset == "tiny" or preset.endswith("_tiny")


@dataclass
class TrainConfig:
    """One training run. Defaults are the paper's (batch 16, LR 0.01 at 16, 1x schedule).

    Model and data
        preset: detector preset (``detector.PRESETS``); ``detector``: field overrides on top of it.
            ``num_classes`` defaults to the dataset's category count.
        data: ``DataConfig`` fields; tiny presets start from ``DataConfig.tiny()`` (CPU sizes),
            others from the paper's ``DataConfig()``.
    Optimisation (``pipeline.optim``)
        batch_size: global images per iteration (split evenly over workers).
        schedule: ``"1x"`` / ``"2x"``, or ``iterations`` (+ optional ``lr_steps``) for a custom length.
        base_lr at reference_batch_size: with ``scale_lr`` the LR and a named schedule's iteration
            counts follow the linear scaling rule for other batch sizes.
        warmup_iters (None: the paper's 500 at batch 16, scaled), warmup_factor, gamma, momentum,
        weight_decay, bias_lr_factor, bias_weight_decay.
        max_grad_norm: clip the gradient norm (None: no clipping, as the paper); non-finite norms
            always stop the run.
        amp: bf16 autocast on CUDA (no effect on CPU).
        torch_threads: intra-op threads per worker (None: torch's default; Ray sets one per CPU).
    Periods (iterations; 0 disables)
        log_period (progress line + MLflow metrics), checkpoint_period, eval_period (the final
        evaluation happens anyway when ``eval_at_end``), report_period (extra ``ray.train.report``
        calls for Tune schedulers; checkpoints and evaluations always report).
    Where things go
        storage_path: absolute path or URI (``s3://...``) for checkpoints (default ``<cwd>/ray_results``);
        run_name: Ray run name; a re-submitted run name resumes from its latest checkpoint.
        mlflow_enabled (False: no MLflow at all, e.g. benchmarks), mlflow_uri (default
        ``MLFLOW_TRACKING_URI`` or ``sqlite:///<cwd>/mlflow.db``), mlflow_experiment,
        mlflow_parent_run_id and mlflow_tags (sweeps), mlflow_run_id (log into this existing run),
        log_model (the final model through ``mlflow.pytorch``), register_model (a registry name).
    Testing
        fail_at_iteration: the last rank raises once when it reaches this iteration (a marker file in
            the run directory makes the retry pass), to exercise fault tolerance.
    """

    preset: str = "tiny"
    detector: dict = field(default_factory=dict)
    data: dict = field(default_factory=dict)
    batch_size: int = 16
    schedule: Optional[str] = "1x"
    iterations: Optional[int] = None
    lr_steps: Optional[tuple] = None
    base_lr: float = 0.01
    reference_batch_size: int = 16
    scale_lr: bool = True
    warmup_iters: Optional[int] = None
    warmup_factor: float = 1.0 / 3.0
    gamma: float = 0.1
    momentum: float = 0.9
    weight_decay: float = 1e-4
    bias_lr_factor: float = 2.0
    bias_weight_decay: float = 0.0
    max_grad_norm: Optional[float] = None
    amp: bool = True
    seed: int = 0
    torch_threads: Optional[int] = None
    log_period: int = 20
    checkpoint_period: int = 2500
    checkpoints_to_keep: int = 2
    eval_period: int = 0
    eval_at_end: bool = True
    eval_batch_size: int = 2
    eval_backend: Optional[str] = None
    report_period: int = 0
    storage_path: Optional[str] = None
    run_name: Optional[str] = None
    mlflow_enabled: bool = True
    mlflow_uri: Optional[str] = None
    mlflow_experiment: str = tracking.DEFAULT_EXPERIMENT
    mlflow_parent_run_id: Optional[str] = None
    mlflow_tags: dict = field(default_factory=dict)
    mlflow_run_id: Optional[str] = None
    log_model: bool = True
    register_model: Optional[str] = None
    fail_at_iteration: Optional[int] = None

    def __post_init__(self) -> None:
        from detector.config import PRESETS

        if self.preset not in PRESETS:
            raise ValueError(f"TrainConfig.preset: unknown detector preset {self.preset!r}; "
                             f"choose one of {sorted(PRESETS)}")
        for name in ("detector", "data", "mlflow_tags"):
            if not isinstance(getattr(self, name), dict):
                raise ValueError(f"TrainConfig.{name} must be a dict, got {type(getattr(self, name)).__name__}")
        if self.lr_steps is not None:
            self.lr_steps = tuple(int(s) for s in self.lr_steps)
        for name in ("batch_size", "reference_batch_size", "eval_batch_size", "checkpoints_to_keep"):
            v = getattr(self, name)
            if not isinstance(v, int) or isinstance(v, bool) or v < 1:
                raise ValueError(f"TrainConfig.{name} must be an int >= 1, got {v!r}")
        for name in ("log_period", "checkpoint_period", "eval_period", "report_period"):
            v = getattr(self, name)
            if not isinstance(v, int) or isinstance(v, bool) or v < 0:
                raise ValueError(f"TrainConfig.{name} must be an int >= 0 (0 disables), got {v!r}")
        if self.max_grad_norm is not None and not self.max_grad_norm > 0:
            raise ValueError(f"TrainConfig.max_grad_norm must be > 0 or None, got {self.max_grad_norm!r}")
        if self.torch_threads is not None and self.torch_threads < 1:
            raise ValueError(f"TrainConfig.torch_threads must be >= 1 or None, got {self.torch_threads}")
        if self.fail_at_iteration is not None and self.fail_at_iteration < 0:
            raise ValueError(f"TrainConfig.fail_at_iteration must be >= 0, got {self.fail_at_iteration}")
        if self.run_name is not None and not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9_.=-]*", self.run_name):
            raise ValueError(f"TrainConfig.run_name {self.run_name!r}: use letters, digits and _ . = - "
                             "(it becomes a directory name)")
        self.schedule_()  # validates the schedule fields
        self.detector_config()  # validates the detector overrides
        self.data_config()  # validates the data fields

    # -- derived configs ---------------------------------------------------------------------------
    def detector_config(self, num_classes: Optional[int] = None):
        """The ``DetectorConfig``; ``num_classes`` (from the dataset) fills in when not overridden."""
        from detector.config import get_preset

        overrides = dict(self.detector)
        if num_classes is not None:
            given = overrides.get("num_classes")
            if given is not None and int(given) != num_classes:
                raise ValueError(f"detector num_classes={given} but the training data has {num_classes} "
                                 "categories; drop the override or use matching data")
            overrides["num_classes"] = num_classes
        try:
            return get_preset(self.preset, **overrides)
        except (TypeError, ValueError) as e:
            raise ValueError(f"TrainConfig.detector: {e}") from None

    def data_config(self):
        from pipeline.data import DataConfig

        base = DataConfig.tiny() if _is_tiny(self.preset) else DataConfig()
        fields = {f.name for f in dataclasses.fields(DataConfig)}
        unknown = sorted(set(self.data) - fields)
        if unknown:
            raise ValueError(f"TrainConfig.data: unknown key(s) {unknown}; known keys: {sorted(fields)}")
        try:
            return base.replace(**self.data)
        except (TypeError, ValueError) as e:
            raise ValueError(f"TrainConfig.data: {e}") from None

    def schedule_(self) -> Schedule:
        """The resolved schedule (linear scaling applied)."""
        return resolve_schedule(self.batch_size, self.schedule, self.iterations, self.lr_steps, self.base_lr,
                                self.reference_batch_size, self.warmup_iters, self.warmup_factor,
                                self.gamma, self.scale_lr)

    # -- (de)serialisation -------------------------------------------------------------------------
    def to_dict(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        if d["lr_steps"] is not None:
            d["lr_steps"] = list(d["lr_steps"])
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "TrainConfig":
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(d) - known)
        if unknown:
            raise ValueError(f"TrainConfig: unknown key(s) {unknown}; known keys: {sorted(known)}")
        return cls(**d)

    def replace(self, **changes) -> "TrainConfig":
        return dataclasses.replace(self, **changes)

    def fingerprint(self) -> str:
        """Hash of what determines the numbers (not where they are written), for the NaN guard."""
        d = self.to_dict()
        for k in ("storage_path", "run_name", "mlflow_enabled", "mlflow_uri", "mlflow_experiment", "mlflow_parent_run_id",
                  "mlflow_tags", "mlflow_run_id", "log_model", "register_model", "log_period",
                  "fail_at_iteration"):
            d.pop(k)
        return hashlib.sha1(json.dumps(d, sort_keys=True, default=str).encode()).hexdigest()[:12]


# ----------------------------------------------------------------------------------------------
# the run directory (<storage>/<run name>), local or remote through pyarrow.fs
# ----------------------------------------------------------------------------------------------
class RunDir:
    """Small marker files under ``<storage_path>/<run_name>/atss/`` (shared by every attempt)."""

    def __init__(self, storage_path: str, run_name: str):
        import pyarrow.fs

        self.uri = f"{storage_path.rstrip('/')}/{run_name}"
        self.fs, base = pyarrow.fs.FileSystem.from_uri(storage_path)
        self.base = f"{base.rstrip('/')}/{run_name}"
        self.is_local = isinstance(self.fs, pyarrow.fs.LocalFileSystem)

    def _path(self, name: str) -> str:
        return f"{self.base}/{_MARKERS}/{name}"

    def exists(self, name: str) -> bool:
        import pyarrow.fs

        return self.fs.get_file_info(self._path(name)).type != pyarrow.fs.FileType.NotFound

    def read_json(self, name: str) -> Optional[dict]:
        if not self.exists(name):
            return None
        with self.fs.open_input_stream(self._path(name)) as f:
            return json.loads(f.read().decode())

    def write_json(self, name: str, value: dict) -> None:
        self.fs.create_dir(f"{self.base}/{_MARKERS}", recursive=True)
        with self.fs.open_output_stream(self._path(name)) as f:
            f.write(json.dumps(value, indent=1).encode())

    def delete(self, name: str) -> None:
        if self.exists(name):
            self.fs.delete_file(self._path(name))

    def local_path(self, *parts: str) -> Optional[Path]:
        return Path(self.base, *parts) if self.is_local else None


# ----------------------------------------------------------------------------------------------
# sessions: what differs between a Ray Train worker and a plain process
# ----------------------------------------------------------------------------------------------
class _Session:
    rank = 0
    world_size = 1
    local_rank = 0

    def __init__(self, cfg: TrainConfig):
        self.cfg = cfg
        self.run_dir = RunDir(cfg.storage_path, cfg.run_name)

    @property
    def device(self) -> torch.device:
        if torch.cuda.is_available():
            return torch.device("cuda", self.local_rank)
        return torch.device("cpu")

    def latest_state(self) -> Optional[dict]:
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


class _RaySession(_Session):
    def __init__(self, cfg: TrainConfig):
        import ray.train

        super().__init__(cfg)
        _quiet_ray_train_reports()
        ctx = ray.train.get_context()
        self.rank, self.world_size, self.local_rank = (ctx.get_world_rank(), ctx.get_world_size(),
                                                       ctx.get_local_rank())

    @property
    def device(self) -> torch.device:
        import ray.train.torch

        return ray.train.torch.get_device()

    def latest_state(self) -> Optional[dict]:
        import ray.train

        ck = ray.train.get_checkpoint()
        if ck is None:
            return None
        with ck.as_directory() as d:
            return ckpt_lib.load_state(d)

    def report(self, metrics, checkpoint=False, state=None, files=None):
        import ray.train

        with tempfile.TemporaryDirectory(prefix="atss_ckpt_") as tmp:
            ray_checkpoint = None
            if checkpoint and state is not None:  # rank 0 uploads; the others only take part
                ckpt_lib.save_state(state, tmp)
                for name, src in (files or {}).items():
                    Path(tmp, name).write_bytes(Path(src).read_bytes())
                ray_checkpoint = ray.train.Checkpoint.from_directory(tmp)
            ray.train.report(metrics, checkpoint=ray_checkpoint)
        return None


class _LocalSession(_Session):
    """A plain process (or a ``torchrun`` rank): checkpoints in ``<storage>/<run>/checkpoint_<iter>``."""

    def __init__(self, cfg: TrainConfig):
        super().__init__(cfg)
        if not self.run_dir.is_local:
            raise ValueError(f"training without Ray (num_workers=0) needs a local storage_path, "
                             f"got {cfg.storage_path!r}")
        if int(os.environ.get("WORLD_SIZE", "1")) > 1 and not dist.is_initialized():
            dist.init_process_group("nccl" if torch.cuda.is_available() else "gloo")  # torchrun
        if dist.is_initialized():
            self.rank, self.world_size = dist.get_rank(), dist.get_world_size()
            self.local_rank = int(os.environ.get("LOCAL_RANK", self.rank))
        self.last_metrics: dict = {}
        self.last_checkpoint: Optional[str] = None

    def _checkpoints(self) -> list[Path]:
        root = self.run_dir.local_path()
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

    def report(self, metrics, checkpoint=False, state=None, files=None):
        self.last_metrics = dict(metrics)
        if not checkpoint:
            return None
        path = self.run_dir.local_path(f"checkpoint_{int(metrics['iteration']):09d}")
        if self.rank == 0:
            tmp = path.with_name(path.name + ".tmp")
            ckpt_lib.save_state(state, tmp)
            for name, src in (files or {}).items():
                Path(tmp, name).write_bytes(Path(src).read_bytes())
            (tmp / "metrics.json").write_text(json.dumps(metrics, indent=1))
            if path.exists():  # the same iteration saved again (a resumed, finished run)
                import shutil

                shutil.rmtree(path)
            os.replace(tmp, path)
            for old in self._checkpoints()[: -self.cfg.checkpoints_to_keep]:
                import shutil

                shutil.rmtree(old, ignore_errors=True)
        if dist.is_initialized():
            dist.barrier()
        self.last_checkpoint = str(path)
        return str(path)


# ----------------------------------------------------------------------------------------------
# one optimisation step
# ----------------------------------------------------------------------------------------------
@dataclass
class StepOutput:
    losses: dict  # LOSS_KEYS and "loss": mean over workers (= the loss of the global batch)
    grad_norm: float
    lr: float


def _all_reduce_mean(values: torch.Tensor) -> torch.Tensor:
    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        values = values.clone()
        dist.all_reduce(values)
        values /= dist.get_world_size()
    return values


def train_step(model: torch.nn.Module, optimizer: torch.optim.Optimizer, scheduler, images: torch.Tensor,
               targets: list[dict], iteration: int, amp: bool = False,
               max_grad_norm: Optional[float] = None, image_sizes=None) -> StepOutput:
    """Forward, loss check, backward, gradient guard, SGD step, LR step.

    The loss values are averaged over workers *before* the check, so every rank sees the same
    numbers and all stop together on a non-finite loss (no rank left waiting in a collective).
    Because the detector divides by the worker-averaged normalisers (spec 3.6), this average is
    exactly the loss of the global batch: 1 worker x 4 images == mean of 2 workers x 2 images.
    """
    device = images.device
    use_amp = amp and device.type == "cuda"
    with torch.autocast(device.type, dtype=torch.bfloat16, enabled=use_amp):
        losses = model(images, targets, image_sizes=image_sizes)
    total = sum(losses[k].float() for k in LOSS_KEYS)
    values = _all_reduce_mean(torch.stack([total.detach()] + [losses[k].detach().float() for k in LOSS_KEYS]))
    values = values.tolist()
    named = dict(zip(("loss",) + LOSS_KEYS, values))
    if not all(math.isfinite(v) for v in values):
        raise NonFiniteLossError(f"non-finite loss at iteration {iteration}: "
                                 + ", ".join(f"{k}={v:.4g}" for k, v in named.items()))
    optimizer.zero_grad(set_to_none=True)
    total.backward()
    norm = float(grad_norm(model.parameters(), max_grad_norm))  # DDP grads are already averaged
    if not math.isfinite(norm):
        raise NonFiniteLossError(f"non-finite gradient norm at iteration {iteration} "
                                 f"(loss {named['loss']:.4g}); set max_grad_norm or lower the LR")
    lr = optimizer.param_groups[0]["lr"]
    optimizer.step()
    scheduler.step()
    return StepOutput(named, norm, lr)


# ----------------------------------------------------------------------------------------------
# the training loop
# ----------------------------------------------------------------------------------------------
def _to_device(images: torch.Tensor, targets: list[dict], device: torch.device):
    images = images.to(device, non_blocking=True)
    out = []
    for t in targets:
        t = dict(t)
        for k in ("boxes", "labels", "crowd_boxes"):
            if k in t:
                t[k] = t[k].to(device, non_blocking=True)
        out.append(t)
    return images, out


def _fmt_eta(seconds: float) -> str:
    if not math.isfinite(seconds):
        return "?"
    return str(datetime.timedelta(seconds=int(seconds)))


class _Window:
    """Running sums between two log lines (losses, assignment statistics, timing)."""

    def __init__(self):
        self.reset(time.perf_counter())

    def reset(self, now: float) -> None:
        self.sums: dict[str, float] = {}
        self.n = 0
        self.images = 0
        self.data_time = 0.0
        self.start = now

    def add(self, values: dict, images: int, data_time: float) -> None:
        for k, v in values.items():
            self.sums[k] = self.sums.get(k, 0.0) + float(v)
        self.n += 1
        self.images += images
        self.data_time += data_time

    def means(self) -> dict[str, float]:
        return {k: v / max(self.n, 1) for k, v in self.sums.items()}


def _assign_stats_mean(window: _Window) -> dict[str, float]:
    """Assignment statistics averaged over the window and over workers (one small all_reduce)."""
    sums = torch.tensor([window.sums.get(f"assign/{k}", 0.0) for k in ASSIGN_KEYS] + [float(window.n)],
                        dtype=torch.float64)
    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        if dist.get_backend() == "nccl":
            sums = sums.cuda()
        dist.all_reduce(sums)
    sums = sums.cpu().tolist()
    n = max(sums[-1], 1.0)
    out = {f"assign/{k}": v / n for k, v in zip(ASSIGN_KEYS, sums[:-1])}
    # per GT over the whole window (not a mean of per-batch ratios)
    if out["assign/num_gt"] > 0:
        out["assign/pos_per_gt"] = out["assign/num_pos"] / out["assign/num_gt"]
    return out


def _gather_rng(session: _Session) -> dict:
    state = ckpt_lib.get_rng_state()
    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        per_rank: list = [None] * dist.get_world_size()
        dist.all_gather_object(per_rank, state)
        return {"per_rank": per_rank}
    return {"per_rank": [state]}


def _restore_rng(rng: Optional[dict], session: _Session) -> bool:
    per_rank = (rng or {}).get("per_rank") or []
    if len(per_rank) != session.world_size:
        return False  # a different worker count: data order is still exact, augmentation seeds too
    ckpt_lib.set_rng_state(per_rank[session.rank])
    return True


def _load_training_state(optimizer, scheduler, schedule: Schedule, cfg: TrainConfig, state: dict,
                         iteration: int) -> None:
    """Momentum buffers and the scheduler position from the checkpoint; LRs, decay and LR steps from
    the *current* config, so a run resubmitted with a lower LR or a longer schedule uses it (the
    way out of a NaN: same run name, lower ``base_lr``)."""
    fresh = [(g["lr"], g["weight_decay"]) for g in optimizer.param_groups]
    optimizer.load_state_dict(state["optimizer"])
    scheduler.load_state_dict(state["scheduler"])
    scheduler.steps = list(schedule.steps)
    scheduler.gamma = schedule.gamma
    scheduler.warmup_iters = schedule.warmup_iters
    scheduler.warmup_factor = schedule.warmup_factor
    scheduler.base_lrs = [lr for lr, _ in fresh]
    factor = schedule.lr_factor(iteration)
    for group, (lr, wd) in zip(optimizer.param_groups, fresh):
        group.update(initial_lr=lr, lr=lr * factor, weight_decay=wd, momentum=cfg.momentum)
    scheduler._last_lr = [g["lr"] for g in optimizer.param_groups]


def _maybe_inject_failure(cfg: TrainConfig, session: _Session, iteration: int) -> None:
    if cfg.fail_at_iteration is None or iteration != cfg.fail_at_iteration:
        return
    if session.rank != session.world_size - 1:
        return
    marker = f"fault_injected_{iteration}.json"
    if session.run_dir.exists(marker):
        return
    session.run_dir.write_json(marker, {"iteration": iteration, "rank": session.rank, "time": time.time()})
    raise RuntimeError(f"injected failure at iteration {iteration} on rank {session.rank} "
                       "(TrainConfig.fail_at_iteration; raised once per run)")


def _check_nonfinite_marker(cfg: TrainConfig, session: _Session, start: int) -> None:
    """Ray retries every worker failure; a NaN with the same config and checkpoint would only recur."""
    marker = session.run_dir.read_json("nonfinite.json")
    if marker and marker.get("fingerprint") == cfg.fingerprint() and marker.get("resume_iteration") == start:
        raise NonFiniteLossError(f"{marker['error']} (an earlier attempt of this run; not retrying with the "
                                 f"same config from iteration {start}: change the config, e.g. a lower "
                                 "base_lr or max_grad_norm, or start a new run name)")


class _Tracker:
    """MLflow logging of rank 0 (a no-op on other ranks and when tracking is off)."""

    def __init__(self, cfg: TrainConfig, session: _Session):
        self.cfg = cfg
        self.active = session.rank == 0 and cfg.mlflow_enabled and bool(cfg.mlflow_uri)
        self.run_id: Optional[str] = None
        self.uri = cfg.mlflow_uri
        self.session = session

    @contextlib.contextmanager
    def run(self, state: Optional[dict]):
        if not self.active:
            yield self
            return
        run_id = self.cfg.mlflow_run_id
        if run_id is None and state is not None:
            run_id = state.get("extra", {}).get("mlflow_run_id")
        if run_id is None:
            known = self.session.run_dir.read_json("mlflow_run.json")
            if known and known.get("tracking_uri") == self.uri:
                run_id = known.get("run_id")
        tags = {**self.cfg.mlflow_tags, "atss.run_dir": self.session.run_dir.uri}
        with tracking.mlflow_run(self.uri, self.cfg.mlflow_experiment, self.cfg.run_name, run_id=run_id,
                                 parent_run_id=self.cfg.mlflow_parent_run_id, tags=tags) as active:
            self.run_id = active.info.run_id
            self.session.run_dir.write_json("mlflow_run.json", {"tracking_uri": self.uri,
                                                                 "run_id": self.run_id})
            yield self

    def params(self, params: dict) -> None:
        """Log params not logged yet (a resumed run keeps its first values; changes become tags)."""
        if not self.active:
            return
        from mlflow import MlflowClient

        existing = MlflowClient(self.uri).get_run(self.run_id).data.params
        new = {k: v for k, v in params.items() if k not in existing}
        changed = {k: v for k, v in params.items() if k in existing and existing[k] != str(v)}
        if new:
            tracking.log_params(self.run_id, new, self.uri)
        client = MlflowClient(self.uri)
        for k, v in changed.items():
            client.set_tag(self.run_id, f"resumed_with.{k}", str(v)[: tracking.MAX_PARAM_LENGTH])

    def metrics(self, metrics: dict, step: int) -> None:
        if self.active:
            tracking.log_metrics(self.run_id, metrics, step, self.uri)

    def artifact(self, path: str | os.PathLike, artifact_path: Optional[str] = None) -> None:
        if self.active:
            from mlflow import MlflowClient

            MlflowClient(self.uri).log_artifact(self.run_id, str(path), artifact_path)

    def text(self, text: str, artifact_file: str) -> None:
        if self.active:
            from mlflow import MlflowClient

            MlflowClient(self.uri).log_text(self.run_id, text, artifact_file)


def _evaluate(model, loader, dataset, category_map, cfg: TrainConfig, session: _Session, iteration: int,
              out_dir: Path, tracker: _Tracker) -> tuple[Optional[dict], Optional[Path]]:
    """Sharded inference, gather, COCO scoring on rank 0, results json written and logged."""
    from pipeline.evaluation import evaluate_coco, gather_across_workers, write_results_json
    from pipeline.inference import predict, to_coco_results

    t0 = time.perf_counter()
    outputs = predict(ckpt_lib.unwrap(model), loader, session.device)  # always fp32
    outputs = gather_across_workers(outputs, dedupe_key="image_id")
    if session.rank != 0:
        return None, None
    results = to_coco_results(outputs, category_map=list(category_map.ids))  # COCO ids in label order
    path = write_results_json(results, out_dir / f"results_iter_{iteration:09d}.json")
    metrics = evaluate_coco(dataset.coco, results, backend=cfg.eval_backend)
    per_category = metrics.pop("per_category")
    print(f"[eval it {iteration}] " + " ".join(f"{k} {metrics[k]:.4f}" for k in METRIC_KEYS)
          + f" ({len(outputs)} images, {len(results)} detections, {time.perf_counter() - t0:.1f}s)", flush=True)
    tracker.metrics({f"eval/{k}": v for k, v in metrics.items()}, iteration)
    tracker.metrics({f"eval_per_category/{re.sub(r'[^A-Za-z0-9_./ -]', '_', n)}": v
                     for n, v in per_category.items()}, iteration)
    tracker.artifact(path, "eval")
    (out_dir / f"metrics_iter_{iteration:09d}.json").write_text(
        json.dumps({**metrics, "per_category": per_category, "iteration": iteration}, indent=1))
    tracker.artifact(out_dir / f"metrics_iter_{iteration:09d}.json", "eval")
    return {**metrics, "per_category": per_category}, path


def _log_final_artifacts(model, tracker: _Tracker, cfg: TrainConfig, eval_metrics: Optional[dict],
                         model_state: dict, out_dir: Path) -> None:
    if not tracker.active:
        return
    history = tracking.metric_history(tracker.run_id, ("train/loss",) + tuple(f"train/{k}" for k in LOSS_KEYS),
                                      tracker.uri)
    tracker.artifact(tracking.plot_loss_curves({k.split("/")[-1]: v for k, v in history.items()},
                                               out_dir / "loss_curves.png", f"{cfg.run_name}: training losses"),
                     "plots")
    if eval_metrics is not None:
        tracker.artifact(tracking.plot_per_category_ap(eval_metrics["per_category"], out_dir / "ap_per_category.png",
                                                       f"{cfg.run_name}: AP per category"), "plots")
    if cfg.log_model:
        import mlflow
        import mlflow.pytorch
        import torchvision

        state_file = ckpt_lib.save_state(model_state, out_dir / "model")
        cpu_model = copy.deepcopy(ckpt_lib.unwrap(model)).cpu().eval()
        active = mlflow.active_run()
        same = active is not None and active.info.run_id == tracker.run_id
        with contextlib.nullcontext() if same else mlflow.start_run(run_id=tracker.run_id, nested=active is not None):
            # pickle: the model's forward takes lists of dicts, which the pt2 graph format cannot trace
            mlflow.pytorch.log_model(cpu_model, name="model", serialization_format="pickle",
                                     extra_files=[str(state_file)], registered_model_name=cfg.register_model,
                                     pip_requirements=[f"torch=={torch.__version__.split('+')[0]}",
                                                       f"torchvision=={torchvision.__version__.split('+')[0]}"])


def _train(cfg: TrainConfig, session: _Session) -> dict:
    """The loop every worker runs; returns rank 0's summary (``result.return_value`` under Ray):
    ``iteration``, ``metrics`` (the last report), ``eval`` (final COCO metrics incl. ``per_category``),
    ``checkpoint`` (plain runs), ``mlflow_run_id``, ``train_s`` / ``train_cpu_s`` (wall / process CPU
    time of data loading and steps after the warm-up), ``steady_images`` and ``train_images_per_s``;
    ``{}`` on the other ranks."""
    from detector import build_detector
    from pipeline.data import build_dataloader, build_dataset

    device = session.device
    if cfg.torch_threads:
        torch.set_num_threads(cfg.torch_threads)
    schedule = cfg.schedule_()
    world = session.world_size
    if cfg.batch_size % world:
        raise ValueError(f"batch_size {cfg.batch_size} is not divisible by the {world} workers")
    per_worker = cfg.batch_size // world
    data_cfg = cfg.data_config()
    train_set = build_dataset(data_cfg, "train", train=True)
    category_map = train_set.category_map
    det_cfg = cfg.detector_config(num_classes=category_map.num_classes)

    torch.manual_seed(cfg.seed)  # identical initial weights on every rank (DDP also broadcasts them)
    model = build_detector(det_cfg).to(device)
    optimizer = build_optimizer(model, schedule, cfg.momentum, cfg.weight_decay, cfg.bias_lr_factor,
                                cfg.bias_weight_decay)
    scheduler = WarmupMultiStepLR(optimizer, schedule)

    state = session.latest_state()
    start = 0
    if state is not None:
        model.load_state_dict(state["model"])
        start = int(state["iteration"])
        if "optimizer" in state:
            _load_training_state(optimizer, scheduler, schedule, cfg, state, start)
        same_rng = _restore_rng(state.get("rng"), session)
        if session.rank == 0:
            note = "" if same_rng else " (different worker count: RNG states not restored)"
            print(f"[train] resumed from the checkpoint at iteration {start}{note}", flush=True)
    else:
        torch.manual_seed(cfg.seed + 1000 * session.rank)
    _check_nonfinite_marker(cfg, session, start)

    if world > 1:
        from torch.nn.parallel import DistributedDataParallel

        model = DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda" else None)
    loader = build_dataloader(data_cfg, "train", per_worker, train=True, seed=cfg.seed, start_iter=start,
                              dataset=train_set)
    eval_needed = cfg.eval_at_end or cfg.eval_period > 0
    val_set = build_dataset(data_cfg, "val", train=False) if eval_needed else None
    out_dir = session.run_dir.local_path("eval") if session.run_dir.is_local else \
        Path(tempfile.mkdtemp(prefix="atss_eval_"))
    if session.rank == 0:
        out_dir.mkdir(parents=True, exist_ok=True)

    tracker = _Tracker(cfg, session)
    summary: dict[str, Any] = {}
    with tracker.run(state):
        if session.rank == 0:
            print(f"[train] {schedule.describe()}; {world} worker(s) x {per_worker} images on {device}"
                  + (", bf16 autocast" if cfg.amp and device.type == "cuda" else ""), flush=True)
            print(f"[train] {len(train_set)} training images, {category_map.num_classes} categories; "
                  f"run dir {session.run_dir.uri}", flush=True)
            tracker.params({**{f"train.{k}": v for k, v in tracking.flatten_config(cfg.to_dict()).items()
                               if not k.startswith(("mlflow_", "fail_at"))},
                            **{f"detector.{k}": v for k, v in tracking.flatten_config(det_cfg.to_dict()).items()},
                            **{f"schedule.{k}": v for k, v in tracking.flatten_config(schedule.to_dict()).items()},
                            "num_workers": world, "batch_per_worker": per_worker,
                            "num_train_images": len(train_set)})
            tracker.text(json.dumps(cfg.to_dict(), indent=1, default=str), "config/train_config.json")
            tracker.text(json.dumps(det_cfg.to_dict(), indent=1), "config/detector_config.json")
            if start:
                tracker.metrics({"resumed_from_iteration": start}, start)

        def checkpoint_state(iteration: int, with_training_state: bool = True) -> Optional[dict]:
            """The checkpoint dict on rank 0 (None elsewhere); with the training state this is a
            collective (every rank's RNG state is gathered), so all ranks call it together."""
            rng = _gather_rng(session) if with_training_state else None
            if session.rank != 0:
                return None
            return ckpt_lib.build_state(
                model, det_cfg, category_map.to_list(), iteration,
                optimizer=optimizer if with_training_state else None,
                scheduler=scheduler if with_training_state else None,
                rng=rng, train_config=cfg.to_dict(), extra={"mlflow_run_id": tracker.run_id})

        window = _Window()
        last_logged: dict[str, float] = {}
        eval_metrics: Optional[dict] = None
        model.train()
        data_iter = iter(loader)
        # images/s of the loop: data + step time only (no evaluation, checkpoint or logging), after
        # WARMUP_STEPS iterations of each attempt (lazy initialisation, allocator warm-up)
        train_time = train_cpu = 0.0
        steady_images = 0
        reported: dict[str, Any] = {}
        checkpoint_path: Optional[str] = None
        last_checkpoint_iteration = start  # where a retry would resume
        for it in range(start, schedule.max_iter):
            _maybe_inject_failure(cfg, session, it)
            t_data, cpu_data = time.perf_counter(), time.process_time()
            images, targets = next(data_iter)
            images, targets = _to_device(images, targets, device)
            data_time = time.perf_counter() - t_data
            try:
                out = train_step(model, optimizer, scheduler, images, targets, it, cfg.amp, cfg.max_grad_norm,
                                 image_sizes=[tuple(t["image_size"]) for t in targets])
            except NonFiniteLossError as e:
                if session.rank == 0:
                    session.run_dir.write_json("nonfinite.json", {
                        "error": str(e), "iteration": it, "fingerprint": cfg.fingerprint(),
                        "resume_iteration": last_checkpoint_iteration})
                    print(f"[train] {e}; the last good checkpoint is kept", file=sys.stderr, flush=True)
                raise
            if it >= start + WARMUP_STEPS:
                train_time += time.perf_counter() - t_data
                train_cpu += time.process_time() - cpu_data
                steady_images += per_worker * world
            stats = ckpt_lib.unwrap(model).assign_stats
            window.add({**{f"train/{k}": v for k, v in out.losses.items()}, "train/grad_norm": out.grad_norm,
                        **{f"assign/{k}": stats.get(k, 0.0) for k in ASSIGN_KEYS}},
                       per_worker * world, data_time)
            done = it + 1
            last = done == schedule.max_iter

            if cfg.log_period and (done % cfg.log_period == 0 or last or done == start + 1):
                now = time.perf_counter()
                elapsed = now - window.start
                means = window.means()
                assign = _assign_stats_mean(window)
                ips = window.images / elapsed if elapsed > 0 else float("nan")
                step_time = elapsed / max(window.n, 1)
                last_logged = {**{k: v for k, v in means.items() if k.startswith("train/")},
                               "train/lr": out.lr, "train/images_per_s": ips,
                               "train/data_time_share": window.data_time / elapsed if elapsed > 0 else 0.0}
                if session.rank == 0:
                    losses = " ".join(f"{k.replace('loss_', '')} {means[f'train/{k}']:.3f}" for k in LOSS_KEYS)
                    print(f"[train it {done}/{schedule.max_iter}] loss {means['train/loss']:.4f} ({losses}) "
                          f"lr {out.lr:.3g} {ips:.1f} img/s pos/gt {assign['assign/pos_per_gt']:.2f} "
                          f"ETA {_fmt_eta(step_time * (schedule.max_iter - done))}", flush=True)
                    tracker.metrics({**last_logged, **assign}, done)
                window.reset(time.perf_counter())

            do_eval = (cfg.eval_period and done % cfg.eval_period == 0) or (last and cfg.eval_at_end)
            do_ckpt = (cfg.checkpoint_period and done % cfg.checkpoint_period == 0) or last
            do_report = do_ckpt or do_eval or (cfg.report_period and done % cfg.report_period == 0)
            if do_eval:
                eval_metrics, results_path = _evaluate(
                    model, build_dataloader(data_cfg, "val", cfg.eval_batch_size, train=False, dataset=val_set),
                    val_set, category_map, cfg, session, done, out_dir, tracker)
                model.train()
            if do_report:
                metrics = {"iteration": done, **{k.split("/")[-1]: v for k, v in last_logged.items()}}
                if do_eval and session.rank == 0:
                    metrics.update({k: eval_metrics[k] for k in METRIC_KEYS})
                files = {"results.json": results_path} if (do_eval and do_ckpt and session.rank == 0) else None
                state_now = checkpoint_state(done) if do_ckpt else None
                path = session.report(metrics, bool(do_ckpt), state_now, files)
                reported = metrics
                checkpoint_path = path or checkpoint_path
                if do_ckpt:
                    last_checkpoint_iteration = done
        if session.rank == 0:
            summary = {"iteration": max(start, schedule.max_iter), "metrics": reported, "eval": eval_metrics,
                       "checkpoint": checkpoint_path, "mlflow_run_id": tracker.run_id,
                       "train_s": train_time, "train_cpu_s": train_cpu, "steady_images": steady_images,
                       "train_images_per_s": steady_images / train_time if train_time > 0 else None}
            if start >= schedule.max_iter:
                print(f"[train] this run already finished at iteration {start}; nothing to do (a new run "
                      "name starts over, more iterations continue it)", flush=True)
                summary["metrics"] = session.checkpoint_metrics()
                summary["checkpoint"] = session.latest_checkpoint_path()
            else:
                if eval_metrics is not None:
                    print(f"[train] done: {schedule.max_iter} iterations, COCO AP {eval_metrics['AP']:.4f} "
                          f"(AP50 {eval_metrics['AP50']:.4f})", flush=True)
                _log_final_artifacts(model, tracker, cfg, eval_metrics,
                                     checkpoint_state(schedule.max_iter, with_training_state=False), out_dir)
    return summary if session.rank == 0 else {}


def train_loop_per_worker(config: dict) -> dict:
    """Ray Train V2 ``train_loop_per_worker``: ``config`` is ``TrainConfig.to_dict()`` (resolved by
    :func:`prepare_config`: absolute storage path, run name and MLflow URI)."""
    cfg = TrainConfig.from_dict(config)
    if cfg.storage_path is None or cfg.run_name is None:
        raise ValueError("train_loop_per_worker needs a resolved config: call prepare_config(cfg) in the driver")
    return _train(cfg, _RaySession(cfg))


def train_in_process(cfg: TrainConfig) -> dict:
    """The same loop without Ray (one process, or one ``torchrun`` rank)."""
    return _train(cfg, _LocalSession(cfg))


# ----------------------------------------------------------------------------------------------
# driver
# ----------------------------------------------------------------------------------------------
def _absolute_storage(path: Optional[str], cwd: Path) -> str:
    if not path:
        return str(cwd / "ray_results")
    if "://" in path:
        return path
    return str((cwd / Path(path).expanduser()).resolve())


def prepare_config(cfg: TrainConfig, num_workers: int = 1, cwd: Optional[str | os.PathLike] = None,
                   check_data: bool = True) -> TrainConfig:
    """Resolve what the driver must decide and check what would otherwise fail inside a worker.

    Storage path absolute (Ray's controller rejects relative ones; workers run elsewhere), a run
    name, the MLflow URI absolute; the global batch divisible by the workers; the data files present.
    Raises ``ValueError`` / ``FileNotFoundError`` naming the problem.
    """
    base = Path(cwd or os.getcwd()).resolve()
    world = max(num_workers, 1)
    if cfg.batch_size % world:
        raise ValueError(f"batch_size {cfg.batch_size} (global) is not divisible by {world} workers; "
                         f"use a multiple of {world}")
    changes: dict[str, Any] = {"storage_path": _absolute_storage(cfg.storage_path, base)}
    if cfg.run_name is None:
        changes["run_name"] = f"atss_{cfg.preset}_{datetime.datetime.now():%Y%m%d-%H%M%S}"
    if cfg.mlflow_enabled:
        changes["mlflow_uri"] = (tracking.absolute_tracking_uri(cfg.mlflow_uri, base) if cfg.mlflow_uri
                                 else tracking.default_tracking_uri(base))
    cfg = cfg.replace(**changes)
    if check_data:
        check_data_paths(cfg)
    return cfg


def check_data_paths(cfg: TrainConfig) -> None:
    """The train (and, when evaluating, val) annotation file and image folder must exist.

    A synthetic source is generated here once (cached), so workers never race to create it."""
    from pipeline.data.loader import resolve_split

    data_cfg = cfg.data_config()
    splits = ["train"] + (["val"] if cfg.eval_at_end or cfg.eval_period else [])
    for split in splits:
        hint = " (evaluation needs the val split; --no-eval / eval_at_end=False skips it)" if split == "val" else ""
        try:
            ann, images = resolve_split(data_cfg, split)
        except (ValueError, FileNotFoundError) as e:
            raise type(e)(f"data for the {split} split: {e}{hint}") from None
        if "://" in ann:
            continue
        if not Path(ann).is_file():
            raise FileNotFoundError(f"{split} annotation file not found: {ann} (data source "
                                    f"{data_cfg.source!r}){hint}")
        if not Path(images).is_dir():
            raise FileNotFoundError(f"{split} image folder not found: {images} (data source "
                                    f"{data_cfg.source!r}){hint}")


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
    summary: dict = field(default_factory=dict)  # rank 0's full summary (see _train)

    @property
    def ap(self) -> Optional[float]:
        return self.eval["AP"] if self.eval else self.metrics.get("AP")


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


def _ray_train_logging():
    import ray.train

    level = os.environ.get("ATSS_RAY_TRAIN_LOG_LEVEL", "WARNING")
    try:
        return ray.train.LoggingConfig(log_level=level)
    except ValueError as e:
        raise ValueError(f"ATSS_RAY_TRAIN_LOG_LEVEL={level!r}: {e}") from None


def _quiet_ray_train_reports() -> None:
    """Apply ``ATSS_RAY_TRAIN_LOG_LEVEL`` to Ray Train's per-report line on this worker.

    Ray 2.60's ``execution/context.py`` names its logger after its file path instead of its module,
    so the line escapes ``LoggingConfig`` (which filters ``ray.train.*``) and prints every metric
    of every report from every rank. Without that module (another Ray version) nothing is changed.
    """
    import logging

    try:
        from ray.train.v2._internal.execution import context
    except ImportError:
        return
    logging.getLogger(context.__file__).setLevel(_ray_train_logging().log_level)


def build_trainer(cfg: TrainConfig, num_workers: int = 2, use_gpu: bool = False,
                  resources_per_worker: Optional[dict] = None, max_failures: int = 0,
                  callbacks: Optional[list] = None, scaling_kwargs: Optional[dict] = None,
                  train_loop: Callable[[dict], Any] = train_loop_per_worker):
    """A ``TorchTrainer`` for a resolved config (see :func:`prepare_config`); the sweeps call
    ``.fit()`` on it inside their Tune trials (with ``callbacks=[TuneReportCallback()]``)."""
    import ray.train
    from ray.train.torch import TorchConfig, TorchTrainer

    _driver_env()
    if cfg.storage_path is None or cfg.run_name is None:
        raise ValueError("build_trainer needs a resolved config: call prepare_config(cfg, num_workers) first")
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
        logging_config=_ray_train_logging(),
    )
    return TorchTrainer(train_loop, train_loop_config=cfg.to_dict(),
                        torch_config=TorchConfig(backend="nccl" if use_gpu else "gloo"),
                        scaling_config=ray.train.ScalingConfig(**scaling), run_config=run_config)


def worker_error(error: BaseException) -> BaseException:
    """The first worker's exception inside a Ray ``WorkerGroupError`` (else ``error``)."""
    failures = getattr(error, "worker_failures", None)
    if failures:
        return failures[min(failures)]
    return error


def run_training(cfg: TrainConfig, num_workers: int = 2, use_gpu: bool = False, max_failures: int = 0,
                 resources_per_worker: Optional[dict] = None, callbacks: Optional[list] = None,
                 require_resume: bool = False, verbose: bool = True) -> TrainResult:
    """Train ``cfg`` and return the final metrics, checkpoint and MLflow run.

    ``num_workers >= 1``: a Ray Train ``TorchTrainer`` (connects to ``RAY_ADDRESS`` or starts a local
    Ray); ``num_workers=0``: this process, no Ray at all. A run name that already has checkpoints
    resumes from the latest one (``require_resume`` makes their absence an error). The MLflow run is
    created here so its id is known up front; a run whose workers fail ends FAILED with the error.
    """
    t0 = time.perf_counter()
    cfg = prepare_config(cfg, num_workers)
    run_dir = RunDir(cfg.storage_path, cfg.run_name)
    previous = _has_checkpoints(run_dir)
    if require_resume and not previous:
        raise FileNotFoundError(f"nothing to resume: no checkpoint under {run_dir.uri}")
    leader = num_workers > 0 or int(os.environ.get("RANK", "0")) == 0  # torchrun: rank 0 is the driver
    say = print if verbose and leader else (lambda *a, **k: None)
    say(f"[driver] run {cfg.run_name}: {'resuming from ' if previous else 'checkpoints to '}{run_dir.uri}")
    say(f"[driver] {cfg.schedule_().describe()}; {max(num_workers, 1)} worker(s) x "
        f"{cfg.batch_size // max(num_workers, 1)} images")

    run_id = cfg.mlflow_run_id
    if run_id is None and cfg.mlflow_enabled and leader:
        known = run_dir.read_json("mlflow_run.json")
        if known and known.get("tracking_uri") == cfg.mlflow_uri:
            run_id = known["run_id"]
        else:
            run_id = tracking.create_run(cfg.mlflow_uri, cfg.mlflow_experiment, cfg.run_name,
                                         cfg.mlflow_parent_run_id,
                                         {**cfg.mlflow_tags, "atss.run_dir": run_dir.uri})
            run_dir.write_json("mlflow_run.json", {"tracking_uri": cfg.mlflow_uri, "run_id": run_id})
        cfg = cfg.replace(mlflow_run_id=run_id)
    if run_id is not None:
        say(f"[driver] MLflow run {run_id} in {cfg.mlflow_uri} (experiment {cfg.mlflow_experiment!r}); "
            f"view with: {tracking.ui_command(cfg.mlflow_uri)}")

    try:
        if num_workers == 0:
            summary = train_in_process(cfg)
            metrics = dict(summary.get("metrics") or {})
            checkpoint_path = summary.get("checkpoint")
        else:
            import ray

            _driver_env()
            if not ray.is_initialized():
                # Train V2 passes the RAY_TRAIN_* variables on to its controller and workers.
                connect_ray()
            trainer = build_trainer(cfg, num_workers, use_gpu, resources_per_worker, max_failures, callbacks)
            result = trainer.fit()
            summary = result.return_value or {}
            metrics = dict(result.metrics or {})
            checkpoint_path = result.checkpoint.path if result.checkpoint is not None else None
    except BaseException as e:
        cause = worker_error(e)
        if run_id is not None and tracking.run_status(cfg.mlflow_uri, run_id) != "FINISHED":
            status = "KILLED" if isinstance(e, (KeyboardInterrupt, SystemExit)) else "FAILED"
            tracking.mark_run_failed(cfg.mlflow_uri, run_id, cause, status)
        if cause is not e and isinstance(cause, Exception):
            raise cause from e  # the worker's own error (e.g. NonFiniteLossError), not Ray's wrapper
        raise
    if run_id is not None and tracking.run_status(cfg.mlflow_uri, run_id) == "RUNNING":
        from mlflow import MlflowClient

        MlflowClient(cfg.mlflow_uri).set_terminated(run_id, "FINISHED")
    res = TrainResult(run_name=cfg.run_name, run_dir=run_dir.uri,
                      iteration=int(summary.get("iteration", metrics.get("iteration", 0))),
                      metrics=metrics, checkpoint_path=checkpoint_path, mlflow_run_id=run_id,
                      tracking_uri=cfg.mlflow_uri, wall_s=time.perf_counter() - t0, eval=summary.get("eval"),
                      train_images_per_s=summary.get("train_images_per_s"), summary=dict(summary))
    if res.ap is not None:
        say(f"[driver] finished at iteration {res.iteration}: COCO AP {res.ap:.4f}; checkpoint {checkpoint_path}")
    return res


def _has_checkpoints(run_dir: RunDir) -> bool:
    import pyarrow.fs

    try:
        infos = run_dir.fs.get_file_info(pyarrow.fs.FileSelector(run_dir.base, allow_not_found=True))
    except OSError:
        return False
    return any(i.type == pyarrow.fs.FileType.Directory and Path(i.path).name.startswith("checkpoint_")
               and not i.path.endswith(".tmp") for i in infos)
