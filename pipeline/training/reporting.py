"""What Ray prints and what a trial reports: Ray Train's log levels, the console filters every
Ray worker of a job installs, and :class:`TuneProgress` (a report as the row of Tune's table).

Plain Python and logging (no torch): a sweep's driver installs the hook and reads the columns.
"""
from __future__ import annotations

import logging
import os
import time
from typing import Optional

__all__ = ["COORDINATOR_LOGGER", "TuneProgress", "ray_train_logging", "quiet_ray_train_reports",
           "quiet_ray_workers"]

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
    trial's remaining training time at its rate so far; at the first report, when ``batch_size``
    is given, at the loop's own ``images_per_s``); the loss goes in as ``mean_loss``, which Tune
    shows as ``loss``. Tune picks its first four numeric keys for the table once, from the
    first results, so every result has them from the first on."""

    COLUMNS = ("iteration", "images_per_s", "AP", "eta_s", "mean_loss")

    def __init__(self, max_iter: int, batch_size: Optional[int] = None):
        self.max_iter, self.batch_size = max_iter, batch_size
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
        rate = metrics.get("images_per_s")
        if it > it0:
            eta = (now - t0) / (it - it0) * (self.max_iter - it)
        elif self.batch_size and rate:
            eta = (self.max_iter - it) * self.batch_size / rate  # the images this trial has left
        else:
            eta = None
        out = {"iteration": it, "images_per_s": rate, "AP": self.ap, "eta_s": eta, "mean_loss": metrics.get("loss")}
        out.update((k, v) for k, v in metrics.items() if k not in out and k != "loss")
        return out
