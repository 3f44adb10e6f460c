"""ATSS and its baselines (RetinaNet, FCOS) as one configurable dense detector (pure torch).

The configuration (:mod:`.config`, :mod:`.fields`) is plain Python; the model and the assigners
load torch, about 0.5 GB in every process that imports it. A sweep's driver plans its trials from
the configuration alone, so the torch-backed names below load on first use (:mod:`.lazy`).
"""
from __future__ import annotations

from typing import TYPE_CHECKING

from .config import PRESETS, DetectorConfig, get_preset
from .lazy import lazy_exports

if TYPE_CHECKING:
    from . import assigners
    from .assigners import (atss_assign, atss_assign_batched, build_assigner, max_iou_assign, spatial_scale_assign,
                            topk_assign)
    from .model import ATSSDetector, build_detector

TORCH_NAMES = {
    "assigners": "assigners", "atss_assign": "assigners", "atss_assign_batched": "assigners",
    "build_assigner": "assigners", "max_iou_assign": "assigners", "spatial_scale_assign": "assigners",
    "topk_assign": "assigners", "ATSSDetector": "model", "build_detector": "model",
}

__all__ = ["DetectorConfig", "PRESETS", "get_preset", *TORCH_NAMES]

__getattr__ = lazy_exports(__name__, TORCH_NAMES)
