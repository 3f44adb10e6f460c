"""COCO detection dataset: annotation table + images on disk -> (image, target) training samples."""
from __future__ import annotations

import io
import logging
import os
from pathlib import Path
from typing import Optional

import numpy as np
import torch
from PIL import Image

from .index import load_annotations
from .categories import CategoryMap
from .decode import EncodedImage, decode_bytes, is_jpeg, read_bytes, read_image
from .transforms import DetectionTransform, resize_flip

__all__ = ["CocoDetection", "EmptyDatasetError", "TooManyBadImagesError"]

log = logging.getLogger(__name__)


class EmptyDatasetError(ValueError):
    """No image left after filtering; the message says which file and why."""


class TooManyBadImagesError(RuntimeError):
    """More images failed to load than ``max_bad_fraction`` allows; the message names them."""


class CocoDetection(torch.utils.data.Dataset):
    """COCO-format detection data from an instances json (pycocotools) or a ``.parquet``/``.arrow`` index.

    ``__getitem__(key)`` takes an index, or ``(index, seed)`` from the training samplers so the
    random resize/flip of every sample is reproducible whatever the worker layout, and returns
    ``(image, target)``:

    - ``image``: uint8 ``[3, h, w]`` RGB, resized (the detector normalises it on its device);
      with ``gpu_decode=True`` an :class:`EncodedImage` (JPEG bytes and the drawn resize/flip)
      that :class:`EncodedBatch` decodes on the GPU;
    - ``target``: ``boxes`` float32 ``[G, 4]`` xyxy in resized pixels, ``labels`` int64 ``[G]``
      in ``1..C``, ``crowd_boxes`` float32 ``[K, 4]`` (``iscrowd=1``, never positives),
      ``image_id`` (COCO id), ``orig_size`` ``(h0, w0)``, ``image_size`` ``(h, w)``,
      ``scale`` (resized / original), ``flipped``.

    Boxes are clipped to the image; boxes under ``min_box_size`` px wide or high after clipping
    are dropped. With ``train=True`` images without a usable non-crowd box are left out (the
    paper's rule); with ``train=False`` every image is kept, including an image-info file
    with no annotations at all (test-dev).

    An image that is missing or cannot be decoded is logged and skipped: the next image is
    returned instead and ``num_bad_images`` / ``bad_files`` count it (per process). When more
    than ``max_bad_fraction`` of the dataset is bad the dataset raises naming the files.

    Decoding: ``torchvision.io.decode_jpeg`` for JPEGs, PIL for the rest (:func:`read_image`).
    ``gpu_decode=True`` reads only the JPEG header here (size and colour mode, for the checks above)
    and leaves decoding to the device; files nvJPEG does not take are decoded here as usual.
    """

    def __init__(self, ann_file: str | os.PathLike, image_dir: str | os.PathLike, *, train: bool,
                 transform: Optional[DetectionTransform] = None, min_box_size: float = 1.0,
                 max_bad_fraction: float = 0.1, keep_coco: Optional[bool] = None, gpu_decode: bool = False):
        self.ann_file = str(ann_file)
        self.image_dir = Path(image_dir)
        self.train = train
        if not self.image_dir.is_dir():
            raise FileNotFoundError(f"image directory not found: {self.image_dir} (annotations: {ann_file})")
        keep = (not train) if keep_coco is None else keep_coco
        self.table, self._coco = load_annotations(ann_file, keep_coco=keep)
        self.category_map: CategoryMap = self.table.category_map  # ids were validated on load
        self.transform = transform or DetectionTransform(flip_prob=0.5 if train else 0.0)
        self.min_box_size = float(min_box_size)
        self.max_bad_fraction = float(max_bad_fraction)
        self.gpu_decode = bool(gpu_decode)
        if self.gpu_decode and not isinstance(self.transform, DetectionTransform):
            raise ValueError(f"gpu_decode=True needs a DetectionTransform (the resize is drawn here and "
                             f"applied on the device), got {type(self.transform).__name__}")
        self.num_bad_images = 0
        self.bad_files: list[str] = []
        self._filter()

    # -- filtering (vectorised over all boxes, once) ---------------------------------------------
    def _filter(self) -> None:
        t = self.table
        # Chunks bound the temporaries (a few MB), so a worker keeps little more than the table.
        step = 1 << 16
        size_ok = np.empty(t.num_boxes, dtype=bool)
        positives = np.zeros(t.num_images, dtype=np.int64)
        n_outside = 0
        for s in range(0, t.num_boxes, step):
            e = min(s + step, t.num_boxes)
            img = np.searchsorted(t.offsets, np.arange(s, e), side="right") - 1
            raw = t.boxes[s:e]
            clipped = self._clip(raw, t.widths[img], t.heights[img])
            ok = ((clipped[:, 2] - clipped[:, 0]) >= self.min_box_size) & \
                 ((clipped[:, 3] - clipped[:, 1]) >= self.min_box_size)
            size_ok[s:e] = ok
            n_outside += int((np.abs(clipped - raw) > 1e-3).any(axis=1).sum())
            positives += np.bincount(img[ok & ~t.iscrowd[s:e]], minlength=t.num_images)
        self._box_ok = size_ok
        n_dropped = int((~size_ok).sum())
        if n_dropped:
            bad = t.ann_ids[~size_ok][:5].tolist()
            log.warning("%s: dropped %d box(es) under %.3g px after clipping (zero/negative size), "
                        "e.g. annotation ids %s", self.ann_file, n_dropped, self.min_box_size, bad)
        if n_outside:
            log.info("%s: clipped %d box(es) that extend outside their image", self.ann_file, n_outside)
        if self.train:
            keep = np.flatnonzero(positives > 0)
            if len(keep) < t.num_images:
                log.info("%s: training keeps %d of %d images (the others have no usable non-crowd box)",
                         self.ann_file, len(keep), t.num_images)
        else:
            keep = np.arange(t.num_images)
        if len(keep) == 0:
            why = ("no image has a usable non-crowd box" if self.train and t.num_images
                   else "the file lists no images")
            raise EmptyDatasetError(f"{self.ann_file}: dataset is empty after filtering: {why} "
                                    f"({t.num_images} images, {t.num_boxes} annotations, "
                                    f"{n_dropped} boxes dropped as degenerate)")
        self.indices = keep  # dataset position -> table row

    @staticmethod
    def _clip(boxes: np.ndarray, w, h) -> np.ndarray:
        """Clip xyxy ``boxes [M, 4]`` to ``[0, w] x [0, h]`` (``w``/``h`` scalars or ``[M]`` arrays)."""
        w, h = np.asarray(w, np.float32), np.asarray(h, np.float32)
        upper = np.stack(np.broadcast_arrays(w, h, w, h), axis=-1)
        return np.clip(boxes, np.float32(0), upper).astype(np.float32, copy=False)

    # -- metadata without decoding images ---------------------------------------------------------
    def __len__(self) -> int:
        return len(self.indices)

    @property
    def image_ids(self) -> np.ndarray:
        return self.table.image_ids[self.indices]

    @property
    def heights(self) -> np.ndarray:
        return self.table.heights[self.indices]

    @property
    def widths(self) -> np.ndarray:
        return self.table.widths[self.indices]

    @property
    def coco(self):
        """pycocotools ``COCO`` ground truth: the json's own (loaded on first use if a training
        dataset dropped it), or rebuilt from an index (bbox, area, iscrowd; no segmentation)."""
        if self._coco is None:
            if Path(self.ann_file).suffix in (".parquet", ".arrow"):
                self._coco = self.table.to_coco()
            else:
                from .annotations import load_coco_json

                self._coco = load_coco_json(self.ann_file, keep_coco=True)[1]
        return self._coco

    def annotations(self, idx: int) -> dict:
        """Filtered boxes of sample ``idx`` in original pixels, without reading the image."""
        row = int(self.indices[idx])
        t = self.table
        sl = t.box_slice(row)
        w, h = float(t.widths[row]), float(t.heights[row])
        boxes = self._clip(t.boxes[sl], w, h)
        ok = self._box_ok[sl]
        crowd = t.iscrowd[sl]
        pos, neg = ok & ~crowd, ok & crowd
        return {
            "boxes": torch.from_numpy(np.ascontiguousarray(boxes[pos], dtype=np.float32)),
            "labels": torch.from_numpy(self.category_map.to_labels(t.category_ids[sl][pos])),
            "crowd_boxes": torch.from_numpy(np.ascontiguousarray(boxes[neg], dtype=np.float32)),
            "image_id": int(t.image_ids[row]),
            "orig_size": (int(t.heights[row]), int(t.widths[row])),
        }

    def image_path(self, idx: int) -> Path:
        return self.image_dir / self.table.file_name(int(self.indices[idx]))

    # -- samples ----------------------------------------------------------------------------------
    def __getitem__(self, key):
        idx, seed = key if isinstance(key, tuple) else (key, None)
        idx = int(idx)
        if not -len(self) <= idx < len(self):
            raise IndexError(f"index {idx} out of range for a dataset of {len(self)} images")
        idx %= len(self)
        rng = np.random.default_rng(seed)
        for _ in range(len(self)):
            path = self.image_path(idx)
            target = self.annotations(idx)
            try:
                image, size = self._load(path)
            except OSError as e:
                self._record_bad(str(path), str(e))
                idx = (idx + 1) % len(self)
                continue
            if size != target["orig_size"]:
                self._record_bad(str(path), f"decoded size {size} != annotated "
                                            f"(h, w) {target['orig_size']} for image id {target['image_id']}")
                idx = (idx + 1) % len(self)
                continue
            if not self.gpu_decode:
                return self.transform(image, target, rng)
            geo = self.transform.geometry(*size, rng)
            if not isinstance(image, EncodedImage):
                image = EncodedImage(geo, image=resize_flip(image, geo), path=str(path))
            image.geometry = geo
            return image, self.transform.apply_to_target(target, size, geo)
        raise TooManyBadImagesError(f"{self.ann_file}: no image of {self.image_dir} could be read")

    def _load(self, path: Path) -> tuple[torch.Tensor | EncodedImage, tuple[int, int]]:
        """``(uint8 image or EncodedImage, (h, w))``; ``OSError`` naming the file when unreadable."""
        if not self.gpu_decode:
            image = read_image(path)
            return image, tuple(image.shape[-2:])
        data = read_bytes(path)
        if is_jpeg(data):
            try:
                with Image.open(io.BytesIO(data.numpy().tobytes())) as im:
                    w, h = im.size
                    mode = im.mode
            except (OSError, ValueError, SyntaxError) as e:
                raise OSError(f"cannot decode image {path}: {e}") from e
            if mode in ("RGB", "L"):  # nvJPEG's colour spaces; CMYK/YCCK stay on the CPU
                return EncodedImage((h, w, 1.0, False), data=data, path=str(path)), (h, w)
        image = decode_bytes(data, path)
        return image, tuple(image.shape[-2:])

    def _record_bad(self, path: str, why: str) -> None:
        self.num_bad_images += 1
        if path not in self.bad_files:
            self.bad_files.append(path)
        log.warning("skipping an unusable image (%d so far): %s", self.num_bad_images, why)
        if len(self.bad_files) > self.max_bad_fraction * len(self):
            shown = ", ".join(self.bad_files[:10]) + (" ..." if len(self.bad_files) > 10 else "")
            raise TooManyBadImagesError(
                f"{len(self.bad_files)} of {len(self)} images under {self.image_dir} could not be read "
                f"(more than max_bad_fraction={self.max_bad_fraction:g}): {shown}")
