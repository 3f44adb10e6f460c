"""`DataConfig`: where the data comes from and how images are sized (the paper's defaults)."""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from collections.abc import Mapping
from typing import Any, ClassVar, Optional

from detector.fields import FieldError, Rule, check_fields, check_keys
from pipeline.synthetic import CATEGORIES

__all__ = ["DataConfig"]

_SOURCE_HELP = ("'synthetic', 'coco:/path/to/root' (a root directory after 'coco:'), or 'files' with "
                "train_ann/train_images/val_ann/val_images")


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
    gpu_decode: bool = False  # JPEGs decoded in batches by nvJPEG when the batch moves to the GPU
    min_box_size: float = 1.0  # boxes narrower or shorter than this (after clipping) are dropped
    max_bad_fraction: float = 0.1  # unreadable images tolerated (skipped) before a dataset gives up
    cache_dir: Optional[str] = None  # synthetic cache; default $ATSS_RAY_CACHE or ~/.cache/atss_ray
    synthetic_train_images: int = 300
    synthetic_val_images: int = 50
    synthetic_image_size: tuple[int, int] = (160, 256)  # each side drawn from this range
    synthetic_num_classes: int = 5
    synthetic_seed: int = 0

    # What each field allows beyond its annotated type (detector.fields checks both).
    RULES: ClassVar[Mapping[str, Rule]] = {
        "source": Rule(valid=lambda s: s in ("synthetic", "files") or (s.startswith("coco:") and len(s) > 5),
                       allowed=_SOURCE_HELP),
        "train_min_size": Rule(gt=0),
        "max_size": Rule(gt=0),
        "test_min_size": Rule(gt=0),
        "flip_prob": Rule(ge=0, le=1),
        "size_divisible": Rule(ge=1),
        "num_workers": Rule(ge=0),
        "min_box_size": Rule(ge=0),
        "max_bad_fraction": Rule(ge=0, le=1),
        "synthetic_train_images": Rule(ge=1),
        "synthetic_val_images": Rule(ge=1),
        "synthetic_image_size": Rule(ge=32),
        "synthetic_num_classes": Rule(ge=1, le=len(CATEGORIES)),
        "synthetic_seed": Rule(ge=0),
    }

    def __post_init__(self) -> None:
        if isinstance(self.synthetic_image_size, int) and not isinstance(self.synthetic_image_size, bool):
            self.synthetic_image_size = (self.synthetic_image_size, self.synthetic_image_size)  # square images
        check_fields(self)
        for name in ("train_min_size", "synthetic_image_size"):
            size = getattr(self, name)
            if isinstance(size, tuple) and not size[0] <= size[1]:
                raise FieldError("DataConfig", name, size, "an int or an inclusive (lo, hi) range with lo <= hi")
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
        check_keys(cls, overrides)
        base.update(overrides)
        return cls(**base)

    def replace(self, **changes) -> "DataConfig":
        """A copy with ``changes`` applied and validated; unknown names raise ``FieldError``."""
        check_keys(type(self), changes)
        return dataclasses.replace(self, **changes)

    def to_dict(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        return {k: list(v) if isinstance(v, tuple) else v for k, v in d.items()}

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "DataConfig":
        check_keys(cls, d)
        return cls(**d)
