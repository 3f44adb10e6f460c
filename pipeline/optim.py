"""The paper's optimiser and learning-rate schedule (spec ``ATSS.md`` section 5), with the linear scaling rule.

Official recipe at the reference batch of 16 images: SGD, momentum 0.9, base LR 0.01, weight decay 1e-4;
biases get LR x2 and no weight decay (GroupNorm weights and the per-level scalars keep the normal LR and
decay); a constant warm-up at LR x 1/3 for 500 iterations; 1x = 90k iterations with LR x0.1 at 60k and
80k, 2x = 180k with steps at 120k and 160k.

When the global batch differs from the reference, :func:`resolve_schedule` applies the linear scaling
rule (Goyal et al. 2017, and detectron2's ``auto_scale_workers``): LR x ``batch / 16``, and every
iteration count of a named schedule (length, steps, warm-up) x ``16 / batch``, so the run sees the
same number of images per LR phase. :meth:`Schedule.describe` says in one line what was applied.
"""
from __future__ import annotations

import bisect
import math
from dataclasses import asdict, dataclass, fields

import torch
from torch import nn

# name -> (iterations, LR steps) at the reference batch (spec 5.3)
NAMED_SCHEDULES: dict[str, tuple[int, tuple[int, ...]]] = {
    "1x": (90_000, (60_000, 80_000)),
    "2x": (180_000, (120_000, 160_000)),
}
REFERENCE_BATCH_SIZE = 16
REFERENCE_WARMUP_ITERS = 500


def lr_factor(iteration: int, steps, gamma: float, warmup_iters: int, warmup_factor: float) -> float:
    """LR multiplier at 0-based ``iteration``: ``gamma ** (steps passed)``, times ``warmup_factor`` in warm-up.

    A step at ``s`` applies from iteration ``s`` on (maskrcnn-benchmark's ``bisect_right``).
    """
    factor = gamma ** bisect.bisect_right(steps, iteration)
    return factor * warmup_factor if iteration < warmup_iters else factor


@dataclass(frozen=True)
class Schedule:
    """A resolved schedule: what the training loop actually runs (all counts in iterations)."""

    base_lr: float  # LR after linear scaling (biases get ``bias_lr_factor`` x this)
    max_iter: int
    steps: tuple[int, ...]
    warmup_iters: int
    warmup_factor: float
    gamma: float
    batch_size: int
    # what the user asked for, kept so the log can say what changed
    requested_lr: float
    reference_batch_size: int
    name: str  # "1x", "2x" or "custom"

    def lr_factor(self, iteration: int) -> float:
        """Multiplier of ``base_lr`` at ``iteration`` (0-based): constant warm-up, then step decay."""
        return lr_factor(iteration, self.steps, self.gamma, self.warmup_iters, self.warmup_factor)

    def describe(self) -> str:
        """One line for the log stating the schedule and any linear-scaling change."""
        scale = self.batch_size / self.reference_batch_size
        lr = f"LR {self.base_lr:g}"
        if scale != 1:
            lr = (f"LR {self.requested_lr:g} @ batch {self.reference_batch_size} -> {self.base_lr:g} "
                  f"@ batch {self.batch_size} (linear scaling x{scale:g})")
        steps = ", ".join(str(s) for s in self.steps) or "none"
        text = (f"schedule {self.name}: {self.max_iter} iterations, batch {self.batch_size}, {lr}, "
                f"x{self.gamma:g} at [{steps}], warm-up {self.warmup_iters} it at x{self.warmup_factor:.3g}")
        if self.name in NAMED_SCHEDULES and scale != 1:
            ref_iter, ref_steps = NAMED_SCHEDULES[self.name]
            text += (f" (iterations scaled x{1 / scale:g} from {ref_iter} / [{', '.join(map(str, ref_steps))}]"
                     f" / warm-up {REFERENCE_WARMUP_ITERS} at batch {self.reference_batch_size})")
        return text

    def to_dict(self) -> dict:
        d = asdict(self)
        d["steps"] = list(self.steps)
        return d

    @classmethod
    def from_dict(cls, d: dict) -> "Schedule":
        """Inverse of :meth:`to_dict`; unknown or missing keys raise ``ValueError`` naming them."""
        names = [f.name for f in fields(cls)]
        unknown, missing = sorted(set(d) - set(names)), [n for n in names if n not in d]
        if unknown or missing:
            raise ValueError(f"Schedule: unknown key(s) {unknown}, missing key(s) {missing}")
        return cls(**{**d, "steps": tuple(int(s) for s in d["steps"])})


def resolve_schedule(
    batch_size: int,
    schedule: str | None = "1x",
    iterations: int | None = None,
    steps: tuple[int, ...] | list[int] | None = None,
    base_lr: float = 0.01,
    reference_batch_size: int = REFERENCE_BATCH_SIZE,
    warmup_iters: int | None = None,
    warmup_factor: float = 1.0 / 3.0,
    gamma: float = 0.1,
    scale_lr: bool = True,
) -> Schedule:
    """Turn the user's request into the schedule the loop runs.

    * ``schedule`` "1x"/"2x" (with ``iterations`` None): the paper's lengths and steps, scaled by
      ``reference_batch_size / batch_size``; warm-up 500 scaled the same way unless given.
    * ``iterations`` given: an explicit length. Steps default to the 1x proportions (2/3 and 8/9 of the
      run) and the warm-up to the 1x share of the run (500 / 90k), unless given.
    * ``base_lr`` is the LR at ``reference_batch_size``; with ``scale_lr`` it becomes
      ``base_lr * batch_size / reference_batch_size``.
    """
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    if reference_batch_size < 1:
        raise ValueError(f"reference_batch_size must be >= 1, got {reference_batch_size}")
    if not base_lr > 0:
        raise ValueError(f"base_lr must be > 0, got {base_lr}")
    if not 0 < warmup_factor <= 1:
        raise ValueError(f"warmup_factor must be in (0, 1], got {warmup_factor}")
    if not 0 < gamma <= 1:
        raise ValueError(f"gamma must be in (0, 1], got {gamma}")
    iter_scale = reference_batch_size / batch_size
    if iterations is None:
        if schedule not in NAMED_SCHEDULES:
            raise ValueError(f"unknown schedule {schedule!r}: use one of {sorted(NAMED_SCHEDULES)} "
                             "or give an explicit number of iterations")
        ref_iter, ref_steps = NAMED_SCHEDULES[schedule]
        name = schedule
        max_iter = max(1, round(ref_iter * iter_scale))
        default_steps = tuple(round(s * iter_scale) for s in ref_steps)
        default_warmup = round(REFERENCE_WARMUP_ITERS * iter_scale)
    else:
        if iterations < 1:
            raise ValueError(f"iterations must be >= 1, got {iterations}")
        name = "custom"
        max_iter = int(iterations)
        ref_iter, ref_steps = NAMED_SCHEDULES["1x"]
        default_steps = tuple(round(max_iter * s / ref_iter) for s in ref_steps)
        default_warmup = round(max_iter * REFERENCE_WARMUP_ITERS / ref_iter)
    steps = tuple(int(s) for s in (default_steps if steps is None else steps))
    if list(steps) != sorted(steps) or any(s < 0 for s in steps):
        raise ValueError(f"LR steps must be non-negative and increasing, got {list(steps)}")
    warmup = default_warmup if warmup_iters is None else int(warmup_iters)
    if warmup < 0:
        raise ValueError(f"warmup_iters must be >= 0, got {warmup}")
    lr = base_lr * batch_size / reference_batch_size if scale_lr else base_lr
    return Schedule(base_lr=lr, max_iter=max_iter, steps=steps, warmup_iters=warmup,
                    warmup_factor=warmup_factor, gamma=gamma, batch_size=batch_size,
                    requested_lr=base_lr, reference_batch_size=reference_batch_size, name=name)


def param_groups(model: nn.Module, base_lr: float, weight_decay: float = 1e-4,
                 bias_lr_factor: float = 2.0, bias_weight_decay: float = 0.0) -> list[dict]:
    """Split trainable parameters into the official two groups.

    maskrcnn-benchmark's ``make_optimizer`` matches ``"bias"`` in the parameter name; every other
    parameter (conv and GroupNorm weights, per-level scalars) gets the base LR and weight decay.
    Frozen parameters (``requires_grad=False``) are left out.
    """
    weights, biases = [], []
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        (biases if name.endswith("bias") else weights).append(p)
    groups = [{"params": weights, "lr": base_lr, "weight_decay": weight_decay, "name": "weights"}]
    if biases:
        groups.append({"params": biases, "lr": base_lr * bias_lr_factor,
                       "weight_decay": bias_weight_decay, "name": "biases"})
    return groups


def build_optimizer(model: nn.Module, schedule: Schedule, momentum: float = 0.9, weight_decay: float = 1e-4,
                    bias_lr_factor: float = 2.0, bias_weight_decay: float = 0.0) -> torch.optim.SGD:
    """SGD with momentum over :func:`param_groups`; LRs are the post-warm-up values (the scheduler scales them)."""
    groups = param_groups(model, schedule.base_lr, weight_decay, bias_lr_factor, bias_weight_decay)
    if not any(g["params"] for g in groups):
        raise ValueError("the model has no trainable parameters")
    return torch.optim.SGD(groups, lr=schedule.base_lr, momentum=momentum, weight_decay=weight_decay)


class WarmupMultiStepLR(torch.optim.lr_scheduler.LRScheduler):
    """Constant warm-up then step decay, in closed form so a resumed run lands on the exact LR.

    ``scheduler.step()`` is called once per iteration after ``optimizer.step()``; the LR of iteration
    ``i`` is ``initial_lr * schedule.lr_factor(i)`` for every parameter group.
    """

    def __init__(self, optimizer: torch.optim.Optimizer, schedule: Schedule, last_epoch: int = -1):
        self.steps = list(schedule.steps)
        self.gamma = schedule.gamma
        self.warmup_iters = schedule.warmup_iters
        self.warmup_factor = schedule.warmup_factor
        super().__init__(optimizer, last_epoch)

    def get_lr(self) -> list[float]:
        factor = lr_factor(max(self.last_epoch, 0), self.steps, self.gamma, self.warmup_iters, self.warmup_factor)
        return [group["initial_lr"] * factor for group in self.optimizer.param_groups]


def grad_norm(parameters, max_norm: float | None) -> torch.Tensor:
    """Total L2 norm of the gradients; clips to ``max_norm`` when given (the paper does not clip).

    The norm is returned even without clipping so the loop can stop on a non-finite gradient.
    """
    params = [p for p in parameters if p.grad is not None]
    if not params:
        return torch.zeros(())
    norm = torch.nn.utils.get_total_norm([p.grad for p in params])
    if max_norm is not None and math.isfinite(max_norm):
        torch.nn.utils.clip_grads_with_norm_(params, max_norm, norm)
    return norm


def load_training_state(optimizer: torch.optim.Optimizer, scheduler: WarmupMultiStepLR, schedule: Schedule,
                        optimizer_state: dict, scheduler_state: dict, iteration: int,
                        momentum: float = 0.9) -> None:
    """Resume: momentum buffers and the scheduler position from a checkpoint; the LRs, weight decay,
    momentum and LR steps from the *current* schedule and optimiser.

    So a run resubmitted with a lower LR or a longer schedule uses it (the way out of a NaN: same
    run name, lower ``base_lr``). Call it on a freshly built optimiser and scheduler, whose groups
    hold the current LRs and decays; ``iteration`` is where the run continues.
    """
    # initial_lr: the scheduler has already scaled "lr" to iteration 0's warm-up value
    fresh = [(g.get("initial_lr", g["lr"]), g["weight_decay"]) for g in optimizer.param_groups]
    optimizer.load_state_dict(optimizer_state)
    scheduler.load_state_dict(scheduler_state)
    scheduler.steps = list(schedule.steps)
    scheduler.gamma = schedule.gamma
    scheduler.warmup_iters = schedule.warmup_iters
    scheduler.warmup_factor = schedule.warmup_factor
    scheduler.base_lrs = [lr for lr, _ in fresh]
    factor = schedule.lr_factor(iteration)
    for group, (lr, wd) in zip(optimizer.param_groups, fresh):
        group.update(initial_lr=lr, lr=lr * factor, weight_decay=wd, momentum=momentum)
    scheduler._last_lr = [g["lr"] for g in optimizer.param_groups]
