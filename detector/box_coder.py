"""Box coders: anchor-box deltas (``regression="box"``) and stride-normalised point distances
(``regression="point"``). All boxes are xyxy in absolute pixels, no "+1" (spec section 0)."""
from __future__ import annotations

import math

import torch
from torch import Tensor


class DeltaBoxCoder:
    """RetinaNet/ATSS deltas ``(dx, dy, dw, dh)`` of a box relative to an anchor box.

    ``dx = wx * (gx - ax) / aw``, ``dw = ww * log(gw / aw)`` (weights 10, 10, 5, 5). Decoding clamps
    ``dw, dh`` from above at ``clamp`` (``log(1000 / 16)``, official: upper side only).
    """

    def __init__(self, weights: tuple[float, float, float, float] = (10.0, 10.0, 5.0, 5.0),
                 clamp: float = math.log(1000.0 / 16)) -> None:
        self.weights = tuple(float(w) for w in weights)
        self.clamp = clamp

    def encode(self, boxes: Tensor, anchors: Tensor) -> Tensor:
        """boxes, anchors: float[..., 4] xyxy -> deltas float[..., 4]."""
        wx, wy, ww, wh = self.weights
        aw = anchors[..., 2] - anchors[..., 0]
        ah = anchors[..., 3] - anchors[..., 1]
        ax = anchors[..., 0] + 0.5 * aw
        ay = anchors[..., 1] + 0.5 * ah
        gw = boxes[..., 2] - boxes[..., 0]
        gh = boxes[..., 3] - boxes[..., 1]
        gx = boxes[..., 0] + 0.5 * gw
        gy = boxes[..., 1] + 0.5 * gh
        return torch.stack([wx * (gx - ax) / aw, wy * (gy - ay) / ah,
                            ww * torch.log(gw / aw), wh * torch.log(gh / ah)], dim=-1)

    def decode(self, deltas: Tensor, anchors: Tensor) -> Tensor:
        """deltas float[..., 4], anchors float[..., 4] xyxy -> boxes float[..., 4] xyxy."""
        wx, wy, ww, wh = self.weights
        aw = anchors[..., 2] - anchors[..., 0]
        ah = anchors[..., 3] - anchors[..., 1]
        ax = anchors[..., 0] + 0.5 * aw
        ay = anchors[..., 1] + 0.5 * ah
        dx = deltas[..., 0] / wx
        dy = deltas[..., 1] / wy
        dw = (deltas[..., 2] / ww).clamp(max=self.clamp)
        dh = (deltas[..., 3] / wh).clamp(max=self.clamp)
        cx = dx * aw + ax
        cy = dy * ah + ay
        w = torch.exp(dw) * aw
        h = torch.exp(dh) * ah
        return torch.stack([cx - 0.5 * w, cy - 0.5 * h, cx + 0.5 * w, cy + 0.5 * h], dim=-1)


class PointCoder:
    """FCOS-style distances ``(l, t, r, b)`` from a point to the box sides, divided by the stride."""

    def encode(self, boxes: Tensor, points: Tensor, strides: Tensor) -> Tensor:
        """boxes float[..., 4] xyxy, points float[..., 2] (x, y), strides float[...] -> float[..., 4]."""
        s = strides.unsqueeze(-1)
        return torch.cat([points - boxes[..., :2], boxes[..., 2:] - points], dim=-1) / s

    def decode(self, distances: Tensor, points: Tensor, strides: Tensor) -> Tensor:
        """distances float[..., 4] (in strides), points float[..., 2], strides float[...] -> xyxy."""
        d = distances * strides.unsqueeze(-1)
        return torch.cat([points - d[..., :2], points + d[..., 2:]], dim=-1)
