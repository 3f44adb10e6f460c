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


# Half-sides are multiples of this (1/256 px): ``centre +- half`` is then exact in float32 for
# coordinates below 2**16, so every shape of a location has the location's centre as its exact
# midpoint and ties in centre distance cover whole locations.
HALF_SIDE_STEP = 1.0 / 256


def cell_anchors(stride: int, anchor_scale: float, scales_per_octave: int,
                 aspect_ratios: tuple[float, ...]) -> Tensor:
    """The ``A`` anchor shapes of one location centred on the origin, float[A, 4] xyxy.

    The official generator's rule (maskrcnn-benchmark ``generate_anchors``): the ratio step works
    on the ``stride x stride`` base box in whole pixels, ``w0 = round(sqrt(stride**2 / r))``,
    ``h0 = round(w0 * r)`` (``r = h / w``, round half to even as ``np.round``), and only then is
    the box scaled by ``anchor_scale * 2 ** (i / scales_per_octave)``. So non-square shapes keep
    the official widths and heights (8S, r = 2 at stride 8: 48 x 96, not 45.25 x 90.5); square
    ones are ``anchor_scale * stride * 2 ** (i / scales_per_octave)`` on a side. Under the
    official "+1" convention that width is ``x2 - x1 + 1``; here it is ``x2 - x1`` (spec section 0).
    Order: ratio outer, scale inner, as the official code.

    Half-sides are rounded to :data:`HALF_SIDE_STEP`; sizes that are whole multiples of it (every
    shape with one scale per octave) are the official ones exactly, the irrational octave steps
    (``2 ** (1/3)``) within 1/256 px.
    """
    rows = []
    for ratio in aspect_ratios:
        w0 = round(math.sqrt(stride * stride / ratio))
        h0 = round(w0 * ratio)
        for i in range(scales_per_octave):
            # Same float64 operations as the official code: sizes / stride, then times w0, h0.
            scale = (2.0 ** (i / float(scales_per_octave)) * (anchor_scale * stride)) / stride
            hw = round(w0 * scale / 2 / HALF_SIDE_STEP) * HALF_SIDE_STEP
            hh = round(h0 * scale / 2 / HALF_SIDE_STEP) * HALF_SIDE_STEP
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
