"""The paper's learning-rate schedule (spec ``ATSS.md`` section 5.3), with the linear scaling rule.

Official recipe at the reference batch of 16 images: base LR 0.01; a constant warm-up at LR x 1/3 for
500 iterations; 1x = 90k iterations with LR x0.1 at 60k and 80k, 2x = 180k with steps at 120k and 160k.

When the global batch differs from the reference, :func:`resolve_schedule` applies the linear scaling
rule (Goyal et al. 2017, and detectron2's ``auto_scale_workers``): LR x ``batch / 16``, and every
iteration count of a named schedule (length, steps, warm-up) x ``16 / batch``, so the run sees the
same number of images per LR phase. :meth:`Schedule.describe` says in one line what was applied.

Plain Python: a driver resolves every trial's schedule without loading torch (:mod:`pipeline.optim`
turns a :class:`Schedule` into an optimiser and an LR scheduler).
"""
from __future__ import annotations

import bisect
from dataclasses import asdict, dataclass, fields

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
