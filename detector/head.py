"""The ATSS head (spec section 2.3-2.4), shared across FPN levels.

Two towers of ``num_convs`` x [conv3x3 (bias), GroupNorm (optional), ReLU]; ``cls_logits`` on the
classification tower, ``bbox_pred`` and ``centerness`` on the box tower; a learnable scalar per
level multiplies ``bbox_pred``. With point regression a ReLU follows and the bias starts at 4.
"""
from __future__ import annotations

import math

import torch
from torch import Tensor, nn

from .backbone import ModulatedDeformConv2d


class Scale(nn.Module):
    """A learnable scalar (init 1.0) multiplying its input."""

    def __init__(self, init: float = 1.0) -> None:
        super().__init__()
        self.scale = nn.Parameter(torch.tensor(float(init)))

    def forward(self, x: Tensor) -> Tensor:
        return x * self.scale


def _tower(channels_in: int, channels: int, num_convs: int, group_norm: bool, gn_groups: int,
           dcn_last: bool) -> nn.Sequential:
    layers: list[nn.Module] = []
    for i in range(num_convs):
        c_in = channels_in if i == 0 else channels
        if dcn_last and i == num_convs - 1:
            conv: nn.Module = ModulatedDeformConv2d(c_in, channels, 3, 1, 1, bias=True)
        else:
            conv = nn.Conv2d(c_in, channels, 3, padding=1, bias=True)
        layers.append(conv)
        if group_norm:
            layers.append(nn.GroupNorm(gn_groups, channels))
        layers.append(nn.ReLU(inplace=True))
    return nn.Sequential(*layers)


class ATSSHead(nn.Module):
    """Per-level outputs for ``A`` anchors per location and ``C`` classes.

    forward(features: list of float[B, F, H_l, W_l]) -> (cls, reg, ctr), lists over levels of
    float[B, A*C, H_l, W_l], float[B, A*4, H_l, W_l] and float[B, A, H_l, W_l] (``ctr`` is None when
    ``centerness=False``). ``reg`` holds deltas (``box``) or stride-normalised distances (``point``,
    non-negative).

    Keyword arguments (as the :class:`~detector.config.DetectorConfig` fields of the same meaning):
    ``in_channels`` (F, the FPN width), ``num_classes`` (C), ``anchors_per_location`` (A),
    ``channels`` and ``num_convs`` (tower width and depth), ``group_norm`` / ``gn_groups``,
    ``scalar`` (per-level learnable scale), ``centerness``, ``regression`` (``"box"`` or
    ``"point"``), ``dcn_in_tower`` (last tower conv deformable), ``prior_prob`` (classifier bias
    init) and ``num_levels`` (number of per-level scalars).
    """

    def __init__(self, *, in_channels: int, num_classes: int, anchors_per_location: int = 1,
                 channels: int = 256, num_convs: int = 4, group_norm: bool = True, gn_groups: int = 32,
                 scalar: bool = True, centerness: bool = True, regression: str = "box",
                 dcn_in_tower: bool = False, prior_prob: float = 0.01, num_levels: int = 5) -> None:
        super().__init__()
        a = anchors_per_location
        self.num_classes = num_classes
        self.regression = regression
        self.cls_tower = _tower(in_channels, channels, num_convs, group_norm, gn_groups, dcn_in_tower)
        self.box_tower = _tower(in_channels, channels, num_convs, group_norm, gn_groups, dcn_in_tower)
        c = channels if num_convs > 0 else in_channels
        self.cls_logits = nn.Conv2d(c, a * num_classes, 3, padding=1)
        self.bbox_pred = nn.Conv2d(c, a * 4, 3, padding=1)
        self.centerness = nn.Conv2d(c, a, 3, padding=1) if centerness else None
        self.scales = nn.ModuleList(Scale() for _ in range(num_levels)) if scalar else None

        # As the official head: every nn.Conv2d ~ N(0, 0.01), bias 0. That includes the DCN's offset
        # conv (the official DFConv2d's offset is an nn.Conv2d) but not the deformable weights,
        # which keep their U(+-1/sqrt(fan_in)) from ModulatedDeformConv2d.
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.normal_(m.weight, std=0.01)
                nn.init.zeros_(m.bias)
        nn.init.constant_(self.cls_logits.bias, -math.log((1 - prior_prob) / prior_prob))
        if regression == "point":
            nn.init.constant_(self.bbox_pred.bias, 4.0)

    def forward(self, features: list[Tensor]) -> tuple[list[Tensor], list[Tensor], list[Tensor] | None]:
        cls_out, reg_out, ctr_out = [], [], []
        for lvl, x in enumerate(features):
            cls_out.append(self.cls_logits(self.cls_tower(x)))
            box = self.box_tower(x)
            reg = self.bbox_pred(box)
            if self.scales is not None:
                reg = self.scales[lvl](reg)
            if self.regression == "point":
                reg = torch.relu(reg)
            reg_out.append(reg)
            if self.centerness is not None:
                ctr_out.append(self.centerness(box))
        return cls_out, reg_out, (ctr_out if self.centerness is not None else None)


def flatten_level_outputs(outputs: list[Tensor], channels: int) -> Tensor:
    """Levels of float[B, A*channels, H, W] -> float[B, N, channels] in (level, row, col, anchor) order."""
    flat = []
    for x in outputs:
        b, ac, h, w = x.shape
        a = ac // channels
        flat.append(x.view(b, a, channels, h, w).permute(0, 3, 4, 1, 2).reshape(b, h * w * a, channels))
    return torch.cat(flat, dim=1)
