"""Training: the typed run config, the loop with its hooks, Ray Train sessions and the driver.

* :mod:`.config`: :class:`TrainConfig` and :func:`build_train_config` (settings -> resolved config).
* :mod:`.store`: :class:`Store`, small files of a run or a sweep, local or remote (``pyarrow.fs``).
* :mod:`.reporting`: Ray's log levels and console filters, Tune's progress columns.
* :mod:`.session`: a Ray Train worker, a Tune trial or a plain process (rank, device, checkpoints, reports).
* :mod:`.loop`: one optimisation step and the :class:`Trainer` that calls its hooks.
* :mod:`.hooks`: logging, periodic evaluation, checkpoint/report, non-finite guard, fault injection.
* :mod:`.worker`: what each worker runs (``train_loop_per_worker``).
* :mod:`.driver`: :func:`run_training`, :func:`build_trainer`, :func:`tracked_training`.

The config, store, reporting and driver modules are plain Python; the loop and the worker load
torch on first use (PEP 562), so a sweep's driver plans and watches trials without it.
"""
from __future__ import annotations

from typing import TYPE_CHECKING

from detector.lazy import lazy_exports

from .config import SETTINGS, TrainConfig, build_train_config, check_settings, is_tiny, read_categories
from .driver import (TrainResult, build_trainer, check_data_paths, check_workers, connect_ray, run_training,
                     tracked_training, worker_error)
from .store import Store

if TYPE_CHECKING:
    from .loop import NonFiniteLossError, train_step
    from .worker import train_in_process, train_loop_per_worker

TORCH_NAMES = {"NonFiniteLossError": "loop", "train_step": "loop", "train_in_process": "worker",
               "train_loop_per_worker": "worker"}

__all__ = ["TrainConfig", "build_train_config", "check_settings", "is_tiny", "read_categories", "SETTINGS",
           "TrainResult", "build_trainer", "check_data_paths", "check_workers", "connect_ray", "run_training",
           "tracked_training", "worker_error", "Store", *TORCH_NAMES]

__getattr__ = lazy_exports(__name__, TORCH_NAMES)
