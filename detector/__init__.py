"""ATSS and its baselines (RetinaNet, FCOS) as one configurable dense detector (pure torch)."""
from . import assigners
from .assigners import (atss_assign, atss_assign_batched, build_assigner, max_iou_assign, spatial_scale_assign,
                        topk_assign)
from .config import PRESETS, DetectorConfig, get_preset
from .model import ATSSDetector, build_detector

__all__ = [
    "ATSSDetector",
    "DetectorConfig",
    "PRESETS",
    "assigners",
    "atss_assign",
    "atss_assign_batched",
    "build_assigner",
    "build_detector",
    "get_preset",
    "max_iou_assign",
    "spatial_scale_assign",
    "topk_assign",
]
