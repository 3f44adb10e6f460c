"""Columnar COCO detection annotations, read from an instances json or a Parquet index.

Both sources produce the same :class:`AnnotationTable`: per-image columns (id, file name, size)
and per-box columns (annotation id, raw ``xyxy`` box in original pixels, COCO category id, area,
crowd flag) with CSR offsets from images to their boxes. The json path goes through pycocotools;
the Parquet path (see :mod:`pipeline.data.index`) reads a memory-mapped file and never builds a
Python object per annotation, so N training workers do not each hold the parsed json.
"""
from __future__ import annotations

import contextlib
import gc
import io
import json
import logging
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa

from .categories import CategoryMap

__all__ = ["AnnotationTable", "load_coco_json", "AnnotationError"]

log = logging.getLogger(__name__)


class AnnotationError(ValueError):
    """An annotation file that is not usable COCO detection data; the message names the file/record."""


@dataclass
class AnnotationTable:
    """COCO detection annotations as columns (``N`` images, ``M`` boxes).

    Boxes of image ``i`` are rows ``offsets[i]:offsets[i + 1]`` of the per-box arrays. Boxes are
    ``xyxy`` float32 in original image pixels exactly as annotated (COCO ``[x, y, w, h]`` ->
    ``[x, y, x + w, y + h]``): not clipped, not filtered; the dataset does that.
    """

    source: str
    image_ids: np.ndarray  # int64[N]
    file_names: pa.Array  # string[N]; kept in Arrow so per-sample access is lazy and fork-safe
    heights: np.ndarray  # int32[N]
    widths: np.ndarray  # int32[N]
    offsets: np.ndarray  # int64[N + 1]
    ann_ids: np.ndarray  # int64[M]
    boxes: np.ndarray  # float32[M, 4] xyxy
    category_ids: np.ndarray  # int[M] COCO ids (int64 from json, int32 from Parquet)
    areas: np.ndarray  # float32[M]
    iscrowd: np.ndarray  # bool[M]
    categories: list[dict]  # the COCO categories block (id, name, supercategory)
    has_annotations: bool = True  # False for image-info files (test-dev)

    @property
    def num_images(self) -> int:
        return len(self.image_ids)

    @property
    def num_boxes(self) -> int:
        return len(self.ann_ids)

    @property
    def category_map(self) -> CategoryMap:
        return CategoryMap.from_coco(self.categories)

    def file_name(self, i: int) -> str:
        return self.file_names[i].as_py()

    def box_slice(self, i: int) -> slice:
        return slice(int(self.offsets[i]), int(self.offsets[i + 1]))

    def validate_categories(self) -> CategoryMap:
        """The :class:`CategoryMap`; raises naming the first annotation with an unknown id."""
        if not self.categories:
            raise AnnotationError(f"{self.source}: no 'categories' in the file")
        cmap = self.category_map
        step = 1 << 16  # chunks bound the temporaries: a training worker keeps little beyond the table
        for s in range(0, self.num_boxes, step):
            unknown = cmap.to_labels(self.category_ids[s:s + step]) == 0
            if unknown.any():
                j = s + int(np.flatnonzero(unknown)[0])
                total = int((cmap.to_labels(self.category_ids) == 0).sum())
                raise AnnotationError(
                    f"{self.source}: annotation id {int(self.ann_ids[j])} has unknown category_id "
                    f"{int(self.category_ids[j])} ({total} annotation(s) in all; known ids: {list(cmap.ids)})")
        return cmap

    def to_coco_dict(self) -> dict:
        """A COCO instances dict (bbox, area, iscrowd; no segmentation), e.g. for ``COCO()``."""
        images = [{"id": int(i), "file_name": f, "height": int(h), "width": int(w)}
                  for i, f, h, w in zip(self.image_ids, self.file_names.to_pylist(),
                                        self.heights, self.widths)]
        img_of_box = np.repeat(self.image_ids, np.diff(self.offsets))
        xywh = self.boxes.astype(np.float64)
        xywh[:, 2:] -= xywh[:, :2]
        anns = [{"id": int(a), "image_id": int(im), "category_id": int(c), "bbox": b,
                 "area": float(ar), "iscrowd": int(cr)}
                for a, im, c, b, ar, cr in zip(self.ann_ids, img_of_box, self.category_ids,
                                               np.round(xywh, 4).tolist(), self.areas, self.iscrowd)]
        out = {"images": images, "categories": [dict(c) for c in self.categories]}
        if self.has_annotations:
            out["annotations"] = anns
        return out

    def to_coco(self):
        """A pycocotools ``COCO`` object for this table (evaluation ground truth)."""
        from pycocotools.coco import COCO

        coco = COCO()
        coco.dataset = self.to_coco_dict()
        with contextlib.redirect_stdout(io.StringIO()):
            coco.createIndex()
        return coco


@contextlib.contextmanager
def _gc_paused():
    """Pause the cyclic GC: parsing creates millions of acyclic objects, and the collections they
    trigger (each scanning the growing tree) make a COCO-train json load several times slower."""
    was_enabled = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        if was_enabled:
            gc.enable()


def _read_json(path: Path) -> Any:
    if not path.exists():
        raise FileNotFoundError(f"annotation file not found: {path}")
    if path.is_dir():
        raise AnnotationError(f"annotation file {path} is a directory, expected a COCO json file")
    try:
        with open(path, "rb") as f:
            return json.load(f)
    except PermissionError as e:
        raise PermissionError(f"annotation file {path} is not readable: {e.strerror}") from e
    except json.JSONDecodeError as e:
        raise AnnotationError(f"annotation file {path} is not valid JSON: {e}") from e
    except UnicodeDecodeError as e:
        raise AnnotationError(f"annotation file {path} is not valid JSON (not UTF-8 text): {e}") from e


def _check_coco_layout(data: Any, path: Path) -> None:
    if not isinstance(data, dict):
        raise AnnotationError(f"{path} is not a COCO annotation file: top level is a "
                              f"{type(data).__name__}, expected an object with 'images' and 'categories'")
    missing = [k for k in ("images", "categories") if k not in data]
    if missing:
        raise AnnotationError(f"{path} is not a COCO annotation file: missing key(s) {missing} "
                              f"(found {sorted(data)[:8]})")
    for k in ("images", "categories", "annotations"):
        if k in data and not isinstance(data[k], list):
            raise AnnotationError(f"{path}: '{k}' must be a list, got {type(data[k]).__name__}")


def _image_columns(images: list, path: Path):
    n = len(images)
    try:  # fast path
        ids = np.fromiter((im["id"] for im in images), np.int64, n)
        hw = np.array([(im["height"], im["width"]) for im in images], dtype=np.int64).reshape(n, 2)
        names = [im["file_name"] for im in images]
        if not all(isinstance(f, str) and f for f in names):
            raise ValueError("file_name")
    except (KeyError, TypeError, ValueError, AttributeError):
        ids, hw, names = _image_columns_checked(images, path)
    bad = np.flatnonzero((hw <= 0).any(axis=1))
    if len(bad):
        raise AnnotationError(f"{path}: image id {ids[bad[0]]} has non-positive size "
                              f"{tuple(int(v) for v in hw[bad[0]])} (height, width)")
    uniq, counts = np.unique(ids, return_counts=True)
    if (counts > 1).any():
        raise AnnotationError(f"{path}: duplicate image id {int(uniq[counts > 1][0])}")
    return ids, names, hw[:, 0].astype(np.int32), hw[:, 1].astype(np.int32)


def _image_columns_checked(images: list, path: Path):
    """Record by record, to name the first malformed image."""
    n = len(images)
    ids = np.empty(n, dtype=np.int64)
    hw = np.empty((n, 2), dtype=np.int64)
    names = []
    for i, im in enumerate(images):
        try:
            ids[i] = im["id"]
            hw[i] = (im["height"], im["width"])
            fn = im["file_name"]
        except (KeyError, TypeError, ValueError) as e:
            rid = im.get("id", "?") if isinstance(im, dict) else "?"
            raise AnnotationError(f"{path}: image record #{i} (id {rid}) is malformed: needs integer "
                                  f"'id', 'height', 'width' and a 'file_name' ({e!r})") from e
        if not isinstance(fn, str) or not fn:
            raise AnnotationError(f"{path}: image id {ids[i]} has no usable 'file_name' ({fn!r})")
        names.append(fn)
    return ids, hw, names


def _box_columns(anns: list, path: Path):
    m = len(anns)
    try:  # fast path: one C-level pass per field
        ann_ids = np.fromiter((a["id"] for a in anns), np.int64, m)
        img_ids = np.fromiter((a["image_id"] for a in anns), np.int64, m)
        cat_ids = np.fromiter((a["category_id"] for a in anns), np.int64, m)
        xywh = np.array([a["bbox"] for a in anns], dtype=np.float64).reshape(m, 4)
        crowd = np.fromiter((bool(a.get("iscrowd", 0)) for a in anns), bool, m)
        areas = np.fromiter((a.get("area", np.nan) for a in anns), np.float64, m)
        areas = np.where(np.isnan(areas), xywh[:, 2] * xywh[:, 3], areas)
    except (KeyError, TypeError, ValueError, AttributeError):
        ann_ids, img_ids, cat_ids, xywh, areas, crowd = _box_columns_checked(anns, path)
    if not np.isfinite(xywh).all():
        j = int(np.flatnonzero(~np.isfinite(xywh).all(axis=1))[0])
        raise AnnotationError(f"{path}: annotation id {ann_ids[j]} has a non-finite bbox {xywh[j].tolist()}")
    return ann_ids, img_ids, cat_ids, xywh, areas, crowd


def _box_columns_checked(anns: list, path: Path):
    """Record by record, to name the first malformed annotation."""
    m = len(anns)
    ann_ids = np.empty(m, dtype=np.int64)
    img_ids = np.empty(m, dtype=np.int64)
    cat_ids = np.empty(m, dtype=np.int64)
    xywh = np.empty((m, 4), dtype=np.float64)
    areas = np.empty(m, dtype=np.float64)
    crowd = np.empty(m, dtype=bool)
    for j, a in enumerate(anns):
        try:
            ann_ids[j] = a["id"]
            img_ids[j] = a["image_id"]
            cat_ids[j] = a["category_id"]
            xywh[j] = a["bbox"]
            crowd[j] = bool(a.get("iscrowd", 0))
            areas[j] = a["area"] if "area" in a else xywh[j, 2] * xywh[j, 3]
        except (KeyError, TypeError, ValueError) as e:
            rid = a.get("id", "?") if isinstance(a, dict) else "?"
            raise AnnotationError(f"{path}: annotation #{j} (id {rid}) is malformed: needs 'id', "
                                  f"'image_id', 'category_id' and 'bbox' [x, y, w, h] ({e!r})") from e
    return ann_ids, img_ids, cat_ids, xywh, areas, crowd


def xywh_to_xyxy(xywh: np.ndarray) -> np.ndarray:
    """COCO ``[x, y, w, h]`` (float64) -> ``[x1, y1, x2, y2]`` float32, continuous (no +1)."""
    xyxy = np.asarray(xywh, dtype=np.float64).copy()
    xyxy[:, 2:] += xyxy[:, :2]
    return xyxy.astype(np.float32)


def load_coco_json(path: str | os.PathLike, *, keep_coco: bool = False):
    """Parse a COCO instances (or image-info) json with pycocotools into an :class:`AnnotationTable`.

    Returns ``(table, coco)``; ``coco`` is the pycocotools ``COCO`` object when ``keep_coco``.
    """
    path = Path(path)
    with _gc_paused():
        # The parsed json dies inside (unless kept for pycocotools), so the collector never has
        # to walk its millions of objects.
        return _load_coco_json(path, keep_coco)


def _load_coco_json(path: Path, keep_coco: bool):
    from pycocotools.coco import COCO

    data = _read_json(path)
    _check_coco_layout(data, path)
    has_anns = "annotations" in data
    data.setdefault("annotations", [])
    image_ids, names, heights, widths = _image_columns(data["images"], path)
    ann_ids, img_of_ann, cat_ids, xywh, areas, crowd = _box_columns(data["annotations"], path)
    for c in data["categories"]:
        if not isinstance(c, dict) or "id" not in c:
            raise AnnotationError(f"{path}: category record {c!r} has no 'id'")

    # Group boxes by image in the file's image order (a stable sort keeps annotation order).
    sorter = np.argsort(image_ids, kind="stable")
    sorted_ids = image_ids[sorter]
    pos = np.minimum(np.searchsorted(sorted_ids, img_of_ann), max(len(sorted_ids) - 1, 0))
    ok = sorted_ids[pos] == img_of_ann if len(sorted_ids) else np.zeros(len(img_of_ann), bool)
    if not ok.all():
        j = int(np.flatnonzero(~ok)[0])
        raise AnnotationError(f"{path}: annotation id {ann_ids[j]} refers to image_id {img_of_ann[j]} "
                              f"which is not in 'images'")
    img_row = sorter[pos]
    order = np.argsort(img_row, kind="stable")
    counts = np.bincount(img_row, minlength=len(image_ids))
    offsets = np.zeros(len(image_ids) + 1, dtype=np.int64)
    np.cumsum(counts, out=offsets[1:])

    table = AnnotationTable(
        source=str(path), image_ids=image_ids, file_names=pa.array(names, type=pa.string()),
        heights=heights, widths=widths, offsets=offsets, ann_ids=ann_ids[order],
        boxes=xywh_to_xyxy(xywh[order]), category_ids=cat_ids[order],
        areas=areas[order].astype(np.float32), iscrowd=crowd[order],
        categories=[{k: c[k] for k in ("id", "name", "supercategory") if k in c}
                    for c in data["categories"]],
        has_annotations=has_anns,
    )
    table.validate_categories()
    coco = None
    if keep_coco:
        coco = COCO()
        coco.dataset = data
        with contextlib.redirect_stdout(io.StringIO()):  # pycocotools prints progress
            coco.createIndex()
    return table, coco
