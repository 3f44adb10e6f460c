"""Where a split's files are: a :class:`DataConfig` to ``(annotation file, image directory)``.

Plain Python (no torch), so that drivers can check and plan data they never load.
"""
from __future__ import annotations

from pathlib import Path

from pipeline.synthetic import SyntheticSpec, ensure_synthetic

from .config import DataConfig

__all__ = ["SPLITS", "COCO_FILES", "resolve_split", "synthetic_spec"]

SPLITS = ("train", "val", "test")
COCO_FILES = {
    "train": ("annotations/instances_train2017.json", "train2017"),
    "val": ("annotations/instances_val2017.json", "val2017"),
    "test": ("annotations/image_info_test-dev2017.json", "test2017"),
}


def synthetic_spec(cfg: DataConfig) -> SyntheticSpec:
    """The :class:`SyntheticSpec` a synthetic ``DataConfig`` stands for."""
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
        root = ensure_synthetic(synthetic_spec(cfg), cfg.cache_dir)
    elif cfg.source.startswith("coco:"):
        root = Path(cfg.source[5:]).expanduser()
        if not root.is_dir():
            raise FileNotFoundError(f"COCO root not found: {root} (from DataConfig.source={cfg.source!r})")
    else:
        raise ValueError(f"DataConfig.source='files' but {split}_ann and {split}_images are not both set "
                         f"({split}_ann={ann!r}, {split}_images={images!r})")
    rel_ann, rel_images = COCO_FILES[split]
    return str(ann or root / rel_ann), str(images or root / rel_images)
