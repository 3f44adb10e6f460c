"""Data layer: COCO-format datasets (json or Parquet index), paper transforms, batching, loaders.

Boxes are ``xyxy`` float32 in absolute continuous pixels (no +1); labels are contiguous ``1..C``
(:class:`CategoryMap` maps them to COCO ids and back).
"""
from .annotations import AnnotationError, AnnotationTable, load_coco_json
from .categories import CategoryMap
from .collate import collate, pad_images
from .config import DataConfig
from .dataset import CocoDetection, EmptyDatasetError, TooManyBadImagesError
from .decode import EncodedBatch, EncodedImage, decode_bytes, read_bytes, read_image
from .index import build_index, read_index, write_index
from .loader import build_dataloader, build_dataset, resolve_split
from .samplers import GroupedBatchSampler, InferenceBatchSampler, orientation_groups
from .transforms import DetectionTransform, get_resize_size, hflip, hflip_boxes, resize, resize_flip

__all__ = [
    "AnnotationError", "AnnotationTable", "load_coco_json", "CategoryMap", "collate", "pad_images",
    "DataConfig", "CocoDetection", "EmptyDatasetError", "TooManyBadImagesError", "EncodedBatch",
    "EncodedImage", "decode_bytes", "read_bytes", "read_image",
    "build_index", "read_index", "write_index", "build_dataloader", "build_dataset", "resolve_split",
    "GroupedBatchSampler", "InferenceBatchSampler", "orientation_groups", "DetectionTransform",
    "get_resize_size", "hflip", "hflip_boxes", "resize", "resize_flip",
]
