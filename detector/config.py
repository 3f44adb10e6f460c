"""Detector configuration: one flat dataclass whose fields are the paper's switches.

Every dense detector of the paper (RetinaNet, FCOS, ATSS and the steps between them in
Tables 1-7) is one :class:`DetectorConfig`; the ablations are sweeps over its fields
(``cfg.replace(topk=5)``). Fields are flat scalars or tuples of scalars so that they can be
logged as MLflow params and round-trip through JSON (:meth:`to_dict` / :meth:`from_dict`).

Validation runs in ``__post_init__``: every field is checked by type and against ``RULES``
(:mod:`detector.fields`; a bad value raises ``FieldError``, a ``ValueError`` naming the field,
the value and what is allowed), then the combinations the paper does not define raise
``ValueError`` naming the fields.
"""
from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from collections.abc import Mapping
from typing import Any, ClassVar

from .fields import Rule, check_fields, check_keys

BACKBONES = (
    "resnet18",
    "resnet34",
    "resnet50",
    "resnet101",
    "resnext101_32x8d",
    "resnext101_64x4d",
)
ASSIGNERS = ("atss", "max_iou", "spatial_scale", "topk")
REG_LOSSES = ("giou", "smooth_l1")
REGRESSIONS = ("box", "point")
NUM_LEVELS = 5  # FPN P3-P7
STRIDES = (8, 16, 32, 64, 128)


def aspect_ratio(text: str) -> float:
    """One aspect ratio (height / width) as text: ``"1:2"`` -> 0.5 as the paper writes it, or ``"0.5"``."""
    num, sep, den = text.partition(":")
    try:
        value = float(num) / float(den) if sep else float(text)
    except ZeroDivisionError:
        raise ValueError(f"aspect ratio {text!r} divides by zero") from None
    if not math.isfinite(value):
        raise ValueError(f"aspect ratio {text!r} is not a finite number")
    return value


@dataclass(frozen=True)
class DetectorConfig:
    """All settings of the detector; defaults are the paper's final ATSS R-50 model.

    Backbone / FPN
        backbone: one of ``resnet18/34/50/101``, ``resnext101_32x8d``, ``resnext101_64x4d``
            (torchvision definitions).
        pretrained_path: local path of a torchvision ImageNet ``state_dict`` for the backbone;
            ``""`` means random init. Nothing is ever downloaded.
        frozen_stages: stages whose parameters get ``requires_grad=False``: 0 none, 1 the stem,
            2 stem + res2 (paper, ``FREEZE_CONV_BODY_AT=2``), up to 5.
        frozen_bn: ``True`` uses ``FrozenBatchNorm2d`` everywhere in the backbone (paper);
            ``False`` uses trainable ``BatchNorm2d`` (for training a small net from scratch).
        dcn_stages: backbone stages (subset of ``(3, 4, 5)``) whose 3x3 convs become modulated
            deformable convs (DCNv2). Paper's DCN models: ``(3, 4, 5)`` for ResNet,
            ``(4, 5)`` for ResNeXt.
        dcn_in_tower: the last conv of both head towers is a modulated deformable conv.
        fpn_channels: FPN output channels (256).

    Head
        num_classes: foreground classes (80 for COCO); labels are ``1..num_classes``.
        head_channels, num_convs: width and depth of the two towers (256, 4).
        group_norm: GroupNorm after every tower conv (Table 1 "GroupNorm").
        gn_groups: groups of that GroupNorm (32).
        scalar: learnable per-level scalar on the regression output (Table 1 "Scalar").
        centerness: centerness branch on the box tower (Table 1 "Centerness"); requires
            ``in_gt_box`` (ATSS#33: the in-GT-box limit is what makes centerness defined).
        prior_prob: initial foreground probability of the classifier bias (0.01).

    Anchors / regression
        regression: ``"box"`` (deltas from an anchor box) or ``"point"`` (distances l,t,r,b
            from the anchor centre, normalised by the stride; Table 2 "Point").
        anchor_scale: octave base scale; anchor side = ``anchor_scale * stride`` (8 -> "8S").
            With ``regression="point"`` it only sizes the square box used for IoU (spec 1.11).
        scales_per_octave: anchor scales per location, ``2 ** (i / scales_per_octave)``.
        aspect_ratios: height / width ratios of the anchors at each location.
        anchors_per_location (property): ``len(aspect_ratios) * scales_per_octave``.
        bbox_reg_weights: weights of the delta box coder (10, 10, 5, 5).
        delta_clamp: upper clamp of decoded dw, dh (``log(1000 / 16)``).

    Assignment
        assigner: ``"atss"``, ``"max_iou"`` (RetinaNet), ``"spatial_scale"`` (FCOS) or ``"topk"``
            (the official code's ``TOPK``: the ``topk`` anchors of highest IoU over all levels).
        topk: ATSS candidates per level and per anchor shape (k, 9); ``"topk"``: candidates per GT.
        iou_pos_thr, iou_neg_thr, low_quality_matches: the ``max_iou`` matcher
            (0.5 / 0.4, low-quality matches on); IoUs in between are ignored.
        in_gt_box: positives must have their anchor centre strictly inside their GT
            (margin 0.01 px). ``max_iou``: positives outside become ignored (Table 1
            "In-GT-box"). ``atss``, ``topk``: the centre test of the algorithm; off skips it.
            ``spatial_scale`` needs it (it is how FCOS defines positives).
        center_sampling, center_sampling_radius: FCOS centre sampling (radius in strides,
            1.5); ``spatial_scale`` only.
        fcos_size_bounds: FCOS per-level limits on ``max(l, t, r, b)``: level i takes
            ``[bounds[i-1], bounds[i]]`` with -1 and inf at the ends (64, 128, 256, 512).
        crowd_as_ignore: anchors whose IoF with a crowd box exceeds ``crowd_iof_thr`` and
            that are not positive are ignored in the classification loss. Off (default):
            crowd boxes play no part, as in the official code.
        crowd_iof_thr: that IoF threshold (0.5).

    Losses
        focal_alpha, focal_gamma: sigmoid focal loss (0.25, 2.0).
        reg_loss: ``"giou"`` (Table 1 "GIoU") or ``"smooth_l1"`` on encoded targets.
        smooth_l1_beta: beta of smooth-L1 (1/9, RetinaNet's 0.11).
        reg_loss_weight: multiplier of the regression loss (2.0).

    Inference (spec section 4)
        score_thresh (0.05, on the class probability), pre_nms_top_n (1000, per level),
        nms_thresh (0.6, class-wise), detections_per_img (100).
    """

    # backbone / FPN
    backbone: str = "resnet50"
    pretrained_path: str = ""
    frozen_stages: int = 2
    frozen_bn: bool = True
    dcn_stages: tuple[int, ...] = ()
    dcn_in_tower: bool = False
    fpn_channels: int = 256
    # head
    num_classes: int = 80
    head_channels: int = 256
    num_convs: int = 4
    group_norm: bool = True
    gn_groups: int = 32
    scalar: bool = True
    centerness: bool = True
    prior_prob: float = 0.01
    # anchors / regression
    regression: str = "box"
    anchor_scale: float = 8.0
    scales_per_octave: int = 1
    aspect_ratios: tuple[float, ...] = (1.0,)
    bbox_reg_weights: tuple[float, float, float, float] = (10.0, 10.0, 5.0, 5.0)
    delta_clamp: float = math.log(1000.0 / 16)
    # assignment
    assigner: str = "atss"
    topk: int = 9
    iou_pos_thr: float = 0.5
    iou_neg_thr: float = 0.4
    low_quality_matches: bool = True
    in_gt_box: bool = True
    center_sampling: bool = False
    center_sampling_radius: float = 1.5
    fcos_size_bounds: tuple[float, float, float, float] = (64.0, 128.0, 256.0, 512.0)
    crowd_as_ignore: bool = False
    crowd_iof_thr: float = 0.5
    # losses
    focal_alpha: float = 0.25
    focal_gamma: float = 2.0
    reg_loss: str = "giou"
    smooth_l1_beta: float = 1.0 / 9
    reg_loss_weight: float = 2.0
    # inference
    score_thresh: float = 0.05
    pre_nms_top_n: int = 1000
    nms_thresh: float = 0.6
    detections_per_img: int = 100

    # What each field allows beyond its annotated type (detector.fields checks both).
    RULES: ClassVar[Mapping[str, Rule]] = {
        "backbone": Rule(choices=BACKBONES),
        "frozen_stages": Rule(ge=0, le=5),
        "dcn_stages": Rule(choices=(3, 4, 5)),
        "fpn_channels": Rule(ge=1),
        "num_classes": Rule(ge=1),
        "head_channels": Rule(ge=1),
        "num_convs": Rule(ge=0),
        "gn_groups": Rule(ge=1),
        "prior_prob": Rule(gt=0, lt=1),
        "regression": Rule(choices=REGRESSIONS),
        "anchor_scale": Rule(gt=0),
        "scales_per_octave": Rule(ge=1),
        "aspect_ratios": Rule(gt=0, nonempty=True, token=aspect_ratio),
        "bbox_reg_weights": Rule(gt=0),
        "delta_clamp": Rule(gt=0),
        "assigner": Rule(choices=ASSIGNERS),
        "topk": Rule(ge=1),
        "iou_pos_thr": Rule(ge=0, le=1),
        "iou_neg_thr": Rule(ge=0, le=1),
        "center_sampling_radius": Rule(gt=0),
        "fcos_size_bounds": Rule(gt=0),
        "crowd_iof_thr": Rule(gt=0, le=1),
        "focal_alpha": Rule(ge=0, le=1),
        "focal_gamma": Rule(ge=0),
        "reg_loss": Rule(choices=REG_LOSSES),
        "smooth_l1_beta": Rule(ge=0),
        "reg_loss_weight": Rule(ge=0),
        "score_thresh": Rule(ge=0, lt=1),
        "pre_nms_top_n": Rule(ge=1),
        "nms_thresh": Rule(gt=0, le=1),
        "detections_per_img": Rule(ge=1),
    }

    def __post_init__(self) -> None:
        if self.pretrained_path is None:  # "no weights" written as null in JSON/YAML
            object.__setattr__(self, "pretrained_path", "")
        check_fields(self)
        object.__setattr__(self, "dcn_stages", tuple(sorted(set(self.dcn_stages))))
        self._validate()

    # ------------------------------------------------------------------ validation
    def _validate(self) -> None:
        """Checks between fields; each field on its own was checked against RULES."""
        def bad(msg: str) -> None:
            raise ValueError(f"DetectorConfig: {msg}")

        if any(s <= self.frozen_stages for s in self.dcn_stages):
            bad(f"dcn_stages={self.dcn_stages} overlap frozen_stages={self.frozen_stages}; a frozen stage "
                "cannot learn deformable offsets")
        if self.dcn_in_tower and self.num_convs < 1:
            bad("dcn_in_tower=True needs num_convs >= 1 (it replaces the last tower conv)")
        if self.group_norm and self.head_channels % self.gn_groups:
            bad(f"head_channels={self.head_channels} is not divisible by gn_groups={self.gn_groups}")
        if list(self.fcos_size_bounds) != sorted(self.fcos_size_bounds):
            bad(f"fcos_size_bounds={self.fcos_size_bounds} must be {NUM_LEVELS - 1} increasing numbers")
        if not self.iou_neg_thr <= self.iou_pos_thr:
            bad(f"need 0 <= iou_neg_thr ({self.iou_neg_thr}) <= iou_pos_thr ({self.iou_pos_thr}) <= 1")
        # Combinations the paper's method does not define.
        if self.centerness and not self.in_gt_box:
            bad("centerness=True requires in_gt_box=True: centerness is undefined for positives whose "
                "anchor centre lies outside their GT (ATSS#33)")
        if self.regression == "point" and not self.in_gt_box:
            bad("regression='point' requires in_gt_box=True: distances to the GT sides must be positive")
        if self.regression == "point" and self.anchors_per_location != 1:
            bad(f"regression='point' regresses from one point per location; got anchors_per_location="
                f"{self.anchors_per_location} (aspect_ratios={self.aspect_ratios}, "
                f"scales_per_octave={self.scales_per_octave})")
        if self.assigner == "spatial_scale" and not self.in_gt_box:
            bad("assigner='spatial_scale' requires in_gt_box=True (FCOS positives are points inside a GT)")
        if self.assigner == "spatial_scale" and self.anchors_per_location != 1:
            bad("assigner='spatial_scale' assigns locations, it needs anchors_per_location == 1")
        if self.center_sampling and self.assigner != "spatial_scale":
            bad(f"center_sampling=True is FCOS centre sampling and needs assigner='spatial_scale', "
                f"not {self.assigner!r}")

    # ------------------------------------------------------------------ helpers
    @property
    def anchors_per_location(self) -> int:
        """Anchors at every feature-map location: ``len(aspect_ratios) * scales_per_octave``."""
        return len(self.aspect_ratios) * self.scales_per_octave

    @property
    def strides(self) -> tuple[int, ...]:
        """Strides of P3..P7."""
        return STRIDES

    def replace(self, **changes: Any) -> "DetectorConfig":
        """A copy with ``changes`` applied and validated; unknown names raise ``ValueError``."""
        _check_keys(changes)
        return dataclasses.replace(self, **changes)

    def to_dict(self) -> dict[str, Any]:
        """Plain dict of the fields (tuples stay tuples; JSON turns them into lists)."""
        return {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "DetectorConfig":
        """Inverse of :meth:`to_dict`; unknown keys raise ``ValueError`` naming them."""
        _check_keys(d)
        return cls(**d)


def _check_keys(d: dict[str, Any]) -> None:
    check_keys(DetectorConfig, d)


# ---------------------------------------------------------------------- presets
_RETINANET = dict(
    # RetinaNet (#A=9), none of the paper's improvements: 3 scales x 3 ratios, octave base scale 4
    # (sizes 32..512), max-IoU 0.5/0.4 with low-quality matches, smooth-L1 on deltas.
    assigner="max_iou",
    anchor_scale=4.0,
    scales_per_octave=3,
    aspect_ratios=(0.5, 1.0, 2.0),
    group_norm=False,
    reg_loss="smooth_l1",
    reg_loss_weight=1.0,
    in_gt_box=False,
    centerness=False,
    scalar=False,
)
_FCOS = dict(regression="point", assigner="spatial_scale")
_ATSS_FCOS = dict(regression="point", assigner="atss")
# CPU-sized networks for tests and smoke runs: trained from scratch, so BN is trainable and
# nothing is frozen; the head is narrow and shallow.
_TINY = dict(
    backbone="resnet18",
    frozen_stages=0,
    frozen_bn=False,
    fpn_channels=32,
    head_channels=32,
    num_convs=2,
    gn_groups=8,
)

# Preset name -> field overrides of DetectorConfig ("tiny" is "atss_tiny").
PRESETS: dict[str, dict[str, Any]] = {
    "atss_r50": {},
    "retinanet_r50": _RETINANET,
    "fcos_r50": _FCOS,
    "atss_fcos_r50": _ATSS_FCOS,
    "tiny": _TINY,
    "atss_tiny": _TINY,
    "retinanet_tiny": {**_RETINANET, **_TINY},
    "fcos_tiny": {**_FCOS, **_TINY},
    "atss_fcos_tiny": {**_ATSS_FCOS, **_TINY},
}


def get_preset(name: str, **overrides: Any) -> DetectorConfig:
    """The preset ``name`` with ``overrides`` applied (both validated)."""
    if name not in PRESETS:
        raise ValueError(f"unknown detector preset {name!r}; choose one of {sorted(PRESETS)}")
    _check_keys(overrides)
    return DetectorConfig(**{**PRESETS[name], **overrides})
