"""What every Ray Train worker (or the single process) runs: build the trainer of a config and train.

:func:`train_loop_per_worker` is Ray Train's ``train_loop_per_worker`` (``config`` is
``TrainConfig.to_dict()``); :func:`train_in_process` runs the same loop without Ray (one process,
or one ``torchrun`` rank); :func:`train_in_tune` runs it inside a Tune function trainable (one
worker, checkpoints through Tune). DDP over gloo (CPU) or NCCL (GPU) is set up by Ray Train or torchrun.
"""
from __future__ import annotations

import tempfile
from pathlib import Path

import torch

from detector import build_detector
from pipeline.checkpoint import load_weights
from pipeline.data import build_dataloader, build_dataset
from pipeline.optim import WarmupMultiStepLR, build_optimizer, load_training_state

from . import hooks
from .config import TrainConfig
from .loop import Trainer, restore_rng
from .session import LocalSession, RaySession, Session, TuneSession

__all__ = ["train_worker", "train_loop_per_worker", "train_in_process", "train_in_tune"]


def train_worker(cfg: TrainConfig, session: Session) -> dict:
    """Train ``cfg`` on this worker; returns rank 0's summary (``result.return_value`` under Ray):
    ``iteration``, ``metrics`` (the last report), ``eval`` (final COCO metrics incl. ``per_category``),
    ``checkpoint`` (plain runs), ``mlflow_run_id``, ``train_s`` / ``train_cpu_s`` (wall / process CPU
    time of data loading and steps after the warm-up), ``steady_images`` and ``train_images_per_s``;
    ``{}`` on the other ranks."""
    device = session.device
    threads = cfg.torch_threads or session.default_threads()
    if threads:
        torch.set_num_threads(threads)
    world = session.world_size
    if cfg.batch_size % world:
        raise ValueError(f"batch_size {cfg.batch_size} is not divisible by the {world} workers")
    train_set = build_dataset(cfg.data, "train", train=True)
    category_map = train_set.category_map
    if category_map.num_classes != cfg.detector.num_classes:
        raise ValueError(f"the training data now has {category_map.num_classes} categories, the config was "
                         f"built for {cfg.detector.num_classes}; build the TrainConfig again")

    torch.manual_seed(cfg.seed)  # identical initial weights on every rank (DDP also broadcasts them)
    model = build_detector(cfg.detector).to(device)
    optimizer = build_optimizer(model, cfg.schedule, cfg.momentum, cfg.weight_decay, cfg.bias_lr_factor,
                                cfg.bias_weight_decay)
    scheduler = WarmupMultiStepLR(optimizer, cfg.schedule)
    state = session.latest_state()
    start = 0
    if state is not None:
        # strict: a resume after changing the architecture fails naming the keys, not a RuntimeError
        load_weights(model, state["model"], f"resume from {session.latest_checkpoint_path() or 'the latest checkpoint'}")
        start = int(state["iteration"])
        if "optimizer" in state:
            load_training_state(optimizer, scheduler, cfg.schedule, state["optimizer"], state["scheduler"],
                                start, cfg.momentum)
        same_rng = restore_rng(state.get("rng"), session)
        if session.rank == 0:
            note = "" if same_rng else " (different worker count: RNG states not restored)"
            print(f"[train] resumed from the checkpoint at iteration {start}{note}", flush=True)
    else:
        torch.manual_seed(cfg.seed + 1000 * session.rank)
    hooks.check_nonfinite_marker(cfg, session, start)

    if world > 1:
        from torch.nn.parallel import DistributedDataParallel

        model = DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda" else None)
    loader = build_dataloader(cfg.data, "train", cfg.batch_size // world, train=True, seed=cfg.seed,
                              start_iter=start, dataset=train_set)
    val_set = build_dataset(cfg.data, "val", train=False) if cfg.evaluates else None
    out_dir = session.store.local_path("eval") or Path(tempfile.mkdtemp(prefix="atss_eval_"))
    if session.rank == 0:
        out_dir.mkdir(parents=True, exist_ok=True)

    with hooks.WorkerTracker(cfg, session, state) as tracker:
        trainer = Trainer(cfg, session, model, optimizer, scheduler, loader, start, category_map, [
            hooks.FaultInjection(),
            hooks.NonFiniteGuard(),
            hooks.MetricsLogger(tracker, num_train_images=len(train_set)),
            hooks.PeriodicEval(tracker, val_set, out_dir),
            hooks.CheckpointReport(),
            hooks.FinalArtifacts(tracker, out_dir),
        ], mlflow_run_id=tracker.run_id)
        trainer.train()
        return hooks.summary(trainer) if session.rank == 0 else {}


def train_loop_per_worker(config: dict) -> dict:
    """Ray Train V2 ``train_loop_per_worker``: ``config`` is ``TrainConfig.to_dict()``."""
    cfg = TrainConfig.from_dict(config)
    return train_worker(cfg, RaySession(cfg))


def train_in_process(cfg: TrainConfig) -> dict:
    """The same loop without Ray (one process, or one ``torchrun`` rank)."""
    return train_worker(cfg, LocalSession(cfg))


def train_in_tune(cfg: TrainConfig) -> dict:
    """The same loop as the body of a Tune function trainable (one worker; ``tune.report`` /
    ``tune.get_checkpoint``)."""
    return train_worker(cfg, TuneSession(cfg))
