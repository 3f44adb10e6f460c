"""From a :class:`DataConfig` to datasets and DataLoaders (plain, DDP and Ray Train workers)."""
from __future__ import annotations

import functools
import logging
from pathlib import Path
from typing import Optional

import torch
import torch.distributed as dist
from torch.utils.data import DataLoader

from .collate import collate
from .config import DataConfig
from .dataset import CocoDetection
from .samplers import GroupedBatchSampler, InferenceBatchSampler, orientation_groups
from .transforms import DetectionTransform

__all__ = ["resolve_split", "build_dataset", "build_dataloader", "synthetic_spec", "SPLITS"]

log = logging.getLogger(__name__)

SPLITS = ("train", "val", "test")
_COCO_FILES = {
    "train": ("annotations/instances_train2017.json", "train2017"),
    "val": ("annotations/instances_val2017.json", "val2017"),
    "test": ("annotations/image_info_test-dev2017.json", "test2017"),
}


def synthetic_spec(cfg: DataConfig):
    """The :class:`pipeline.synthetic.SyntheticSpec` a synthetic ``DataConfig`` stands for."""
    from pipeline.synthetic import SyntheticSpec

    return SyntheticSpec(num_train=cfg.synthetic_train_images, num_val=cfg.synthetic_val_images,
                         image_size=tuple(cfg.synthetic_image_size),
                         num_classes=cfg.synthetic_num_classes, seed=cfg.synthetic_seed)


def resolve_split(cfg: DataConfig, split: str) -> tuple[str, str]:
    """``(annotation file, image directory)`` of ``split`` ("train", "val" or "test").

    Explicit ``{split}_ann`` / ``{split}_images`` fields win over what the source implies.
    A synthetic source is generated (once, cached) on first use.
    """
    if split not in SPLITS:
        raise ValueError(f"split must be one of {SPLITS}, got {split!r}")
    ann, images = getattr(cfg, f"{split}_ann"), getattr(cfg, f"{split}_images")
    if ann and images:
        return str(ann), str(images)
    if cfg.source == "synthetic":
        if split == "test":
            raise ValueError("the synthetic source has no test split; use 'val' or set test_ann/test_images")
        from pipeline.synthetic import ensure_synthetic

        root = ensure_synthetic(synthetic_spec(cfg), cfg.cache_dir)
    elif cfg.source.startswith("coco:"):
        root = Path(cfg.source[5:]).expanduser()
        if not root.is_dir():
            raise FileNotFoundError(f"COCO root not found: {root} (from DataConfig.source={cfg.source!r})")
    else:
        raise ValueError(f"DataConfig.source='files' but {split}_ann and {split}_images are not both set "
                         f"({split}_ann={ann!r}, {split}_images={images!r})")
    rel_ann, rel_images = _COCO_FILES[split]
    return str(ann or root / rel_ann), str(images or root / rel_images)


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
