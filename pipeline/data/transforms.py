"""The paper's input transforms, as plain functions over tensors plus one composed transform.

Boxes are ``xyxy`` float32 in absolute, continuous pixels (no +1). Images enter and leave as uint8
``[3, h, w]`` RGB: normalisation is the detector's first step, on its device
(:meth:`detector.model.ATSSDetector.normalize`), so the host does no float work per pixel and
ships a quarter of the bytes.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from torchvision.transforms.v2 import functional as TF

__all__ = ["get_resize_size", "resize", "resize_flip", "hflip_boxes", "hflip", "DetectionTransform"]


def get_resize_size(height: int, width: int, min_size: int, max_size: int) -> tuple[int, int, float]:
    """Output ``(h, w, scale)``: shorter side ``min_size`` unless the longer would exceed ``max_size``.

    ``scale`` is the factor applied to both sides before rounding to whole pixels
    (maskrcnn-benchmark's ``Resize.get_size`` rule).
    """
    if height <= 0 or width <= 0:
        raise ValueError(f"image size must be positive, got (h={height}, w={width})")
    scale = min_size / min(height, width)
    if max(height, width) * scale > max_size:
        scale = max_size / max(height, width)
    return max(1, int(round(height * scale))), max(1, int(round(width * scale))), scale


def resize(image: torch.Tensor, boxes: torch.Tensor, size: tuple[int, int]) -> tuple[torch.Tensor, torch.Tensor]:
    """Resize ``image [C, h, w]`` (uint8 or float) to ``size = (h', w')`` bilinearly (antialiased).

    Boxes ``[N, 4]`` xyxy scale per axis by ``w'/w`` and ``h'/h``, so a box edge stays on the same
    image content despite the rounding of the output size.
    """
    h, w = image.shape[-2:]
    nh, nw = size
    if (nh, nw) != (h, w):
        image = TF.resize(image, [nh, nw], antialias=True)
    ratios = boxes.new_tensor([nw / w, nh / h, nw / w, nh / h])
    return image, boxes * ratios


def hflip_boxes(boxes: torch.Tensor, width: int) -> torch.Tensor:
    """Mirror ``[N, 4]`` xyxy boxes in an image ``width`` pixels wide: ``x1' = W - x2, x2' = W - x1``."""
    out = boxes.clone()
    out[:, 0] = width - boxes[:, 2]
    out[:, 2] = width - boxes[:, 0]
    return out


def hflip(image: torch.Tensor, boxes: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    return image.flip(-1), hflip_boxes(boxes, image.shape[-1])


@dataclass
class DetectionTransform:
    """Resize (fixed or multi-scale shorter side) and optional horizontal flip of a uint8 image.

    ``min_size`` is an int or an inclusive ``(lo, hi)`` range from which training draws one
    integer per image (the paper's 2x multi-scale: 640..800). ``rng`` passed to ``__call__``
    makes the draw reproducible; the dataset derives it from the sampler's per-sample seed.
    """

    min_size: int | tuple[int, int] = 800
    max_size: int = 1333
    flip_prob: float = 0.0

    def sample_min_size(self, rng: np.random.Generator) -> int:
        if isinstance(self.min_size, (tuple, list)):
            lo, hi = self.min_size
            return int(rng.integers(lo, hi + 1))
        return int(self.min_size)

    def geometry(self, height: int, width: int, rng: np.random.Generator) -> tuple[int, int, float, bool]:
        """``(h, w, scale, flipped)`` of an image of ``height x width``: the random draws, no pixels."""
        nh, nw, scale = get_resize_size(height, width, self.sample_min_size(rng), self.max_size)
        flipped = bool(self.flip_prob > 0 and rng.random() < self.flip_prob)
        return nh, nw, scale, flipped

    @staticmethod
    def apply_to_target(target: dict, orig_size: tuple[int, int], geometry: tuple[int, int, float, bool]) -> dict:
        """``target`` in original pixels -> in the pixels of ``geometry`` (from :meth:`geometry`)."""
        (h0, w0), (nh, nw, scale, flipped) = orig_size, geometry
        boxes, crowd = target["boxes"], target["crowd_boxes"]
        g = boxes.shape[0]
        both = torch.cat([boxes, crowd]) * boxes.new_tensor([nw / w0, nh / h0, nw / w0, nh / h0])
        if flipped:
            both = hflip_boxes(both, nw)
        return dict(target, boxes=both[:g], crowd_boxes=both[g:], image_size=(nh, nw),
                    scale=float(scale), flipped=flipped)

    def __call__(self, image: torch.Tensor, target: dict, rng: np.random.Generator) -> tuple[torch.Tensor, dict]:
        """``image`` uint8 ``[3, h0, w0]``; ``target`` with ``boxes``/``crowd_boxes`` in original pixels.

        Returns the uint8 ``[3, h, w]`` image and the target in its pixels (see :class:`CocoDetection`).
        """
        h0, w0 = image.shape[-2:]
        geo = self.geometry(h0, w0, rng)
        return resize_flip(image, geo), self.apply_to_target(target, (h0, w0), geo)


def resize_flip(image: torch.Tensor, geometry: tuple[int, int, float, bool]) -> torch.Tensor:
    """Pixels of :meth:`DetectionTransform.geometry` on any device: the flip, then an antialiased
    bilinear resize to ``(h, w)`` (uint8 natively on the CPU; elsewhere via float and rounding).

    Flipping first gives the same pixels as resizing first (the filter taps are mirror-symmetric;
    tests check it) and costs a tenth: the decoded image is smaller and still channels-last.
    """
    nh, nw, _, flipped = geometry
    if flipped:
        image = image.flip(-1)
    if tuple(image.shape[-2:]) != (nh, nw):
        image = TF.resize(image, [nh, nw], antialias=True)
    return image
