"""`DataConfig`: where the data comes from and how images are sized (the paper's defaults)."""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any, Optional

__all__ = ["DataConfig"]

_SOURCE_HELP = "'synthetic', 'coco:/path/to/root', or 'files' with train_ann/train_images/val_ann/val_images"


def _as_size(name: str, v) -> int | tuple[int, int]:
    if isinstance(v, (list, tuple)):
        if len(v) != 2 or not all(isinstance(x, int) and not isinstance(x, bool) for x in v):
            raise ValueError(f"DataConfig.{name} must be an int or a (lo, hi) pair of ints, got {v!r}")
        lo, hi = int(v[0]), int(v[1])
        if not 0 < lo <= hi:
            raise ValueError(f"DataConfig.{name} range must satisfy 0 < lo <= hi, got {v!r}")
        return (lo, hi)
    if not isinstance(v, int) or isinstance(v, bool) or v <= 0:
        raise ValueError(f"DataConfig.{name} must be a positive int or a (lo, hi) pair, got {v!r}")
    return v


@dataclass
class DataConfig:
    """Data source and input sizes. Defaults are the paper's (section 5.4 of ATSS.md).

    ``source``:
      - ``"synthetic"``: a generated COCO-format set (:mod:`pipeline.synthetic`) cached under
        ``cache_dir`` keyed by the ``synthetic_*`` fields, generated once and reused.
      - ``"coco:/root"``: ``root/annotations/instances_{train,val}2017.json`` with images in
        ``root/train2017`` and ``root/val2017`` (test split: ``image_info_test-dev2017.json``
        and ``test2017``).
      - ``"files"``: the explicit ``{train,val,test}_ann`` / ``_images`` paths; an ``_ann`` may be
        a ``.parquet`` index from ``jobs/build_index.py``. Explicit paths also override the
        files a ``coco:`` source would pick.
    ``train_min_size`` is an int, or an inclusive ``(lo, hi)`` range for multi-scale training
    (the paper's 2x schedule: ``(640, 800)``). ``max_size`` caps the longer side in both modes.
    """

    source: str = "synthetic"
    train_ann: Optional[str] = None
    train_images: Optional[str] = None
    val_ann: Optional[str] = None
    val_images: Optional[str] = None
    test_ann: Optional[str] = None
    test_images: Optional[str] = None
    train_min_size: int | tuple[int, int] = 800
    max_size: int = 1333
    test_min_size: int = 800
    flip_prob: float = 0.5
    size_divisible: int = 32
    aspect_ratio_grouping: bool = True
    num_workers: int = 2
    min_box_size: float = 1.0  # boxes narrower or shorter than this (after clipping) are dropped
    max_bad_fraction: float = 0.1  # unreadable images tolerated (skipped) before a dataset gives up
    cache_dir: Optional[str] = None  # synthetic cache; default $ATSS_RAY_CACHE or ~/.cache/atss_ray
    synthetic_train_images: int = 300
    synthetic_val_images: int = 50
    synthetic_image_size: tuple[int, int] = (160, 256)  # each side drawn from this range
    synthetic_num_classes: int = 5
    synthetic_seed: int = 0

    def __post_init__(self) -> None:
        if not isinstance(self.source, str) or not (
                self.source in ("synthetic", "files") or self.source.startswith("coco:")):
            raise ValueError(f"DataConfig.source must be {_SOURCE_HELP}; got {self.source!r}")
        if self.source.startswith("coco:") and not self.source[5:]:
            raise ValueError("DataConfig.source 'coco:' needs a root directory, e.g. 'coco:/data/coco'")
        self.train_min_size = _as_size("train_min_size", self.train_min_size)
        self.test_min_size = _as_size("test_min_size", self.test_min_size)
        if isinstance(self.test_min_size, tuple):
            raise ValueError("DataConfig.test_min_size must be a single int")
        if not isinstance(self.max_size, int) or self.max_size <= 0:
            raise ValueError(f"DataConfig.max_size must be a positive int, got {self.max_size!r}")
        if not 0.0 <= float(self.flip_prob) <= 1.0:
            raise ValueError(f"DataConfig.flip_prob must lie in [0, 1], got {self.flip_prob!r}")
        if not isinstance(self.size_divisible, int) or self.size_divisible <= 0:
            raise ValueError(f"DataConfig.size_divisible must be a positive int, got {self.size_divisible!r}")
        if not isinstance(self.num_workers, int) or self.num_workers < 0:
            raise ValueError(f"DataConfig.num_workers must be an int >= 0, got {self.num_workers!r}")
        if not float(self.min_box_size) >= 0:
            raise ValueError(f"DataConfig.min_box_size must be >= 0, got {self.min_box_size!r}")
        if not 0.0 <= float(self.max_bad_fraction) <= 1.0:
            raise ValueError(f"DataConfig.max_bad_fraction must lie in [0, 1], got {self.max_bad_fraction!r}")
        for name in ("synthetic_train_images", "synthetic_val_images", "synthetic_num_classes"):
            v = getattr(self, name)
            if not isinstance(v, int) or isinstance(v, bool) or v <= 0:
                raise ValueError(f"DataConfig.{name} must be a positive int, got {v!r}")
        size = _as_size("synthetic_image_size", self.synthetic_image_size)
        self.synthetic_image_size = size if isinstance(size, tuple) else (size, size)
        if self.synthetic_image_size[0] < 32:
            raise ValueError(f"DataConfig.synthetic_image_size must be >= 32 px, got {self.synthetic_image_size}")
        explicit = [k for k in ("train_ann", "val_ann", "test_ann") if getattr(self, k)]
        if self.source == "files" and not explicit:
            raise ValueError("DataConfig.source 'files' needs at least one of train_ann / val_ann / test_ann")
        if self.source == "synthetic" and explicit:
            # Mixing a user's files with generated shapes would pair unrelated category sets.
            raise ValueError(f"DataConfig: {explicit} given with source='synthetic'; use source='files' "
                             f"(or 'coco:/root' to replace single files of a COCO root)")

    @classmethod
    def tiny(cls, **overrides) -> "DataConfig":
        """CPU-small sizes for the ``tiny`` presets: synthetic 128-192 px images, inputs ~160 px."""
        base = dict(source="synthetic", train_min_size=160, test_min_size=160, max_size=256,
                    synthetic_image_size=(128, 192), synthetic_train_images=300,
                    synthetic_val_images=50, num_workers=0)
        base.update(overrides)
        return cls(**base)

    def replace(self, **changes) -> "DataConfig":
        return dataclasses.replace(self, **changes)

    def to_dict(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        return {k: list(v) if isinstance(v, tuple) else v for k, v in d.items()}

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "DataConfig":
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(d) - known)
        if unknown:
            raise ValueError(f"DataConfig: unknown key(s) {unknown}; known keys: {sorted(known)}")
        return cls(**d)
