"""The training loop, detectron2-style: :class:`Trainer` runs ``run_step`` and calls its hooks.

One step (:func:`train_step`) is forward, worker-averaged loss check, backward, gradient guard, SGD
and LR step. Everything else a run does around the steps (logging, periodic evaluation, checkpoint
and report, the non-finite guard, fault injection) is a hook (:mod:`pipeline.training.hooks`);
:mod:`pipeline.training.worker` builds the trainer.
"""
from __future__ import annotations

import math
import time
from dataclasses import dataclass
from typing import Any, Iterable, Optional

import torch
import torch.distributed as dist

from pipeline import checkpoint as ckpt_lib
from pipeline.optim import grad_norm

from .config import TrainConfig
from .session import Session

__all__ = ["LOSS_KEYS", "NonFiniteLossError", "StepOutput", "train_step", "to_device", "HookBase", "Trainer",
           "restore_rng"]

LOSS_KEYS = ("loss_cls", "loss_reg", "loss_centerness")
WARMUP_STEPS = 2  # iterations left out of the images/s figure (first-step initialisation)
AMP_DTYPES = {"bf16": torch.bfloat16}


class NonFiniteLossError(FloatingPointError):
    """The loss or the gradient norm became NaN/inf; the run stops and keeps its last good checkpoint."""


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
               targets: list[dict], iteration: int, amp: Optional[str] = None,
               max_grad_norm: Optional[float] = None, image_sizes=None) -> StepOutput:
    """Forward, loss check, backward, gradient guard, SGD step, LR step.

    ``amp``: None computes in fp32; ``"bf16"`` runs the forward under bf16 autocast on the images'
    device. The loss values are averaged over workers *before* the check, so every rank sees the
    same numbers and all stop together on a non-finite loss (no rank left waiting in a collective).
    Because the detector divides by the worker-averaged normalisers (spec 3.6), this average is
    exactly the loss of the global batch: 1 worker x 4 images == mean of 2 workers x 2 images.
    """
    if amp is not None and amp not in AMP_DTYPES:
        raise ValueError(f"amp must be None (fp32) or one of {sorted(AMP_DTYPES)}, got {amp!r}")
    device = images.device
    with torch.autocast(device.type, dtype=AMP_DTYPES.get(amp, torch.float32), enabled=amp is not None):
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


def to_device(images: torch.Tensor, targets: list[dict], device: torch.device):
    """The batch on ``device`` (the target tensors the losses use)."""
    images = images.to(device, non_blocking=True)
    out = []
    for t in targets:
        t = dict(t)
        for k in ("boxes", "labels", "crowd_boxes"):
            if k in t:
                t[k] = t[k].to(device, non_blocking=True)
        out.append(t)
    return images, out


# ----------------------------------------------------------------------------------------------
# the trainer
# ----------------------------------------------------------------------------------------------
class HookBase:
    """Called by :class:`Trainer` around the loop; ``self.trainer`` is set on registration.

    ``after_step`` sees ``trainer.iter`` (0-based) of the step just done; ``on_error`` sees the
    exception that ends the loop (it propagates afterwards)."""

    trainer: "Trainer"

    def before_train(self) -> None: ...

    def before_step(self) -> None: ...

    def after_step(self) -> None: ...

    def after_train(self) -> None: ...

    def on_error(self, error: BaseException) -> None: ...


class Trainer:
    """``train()`` runs ``run_step()`` from ``start_iter`` to ``cfg.max_iter`` and calls the hooks.

    State the hooks share: ``iter``, ``step`` (the last :class:`StepOutput`), ``data_time``,
    ``images_per_step`` (global), ``train_s`` / ``train_cpu_s`` / ``steady_images`` (data + step
    time after ``WARMUP_STEPS``), and what the hooks themselves publish (``logged``,
    ``eval_iteration`` / ``eval_metrics`` / ``results_path``, ``reported``, ``checkpoint_path``,
    ``last_checkpoint_iteration``).
    """

    def __init__(self, cfg: TrainConfig, session: Session, model: torch.nn.Module, optimizer, scheduler,
                 loader: Iterable, start_iter: int, category_map, hooks: Iterable[HookBase] = (),
                 mlflow_run_id: Optional[str] = None):
        self.cfg, self.session = cfg, session
        self.model, self.optimizer, self.scheduler = model, optimizer, scheduler
        self.loader, self.category_map = loader, category_map
        self.mlflow_run_id = mlflow_run_id  # recorded in checkpoints, so a restarted worker logs to the same run
        self.start_iter = self.iter = start_iter
        self.max_iter = cfg.max_iter
        self.images_per_step = cfg.batch_size
        self.step: Optional[StepOutput] = None
        self.data_time = 0.0
        self.train_s = self.train_cpu_s = 0.0
        self.steady_images = 0
        self.logged: dict[str, float] = {}
        self.eval_iteration: Optional[int] = None
        self.eval_metrics: Optional[dict] = None
        self.results_path = None
        self.reported: dict[str, Any] = {}
        self.checkpoint_path: Optional[str] = None
        self.last_checkpoint_iteration = start_iter  # where a retry would resume
        self.hooks: list[HookBase] = []
        for h in hooks:
            h.trainer = self
            self.hooks.append(h)

    def train(self) -> None:
        try:
            for h in self.hooks:
                h.before_train()
            self.model.train()
            self._data = iter(self.loader)
            for self.iter in range(self.start_iter, self.max_iter):
                for h in self.hooks:
                    h.before_step()
                self.run_step()
                for h in self.hooks:
                    h.after_step()
            for h in self.hooks:
                h.after_train()
        except BaseException as e:
            for h in self.hooks:
                h.on_error(e)
            raise

    def run_step(self) -> None:
        t_data, cpu_data = time.perf_counter(), time.process_time()
        images, targets = next(self._data)
        images, targets = to_device(images, targets, self.session.device)
        self.data_time = time.perf_counter() - t_data
        self.step = train_step(self.model, self.optimizer, self.scheduler, images, targets, self.iter,
                               self.cfg.amp, self.cfg.max_grad_norm,
                               image_sizes=[tuple(t["image_size"]) for t in targets])
        if self.iter >= self.start_iter + WARMUP_STEPS:
            self.train_s += time.perf_counter() - t_data
            self.train_cpu_s += time.process_time() - cpu_data
            self.steady_images += self.images_per_step

    # -- helpers for hooks ------------------------------------------------------------------------
    @property
    def done(self) -> int:
        """Iterations finished after the current step."""
        return self.iter + 1

    def every(self, period: int) -> bool:
        return bool(period) and self.done % period == 0

    @property
    def last_step(self) -> bool:
        return self.done == self.max_iter

    def checkpoint_state(self, iteration: int, with_training_state: bool = True) -> Optional[dict]:
        """The checkpoint dict on rank 0 (None elsewhere); with the training state this is a
        collective (every rank's RNG state is gathered), so all ranks call it together."""
        rng = _gather_rng() if with_training_state else None
        if self.session.rank != 0:
            return None
        return ckpt_lib.build_state(
            self.model, self.cfg.detector, self.category_map.to_list(), iteration,
            optimizer=self.optimizer if with_training_state else None,
            scheduler=self.scheduler if with_training_state else None,
            rng=rng, train_config=self.cfg.to_dict(), extra={"mlflow_run_id": self.mlflow_run_id})



def _gather_rng() -> dict:
    state = ckpt_lib.get_rng_state()
    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        per_rank: list = [None] * dist.get_world_size()
        dist.all_gather_object(per_rank, state)
        return {"per_rank": per_rank}
    return {"per_rank": [state]}


def restore_rng(rng: Optional[dict], session: Session) -> bool:
    """This rank's RNG state from a checkpoint taken with the same worker count (else False)."""
    per_rank = (rng or {}).get("per_rank") or []
    if len(per_rank) != session.world_size:
        return False  # a different worker count: data order is still exact, augmentation seeds too
    ckpt_lib.set_rng_state(per_rank[session.rank])
    return True
