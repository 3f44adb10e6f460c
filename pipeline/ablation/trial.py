"""What a sweep's Tune trial runs, in the trial's own process (:func:`pipeline.ablation.sweep.run_trial`).

* :func:`trial_config`: the trial's :class:`TrialConfig` from Tune's config (the planned config with
  the values of the short swept keys applied).
* :func:`train_trial`: a 1-worker trial trains here, through the same ``Trainer`` as Ray Train's
  workers (:func:`pipeline.training.worker.train_in_tune`); a multi-worker trial fits a
  ``TorchTrainer`` whose rank 0 reports reach Tune through :class:`ProgressReportCallback`.

This module loads torch; the sweep's driver never imports it.
"""
from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from typing import Any, Optional

from ray.tune.integration.ray_train import TuneReportCallback

from pipeline.training import build_trainer, tracked_training, worker_error
from pipeline.training.reporting import TuneProgress
from pipeline.training.worker import train_in_tune

from .plan import TrialConfig

__all__ = ["trial_config", "train_trial", "ProgressReportCallback"]


def trial_config(config: Mapping[str, Any]) -> TrialConfig:
    """The :class:`TrialConfig` a Tune trial trains: its planned config with the values of the
    short swept keys applied (they are the real hyperparameters, as in any Tune ``param_space``)."""
    planned = {k: config[k] for k in ("index", "label", "paper", "train", "resources") if k in config}
    trial = TrialConfig.from_dict(planned)
    swept = {k: v for k, v in config.items() if k not in planned and k != "name"}
    train = trial.train
    if "seed" in swept:
        train = train.replace(seed=int(swept.pop("seed")))
    if swept:
        overrides = TrialConfig.from_dict({**planned, "train": {**planned["train"], "detector": {
            **planned["train"]["detector"], **swept}}}).train.detector  # coerced like the plan's values
        train = train.replace(detector=overrides)
    return dataclasses.replace(trial, train=train)


class ProgressReportCallback(TuneReportCallback):
    """``TuneReportCallback`` whose results lead with the progress table's columns (:class:`TuneProgress`)."""

    def __init__(self, max_iter: int):
        super().__init__()
        self.progress = TuneProgress(max_iter)

    def after_report(self, run_context, metrics, checkpoint):
        super().after_report(run_context, [self.progress.result(metrics[0])] + list(metrics[1:]), checkpoint)


def train_trial(config: Mapping[str, Any], max_failures: int = 0, accelerator_type: Optional[str] = None) -> None:
    """Train the trial that Tune's ``config`` describes (:func:`trial_config`).

    Its MLflow child run is started (or re-attached after a restart or restore) before training
    starts, so a trial that never trains is still visible, and ends FAILED with the error.
    """
    trial = trial_config(config)
    res = trial.resources
    with tracked_training(trial.train, trial.run_label, clear_tags=("ablation.stopped",)) as train:
        if res.num_workers == 1:
            train_in_tune(train)
            return
        scaling = {"placement_strategy": res.scaling_config_kwargs()["placement_strategy"]}
        if accelerator_type:
            scaling["accelerator_type"] = accelerator_type
        trainer = build_trainer(train, res.num_workers, res.use_gpu, res.resources_per_worker(), max_failures,
                                [ProgressReportCallback(train.max_iter)], scaling)
        try:
            trainer.fit()
        except BaseException as e:
            cause = worker_error(e)
            if cause is not e and isinstance(cause, Exception):
                raise cause from e  # the worker's own error, not Ray's wrapper
            raise
