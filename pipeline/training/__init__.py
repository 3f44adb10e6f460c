"""Training: the typed run config, the loop with its hooks, Ray Train sessions and the driver.

* :mod:`.config`: :class:`TrainConfig` and :func:`build_train_config` (settings -> resolved config).
* :mod:`.store`: :class:`Store`, small files of a run or a sweep, local or remote (``pyarrow.fs``).
* :mod:`.session`: a Ray Train worker or a plain process (rank, device, checkpoints, reports).
* :mod:`.loop`: one optimisation step and the :class:`Trainer` that calls its hooks.
* :mod:`.hooks`: logging, periodic evaluation, checkpoint/report, non-finite guard, fault injection.
* :mod:`.worker`: what each worker runs (``train_loop_per_worker``).
* :mod:`.driver`: :func:`run_training`, :func:`build_trainer`, :func:`tracked_training`.
"""
from .config import SETTINGS, TrainConfig, build_train_config, check_settings, is_tiny, read_categories
from .driver import (TrainResult, build_trainer, check_data_paths, check_workers, connect_ray, run_training,
                     tracked_training, worker_error)
from .loop import NonFiniteLossError, train_step
from .store import Store
from .worker import train_in_process, train_loop_per_worker

__all__ = ["TrainConfig", "build_train_config", "check_settings", "is_tiny", "read_categories", "SETTINGS",
           "TrainResult", "build_trainer", "check_data_paths", "check_workers", "connect_ray", "run_training",
           "tracked_training", "worker_error", "NonFiniteLossError", "train_step", "Store", "train_in_process",
           "train_loop_per_worker"]
