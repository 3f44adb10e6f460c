"""From a :class:`DataConfig` to datasets and DataLoaders (plain, DDP and Ray Train workers)."""
from __future__ import annotations

import functools
import logging
from typing import Optional

import torch
import torch.distributed as dist
from torch.utils.data import DataLoader

from .batching import collate
from .config import DataConfig
from .dataset import CocoDetection
from .samplers import GroupedBatchSampler, InferenceBatchSampler, orientation_groups
from .sources import resolve_split
from .transforms import DetectionTransform

__all__ = ["build_dataset", "build_dataloader"]

log = logging.getLogger(__name__)

def build_dataset(cfg: DataConfig, split: str, train: bool) -> CocoDetection:
    """The :class:`CocoDetection` of ``split``; ``train`` picks training filtering and augmentation."""
    ann, images = resolve_split(cfg, split)
    if train:
        transform = DetectionTransform(cfg.train_min_size, cfg.max_size, cfg.flip_prob)
    else:
        transform = DetectionTransform(cfg.test_min_size, cfg.max_size, 0.0)
    return CocoDetection(ann, images, train=train, transform=transform, min_box_size=cfg.min_box_size,
                         max_bad_fraction=cfg.max_bad_fraction, gpu_decode=cfg.gpu_decode)


def _dist_world() -> tuple[int, int]:
    if dist.is_available() and dist.is_initialized():
        return dist.get_world_size(), dist.get_rank()
    return 1, 0


def _worker_init(_worker_id: int) -> None:
    # Decoding and resizing are per-sample; intra-op threads in every worker oversubscribe cores.
    torch.set_num_threads(1)


def build_dataloader(data_cfg: DataConfig, split: str, batch_size: int, train: bool, seed: int = 0,
                     num_replicas: Optional[int] = None, rank: Optional[int] = None, *,
                     infinite: bool = True, start_iter: int = 0, num_workers: Optional[int] = None,
                     dataset: Optional[CocoDetection] = None, pin_memory: Optional[bool] = None) -> DataLoader:
    """A DataLoader of ``(images uint8 [B, 3, H, W], targets)`` batches for this process
    (an :class:`EncodedBatch` with ``data_cfg.gpu_decode``: ``images.to("cuda")`` decodes it).

    ``batch_size`` is per process. Sharding follows ``torch.distributed`` when it is initialised
    (as in every Ray Train worker, so ``ray.train.torch.prepare_data_loader`` is not needed),
    or the explicit ``num_replicas`` / ``rank``.

    - ``train=True``: shuffled, aspect-ratio grouped batches with reproducible augmentation from
      ``seed``; ``infinite=True`` never stops (iteration-based schedules, resume with
      ``start_iter``), ``infinite=False`` is one epoch per iteration over the loader (call
      ``loader.batch_sampler.set_epoch(e)``) with the same batch count on every rank.
    - ``train=False``: dataset order, every image exactly once across ranks, all images kept.

    ``dataset`` reuses an already built dataset of this split; ``pin_memory`` defaults to "CUDA is
    available and there are worker processes".
    """
    world, r = _dist_world()
    num_replicas = world if num_replicas is None else num_replicas
    rank = r if rank is None else rank
    ds = dataset if dataset is not None else build_dataset(data_cfg, split, train)
    if train:
        sampler = GroupedBatchSampler(orientation_groups(ds.heights, ds.widths), batch_size, seed=seed,
                                      num_replicas=num_replicas, rank=rank, infinite=infinite,
                                      start_iter=start_iter, grouping=data_cfg.aspect_ratio_grouping)
    else:
        sampler = InferenceBatchSampler(len(ds), batch_size, num_replicas=num_replicas, rank=rank)
    workers = data_cfg.num_workers if num_workers is None else num_workers
    if pin_memory is None:
        pin_memory = workers > 0 and torch.cuda.is_available()
    return DataLoader(ds, batch_sampler=sampler, num_workers=workers,
                      collate_fn=functools.partial(collate, size_divisible=data_cfg.size_divisible),
                      worker_init_fn=_worker_init if workers > 0 else None,
                      persistent_workers=workers > 0 and train, pin_memory=pin_memory)
