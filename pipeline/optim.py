"""The paper's optimiser (spec ``ATSS.md`` section 5) driven by a resolved :class:`~pipeline.schedule.Schedule`.

SGD, momentum 0.9, weight decay 1e-4 at the reference batch of 16 images; biases get LR x2 and no
weight decay (GroupNorm weights and the per-level scalars keep the normal LR and decay). The LR
follows the schedule's warm-up and steps (:class:`WarmupMultiStepLR`).
"""
from __future__ import annotations

import math

import torch
from torch import nn

from pipeline.schedule import Schedule, lr_factor

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
