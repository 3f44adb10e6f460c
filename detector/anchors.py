"""Anchors (and points) on the FPN levels.

Centres sit at ``((col + 0.5) * stride, (row + 0.5) * stride)`` (spec section 0). Within a level
the order is (row, col, anchor-type) with the anchor type fastest, which is the order of the
head's outputs after :func:`detector.head.flatten_head_outputs`; levels are concatenated P3..P7.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import Tensor


def cell_anchors(stride: int, anchor_scale: float, scales_per_octave: int,
                 aspect_ratios: tuple[float, ...]) -> Tensor:
    """The ``A`` anchor shapes of one location centred on the origin, float[A, 4] xyxy.

    Side of the square anchor: ``anchor_scale * stride * 2 ** (i / scales_per_octave)``;
    a ratio ``r = h / w`` keeps the area. Order: ratio outer, scale inner (maskrcnn-benchmark).
    Half-sides are rounded to 1/16 px (the official code rounds to whole pixels) so that
    ``centre +- half`` is exact in float32 and every shape of a location has exactly the location's
    centre as its midpoint: ties in centre distance then cover whole locations.
    """
    rows = []
    for ratio in aspect_ratios:
        for i in range(scales_per_octave):
            size = anchor_scale * stride * 2.0 ** (i / scales_per_octave)
            w = size / math.sqrt(ratio)
            h = size * math.sqrt(ratio)
            hw, hh = round(w * 8) / 16, round(h * 8) / 16
            rows.append([-hw, -hh, hw, hh])
    return torch.tensor(rows, dtype=torch.float32)


@dataclass
class AnchorSet:
    """Anchors of all levels for one padded image size.

    anchors: float[N, 4] xyxy, absolute pixels.
    strides: float[N], the stride of each anchor's level.
    levels: int64[N], the level index (0 = P3).
    num_per_level: anchors per level (sum = N).
    """

    anchors: Tensor
    strides: Tensor
    levels: Tensor
    num_per_level: list[int]

    @property
    def centers(self) -> Tensor:
        """float[N, 2] anchor centres (x, y)."""
        return (self.anchors[:, :2] + self.anchors[:, 2:]) / 2


class AnchorGenerator:
    """Builds (and caches per feature-map shape) the :class:`AnchorSet` of a batch."""

    def __init__(self, strides: tuple[int, ...], anchor_scale: float, scales_per_octave: int,
                 aspect_ratios: tuple[float, ...]) -> None:
        self.strides = tuple(strides)
        self.cells = [cell_anchors(s, anchor_scale, scales_per_octave, aspect_ratios) for s in strides]
        self._cache: dict[tuple, AnchorSet] = {}

    @property
    def anchors_per_location(self) -> int:
        return self.cells[0].shape[0]

    def __call__(self, feature_sizes: list[tuple[int, int]], device: torch.device) -> AnchorSet:
        key = (tuple(feature_sizes), str(device))
        if key not in self._cache:
            if len(self._cache) > 32:  # multi-scale training sees many sizes; keep the cache small
                self._cache.clear()
            self._cache[key] = self._build(feature_sizes, device)
        return self._cache[key]

    def _build(self, feature_sizes: list[tuple[int, int]], device: torch.device) -> AnchorSet:
        anchors, strides, levels, counts = [], [], [], []
        for lvl, ((h, w), stride, cell) in enumerate(zip(feature_sizes, self.strides, self.cells)):
            ys = (torch.arange(h, dtype=torch.float32, device=device) + 0.5) * stride
            xs = (torch.arange(w, dtype=torch.float32, device=device) + 0.5) * stride
            cy, cx = torch.meshgrid(ys, xs, indexing="ij")
            shifts = torch.stack([cx, cy, cx, cy], dim=-1).reshape(-1, 1, 4)
            a = (shifts + cell.to(device).reshape(1, -1, 4)).reshape(-1, 4)
            anchors.append(a)
            strides.append(torch.full((a.shape[0],), float(stride), device=device))
            levels.append(torch.full((a.shape[0],), lvl, dtype=torch.long, device=device))
            counts.append(a.shape[0])
        return AnchorSet(torch.cat(anchors), torch.cat(strides), torch.cat(levels), counts)
