"""The hooks of a training run (see :class:`pipeline.training.loop.Trainer`) and its MLflow logger.

In the order the worker registers them:

* :class:`FaultInjection`: the last rank raises once at ``fail_at_iteration`` (fault-tolerance tests).
* :class:`NonFiniteGuard`: refuses to repeat a NaN from the same checkpoint with the same config,
  and records a new one (the last good checkpoint stays in place).
* :class:`MetricsLogger`: the start lines, params and the environment (``env.*``), then every
  ``log_period`` a progress line and the MLflow metrics (losses, LR, images/s, assignment
  statistics averaged over workers).
* :class:`PeriodicEval`: COCO evaluation sharded over workers every ``eval_period`` and at the end,
  always in fp32.
* :class:`CheckpointReport`: checkpoints every ``checkpoint_period`` and at the end, and the reports
  Ray Train / Tune see (with the AP of an evaluation in the same step).
* :class:`FinalArtifacts`: loss curves, per-category AP and the model through ``mlflow.pytorch``.
"""
from __future__ import annotations

import contextlib
import copy
import datetime
import json
import math
import os
import re
import sys
import time
from pathlib import Path
from typing import Any, Optional

import torch
import torch.distributed as dist

from pipeline import checkpoint as ckpt_lib
from pipeline import tracking
from pipeline.data import build_dataloader
from pipeline.environment import collect_environment
from pipeline.evaluation import METRIC_KEYS, evaluate_coco, gather_across_workers, write_results_json
from pipeline.inference import predict, to_coco_results

from .config import TrainConfig
from .loop import LOSS_KEYS, HookBase, NonFiniteLossError, Trainer
from .session import Session
from .store import known_mlflow_run, remember_mlflow_run

__all__ = ["ASSIGN_KEYS", "WorkerTracker", "FaultInjection", "NonFiniteGuard", "MetricsLogger", "PeriodicEval",
           "CheckpointReport", "FinalArtifacts", "check_nonfinite_marker", "summary"]

ASSIGN_KEYS = ("num_gt", "num_pos", "pos_per_gt", "gt_without_pos",
               "pos_level_0", "pos_level_1", "pos_level_2", "pos_level_3", "pos_level_4")
NONFINITE_MARKER = "atss/nonfinite.json"


# ----------------------------------------------------------------------------------------------
# MLflow from rank 0
# ----------------------------------------------------------------------------------------------
class WorkerTracker:
    """MLflow logging of rank 0 inside the run's lifecycle (a no-op on other ranks and without MLflow).

    The run is the one the driver created (``cfg.mlflow.run_id``), else the one the checkpoint or
    the run directory names, else a new one; a worker error ends it FAILED, and a restarted worker
    group re-attaches to it."""

    def __init__(self, cfg: TrainConfig, session: Session, state: Optional[dict]):
        self.cfg, self.session, self.state = cfg, session, state
        self.active = session.rank == 0 and cfg.mlflow is not None
        self.run_id: Optional[str] = None
        self.uri = cfg.mlflow.uri if cfg.mlflow else None
        self._lifecycle: Optional[contextlib.AbstractContextManager] = None

    def _known_run_id(self) -> Optional[str]:
        if self.cfg.mlflow.run_id is not None:
            return self.cfg.mlflow.run_id
        if self.state is not None and self.state.get("extra", {}).get("mlflow_run_id"):
            return self.state["extra"]["mlflow_run_id"]
        return known_mlflow_run(self.session.store, self.uri)

    def __enter__(self) -> "WorkerTracker":
        if not self.active:
            return self
        tags = {"atss.run_dir": self.session.store.uri, **self.session.placement_tags()}
        self._lifecycle = tracking.run_lifecycle(self.cfg.mlflow.replace(run_id=self._known_run_id()),
                                                 self.cfg.run_name, tags=tags, activate=True)
        self.run_id = self._lifecycle.__enter__().run_id
        remember_mlflow_run(self.session.store, self.uri, self.run_id)
        return self

    def __exit__(self, *exc) -> bool:
        return bool(self._lifecycle.__exit__(*exc)) if self._lifecycle is not None else False

    def params(self, params: dict) -> None:
        """Log params not logged yet (a resumed run keeps its first values; changes become tags)."""
        if not self.active:
            return
        from mlflow import MlflowClient

        client = MlflowClient(self.uri)
        existing = client.get_run(self.run_id).data.params
        new = {k: v for k, v in params.items() if k not in existing}
        changed = {k: v for k, v in params.items() if k in existing and existing[k] != str(v)}
        if new:
            tracking.log_params(self.run_id, new, self.uri)
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

    def environment(self, device: torch.device, data) -> None:
        """What the run's numbers depend on (:mod:`pipeline.environment`), collected in this worker
        after its threads are set: ``env.*`` params (a resumed run's changes become ``resumed_with.env.*``
        tags) and all of it as ``env.*`` tags."""
        if self.active:
            from mlflow import MlflowClient
            from mlflow.entities import RunTag

            env = collect_environment(str(device), data)
            self.params(env.to_params())
            MlflowClient(self.uri).log_batch(self.run_id, tags=[RunTag(k, v) for k, v in env.to_tags().items()])


def run_params(cfg: TrainConfig, world: int, num_train_images: int) -> dict[str, str]:
    """The MLflow params of a run: ``train.*`` (incl. ``train.amp``), ``detector.*``, ``data.*``, ``schedule.*``."""
    scalars = {k: v for k, v in cfg.to_dict().items()
               if k not in ("detector", "data", "schedule", "mlflow", "fail_at_iteration")}
    return {**{f"train.{k}": v for k, v in tracking.flatten_config(scalars).items()},
            **{f"detector.{k}": v for k, v in tracking.flatten_config(cfg.detector.to_dict()).items()},
            **{f"data.{k}": v for k, v in tracking.flatten_config(cfg.data.to_dict()).items()},
            **{f"schedule.{k}": v for k, v in tracking.flatten_config(cfg.schedule.to_dict()).items()},
            "num_workers": str(world), "batch_per_worker": str(cfg.batch_size // world),
            "num_train_images": str(num_train_images)}


def precision_text(cfg: TrainConfig) -> str:
    if cfg.amp is None:
        return "precision fp32"
    return f"precision {cfg.amp} autocast (training only; evaluation in fp32)"


# ----------------------------------------------------------------------------------------------
# fault injection and the non-finite guard
# ----------------------------------------------------------------------------------------------
class FaultInjection(HookBase):
    """The last rank raises once at ``cfg.fail_at_iteration``; a marker in the run directory makes the retry pass."""

    def before_step(self) -> None:
        t = self.trainer
        it, session = t.iter, t.session
        if t.cfg.fail_at_iteration is None or it != t.cfg.fail_at_iteration or session.rank != session.world_size - 1:
            return
        marker = f"atss/fault_injected_{it}.json"
        if session.store.exists(marker):
            return
        session.store.write_json(marker, {"iteration": it, "rank": session.rank, "time": time.time()})
        raise RuntimeError(f"injected failure at iteration {it} on rank {session.rank} "
                           "(TrainConfig.fail_at_iteration; raised once per run)")


def check_nonfinite_marker(cfg: TrainConfig, session: Session, start: int) -> None:
    """Ray retries every worker failure; a NaN with the same config and checkpoint would only recur."""
    marker = session.store.read_json(NONFINITE_MARKER)
    if marker and marker.get("fingerprint") == cfg.fingerprint() and marker.get("resume_iteration") == start:
        raise NonFiniteLossError(f"{marker['error']} (an earlier attempt of this run; not retrying with the "
                                 f"same config from iteration {start}: change the config, e.g. a lower "
                                 "base_lr or max_grad_norm, or start a new run name)")


class NonFiniteGuard(HookBase):
    def on_error(self, error: BaseException) -> None:
        t = self.trainer
        if isinstance(error, NonFiniteLossError) and t.session.rank == 0:
            t.session.store.write_json(NONFINITE_MARKER, {
                "error": str(error), "iteration": t.iter, "fingerprint": t.cfg.fingerprint(),
                "resume_iteration": t.last_checkpoint_iteration})
            print(f"[train] {error}; the last good checkpoint is kept", file=sys.stderr, flush=True)


# ----------------------------------------------------------------------------------------------
# logging
# ----------------------------------------------------------------------------------------------
def _fmt_eta(seconds: float) -> str:
    if not math.isfinite(seconds):
        return "?"
    return str(datetime.timedelta(seconds=int(seconds)))


def _assign_stats_mean(sums: dict[str, float], n: int) -> dict[str, float]:
    """Assignment statistics averaged over the window and over workers (one small all_reduce)."""
    values = torch.tensor([sums.get(f"assign/{k}", 0.0) for k in ASSIGN_KEYS] + [float(n)], dtype=torch.float64)
    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        if dist.get_backend() == "nccl":
            values = values.cuda()
        dist.all_reduce(values)
    values = values.cpu().tolist()
    count = max(values[-1], 1.0)
    out = {f"assign/{k}": v / count for k, v in zip(ASSIGN_KEYS, values[:-1])}
    # per GT over the whole window (not a mean of per-batch ratios)
    if out["assign/num_gt"] > 0:
        out["assign/pos_per_gt"] = out["assign/num_pos"] / out["assign/num_gt"]
    return out


class MetricsLogger(HookBase):
    """Start lines and params; every ``log_period`` (and the first and last step) a progress line and MLflow metrics."""

    def __init__(self, tracker: WorkerTracker, num_train_images: int):
        self.tracker, self.num_train_images = tracker, num_train_images
        self._reset(time.perf_counter())

    def _reset(self, now: float) -> None:
        self.sums: dict[str, float] = {}
        self.n = 0
        self.images = 0
        self.data_time = 0.0
        self.start = now

    def before_train(self) -> None:
        t, cfg = self.trainer, self.trainer.cfg
        world = t.session.world_size
        if t.session.rank == 0:
            print(f"[train] {cfg.schedule.describe()}; {world} worker(s) x {cfg.batch_size // world} images on "
                  f"{t.session.device}; {precision_text(cfg)}", flush=True)
            print(f"[train] {self.num_train_images} training images, {t.category_map.num_classes} categories; "
                  f"run dir {t.session.store.uri}", flush=True)
            self.tracker.params(run_params(cfg, world, self.num_train_images))
            self.tracker.environment(t.session.device, cfg.data)
            self.tracker.text(json.dumps(cfg.to_dict(), indent=1, default=str), "config/train_config.json")
            self.tracker.text(json.dumps(cfg.detector.to_dict(), indent=1), "config/detector_config.json")
            if t.start_iter:
                self.tracker.metrics({"resumed_from_iteration": t.start_iter}, t.start_iter)
        self._reset(time.perf_counter())

    def after_step(self) -> None:
        t = self.trainer
        stats = ckpt_lib.unwrap(t.model).assign_stats
        values = {**{f"train/{k}": v for k, v in t.step.losses.items()}, "train/grad_norm": t.step.grad_norm,
                  **{f"assign/{k}": stats.get(k, 0.0) for k in ASSIGN_KEYS}}
        for k, v in values.items():
            self.sums[k] = self.sums.get(k, 0.0) + float(v)
        self.n += 1
        self.images += t.images_per_step
        self.data_time += t.data_time
        if not (t.every(t.cfg.log_period) or (t.cfg.log_period and (t.last_step or t.done == t.start_iter + 1))):
            return
        elapsed = time.perf_counter() - self.start
        means = {k: v / max(self.n, 1) for k, v in self.sums.items()}
        assign = _assign_stats_mean(self.sums, self.n)
        ips = self.images / elapsed if elapsed > 0 else float("nan")
        t.logged = {**{k: v for k, v in means.items() if k.startswith("train/")},
                    "train/lr": t.step.lr, "train/images_per_s": ips,
                    "train/data_time_share": self.data_time / elapsed if elapsed > 0 else 0.0}
        if t.session.rank == 0:
            losses = " ".join(f"{k.replace('loss_', '')} {means[f'train/{k}']:.3f}" for k in LOSS_KEYS)
            eta = _fmt_eta(elapsed / max(self.n, 1) * (t.max_iter - t.done))
            print(f"[train it {t.done}/{t.max_iter}] loss {means['train/loss']:.4f} ({losses}) "
                  f"lr {t.step.lr:.3g} {ips:.1f} img/s pos/gt {assign['assign/pos_per_gt']:.2f} ETA {eta}",
                  flush=True)
            self.tracker.metrics({**t.logged, **assign}, t.done)
        self._reset(time.perf_counter())


# ----------------------------------------------------------------------------------------------
# evaluation, checkpoints and reports
# ----------------------------------------------------------------------------------------------
class PeriodicEval(HookBase):
    """Sharded inference (fp32), gather, COCO scoring on rank 0; results json written and logged."""

    def __init__(self, tracker: WorkerTracker, val_set, out_dir: Path):
        self.tracker, self.val_set, self.out_dir = tracker, val_set, out_dir

    def after_step(self) -> None:
        t, cfg = self.trainer, self.trainer.cfg
        if t.every(cfg.eval_period) or (t.last_step and cfg.eval_at_end):
            t.eval_metrics, t.results_path = self.evaluate(t.done)
            t.eval_iteration = t.done
            t.model.train()

    def evaluate(self, iteration: int) -> tuple[Optional[dict], Optional[Path]]:
        t, cfg = self.trainer, self.trainer.cfg
        t0 = time.perf_counter()
        loader = build_dataloader(cfg.data, "val", cfg.eval_batch_size, train=False, dataset=self.val_set)
        outputs = predict(ckpt_lib.unwrap(t.model), loader, t.session.device)
        outputs = gather_across_workers(outputs, dedupe_key="image_id")
        if t.session.rank != 0:
            return None, None
        results = to_coco_results(outputs, category_map=t.category_map)
        path = write_results_json(results, self.out_dir / f"results_iter_{iteration:09d}.json")
        metrics = evaluate_coco(self.val_set.coco, results, backend=cfg.eval_backend)
        per_category = metrics.pop("per_category")
        print(f"[eval it {iteration}] " + " ".join(f"{k} {metrics[k]:.4f}" for k in METRIC_KEYS)
              + f" ({len(outputs)} images, {len(results)} detections, {time.perf_counter() - t0:.1f}s)", flush=True)
        self.tracker.metrics({f"eval/{k}": v for k, v in metrics.items()}, iteration)
        self.tracker.metrics({f"eval_per_category/{re.sub(r'[^A-Za-z0-9_./ -]', '_', n)}": v
                              for n, v in per_category.items()}, iteration)
        self.tracker.artifact(path, "eval")
        metrics_file = self.out_dir / f"metrics_iter_{iteration:09d}.json"
        metrics_file.write_text(json.dumps({**metrics, "per_category": per_category, "iteration": iteration},
                                           indent=1))
        self.tracker.artifact(metrics_file, "eval")
        return {**metrics, "per_category": per_category}, path


class CheckpointReport(HookBase):
    """Checkpoints (every ``checkpoint_period`` and at the end) and reports (at checkpoints,
    evaluations and every ``report_period``); every rank reports equally often."""

    def after_step(self) -> None:
        t, cfg = self.trainer, self.trainer.cfg
        evaluated = t.eval_iteration == t.done
        do_ckpt = t.every(cfg.checkpoint_period) or t.last_step
        if not (do_ckpt or evaluated or t.every(cfg.report_period)):
            return
        rank0 = t.session.rank == 0
        metrics = {"iteration": t.done, **{k.split("/")[-1]: v for k, v in t.logged.items()}}
        if evaluated and rank0:
            metrics.update({k: t.eval_metrics[k] for k in METRIC_KEYS})
        files = {"results.json": t.results_path} if (evaluated and do_ckpt and rank0) else None
        state = t.checkpoint_state(t.done) if do_ckpt else None
        path = t.session.report(metrics, bool(do_ckpt), state, files)
        t.reported = metrics
        t.checkpoint_path = path or t.checkpoint_path
        if do_ckpt:
            t.last_checkpoint_iteration = t.done


class FinalArtifacts(HookBase):
    """Rank 0, after the last step: loss curves, AP per category and the model (``log_model``)."""

    def __init__(self, tracker: WorkerTracker, out_dir: Path):
        self.tracker, self.out_dir = tracker, out_dir

    def after_train(self) -> None:
        t, cfg = self.trainer, self.trainer.cfg
        if t.session.rank != 0 or t.start_iter >= t.max_iter:
            return
        if t.eval_metrics is not None:
            print(f"[train] done: {t.max_iter} iterations, COCO AP {t.eval_metrics['AP']:.4f} "
                  f"(AP50 {t.eval_metrics['AP50']:.4f})", flush=True)
        if not self.tracker.active:
            return
        out_dir = self.out_dir
        history = tracking.metric_history(self.tracker.run_id,
                                          ("train/loss",) + tuple(f"train/{k}" for k in LOSS_KEYS), self.tracker.uri)
        self.tracker.artifact(tracking.plot_loss_curves({k.split("/")[-1]: v for k, v in history.items()},
                                                        out_dir / "loss_curves.png",
                                                        f"{cfg.run_name}: training losses"), "plots")
        if t.eval_metrics is not None:
            self.tracker.artifact(tracking.plot_per_category_ap(t.eval_metrics["per_category"],
                                                                out_dir / "ap_per_category.png",
                                                                f"{cfg.run_name}: AP per category"), "plots")
        if cfg.log_model:
            self._log_model()

    def _log_model(self) -> None:
        import mlflow
        import mlflow.pytorch
        import torchvision

        t, cfg = self.trainer, self.trainer.cfg
        state_file = ckpt_lib.save_state(t.checkpoint_state(t.max_iter, with_training_state=False), self.out_dir / "model")
        cpu_model = copy.deepcopy(ckpt_lib.unwrap(t.model)).cpu().eval()
        active = mlflow.active_run()
        same = active is not None and active.info.run_id == self.tracker.run_id
        with contextlib.nullcontext() if same else mlflow.start_run(run_id=self.tracker.run_id,
                                                                    nested=active is not None):
            # pickle: the model's forward takes lists of dicts, which the pt2 graph format cannot trace
            mlflow.pytorch.log_model(cpu_model, name="model", serialization_format="pickle",
                                     extra_files=[str(state_file)], registered_model_name=cfg.register_model,
                                     pip_requirements=[f"torch=={torch.__version__.split('+')[0]}",
                                                       f"torchvision=={torchvision.__version__.split('+')[0]}"])


def summary(trainer: Trainer) -> dict[str, Any]:
    """Rank 0's summary of a finished :meth:`Trainer.train` (see :func:`pipeline.training.worker.train_worker`)."""
    t = trainer
    out = {"iteration": max(t.start_iter, t.max_iter), "metrics": t.reported, "eval": t.eval_metrics,
           "checkpoint": t.checkpoint_path, "mlflow_run_id": t.mlflow_run_id,
           "train_s": t.train_s, "train_cpu_s": t.train_cpu_s, "steady_images": t.steady_images,
           "train_images_per_s": t.steady_images / t.train_s if t.train_s > 0 else None}
    if t.start_iter >= t.max_iter:
        print(f"[train] this run already finished at iteration {t.start_iter}; nothing to do (a new run "
              "name starts over, more iterations continue it)", flush=True)
        out["metrics"] = t.session.checkpoint_metrics()
        out["checkpoint"] = t.session.latest_checkpoint_path()
    return out
