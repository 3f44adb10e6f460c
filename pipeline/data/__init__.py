"""Data layer: COCO-format datasets (json or Parquet index), paper transforms, batching, loaders.

Boxes are ``xyxy`` float32 in absolute continuous pixels (no +1); labels are contiguous ``1..C``
(:class:`CategoryMap` maps them to COCO ids and back).

Annotations, categories, the config, the index and where a split's files are need no torch; the
decoding, transforms, datasets and loaders do, and load on first use (PEP 562), so a driver that
only checks and plans data stays torch-free (``detector/__init__.py``).
"""
from __future__ import annotations

from typing import TYPE_CHECKING

from detector.lazy import lazy_exports

from .annotations import AnnotationError, AnnotationTable, load_coco_json
from .categories import CategoryMap
from .config import DataConfig
from .index import build_index, read_index, write_index
from .sources import SPLITS, resolve_split, synthetic_spec

if TYPE_CHECKING:
    from .batching import collate, pad_images
    from .dataset import CocoDetection, EmptyDatasetError, TooManyBadImagesError
    from .decode import EncodedBatch, EncodedImage, decode_bytes, read_bytes, read_image
    from .loader import build_dataloader, build_dataset
    from .samplers import GroupedBatchSampler, InferenceBatchSampler, orientation_groups
    from .transforms import DetectionTransform, get_resize_size, hflip, hflip_boxes, resize, resize_flip

TORCH_NAMES = {
    **dict.fromkeys(("collate", "pad_images"), "batching"),
    **dict.fromkeys(("CocoDetection", "EmptyDatasetError", "TooManyBadImagesError"), "dataset"),
    **dict.fromkeys(("EncodedBatch", "EncodedImage", "decode_bytes", "read_bytes", "read_image"), "decode"),
    **dict.fromkeys(("build_dataloader", "build_dataset"), "loader"),
    **dict.fromkeys(("GroupedBatchSampler", "InferenceBatchSampler", "orientation_groups"), "samplers"),
    **dict.fromkeys(("DetectionTransform", "get_resize_size", "hflip", "hflip_boxes", "resize", "resize_flip"),
                    "transforms"),
}

__all__ = ["AnnotationError", "AnnotationTable", "load_coco_json", "CategoryMap", "DataConfig", "build_index",
           "read_index", "write_index", "SPLITS", "resolve_split", "synthetic_spec", *TORCH_NAMES]

__getattr__ = lazy_exports(__name__, TORCH_NAMES)
