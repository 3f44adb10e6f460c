"""The paper's ablation tables (Tables 1-8) as pure data.

A table (:class:`AblationTable`) is the ordered list of rows of one of the paper's tables: each
:class:`AblationRow` names the detector family it starts from (``atss``, ``retinanet``, ``fcos``,
``atss_fcos``), the :class:`detector.DetectorConfig` overrides that make the row, and the paper's
numbers for it (COCO AP in percent; ``AP`` only where the paper gives nothing else). Planning
(:mod:`pipeline.ablation.plan`) turns the family into a preset of the chosen size, so every table
also runs on the CPU-sized presets with exactly the same switches.
"""
from __future__ import annotations

import re
import typing
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from pipeline.evaluation import METRIC_KEYS

from .space import format_ratio, parse_float, parse_int, parse_ratio

FAMILIES = ("atss", "retinanet", "fcos", "atss_fcos")


@dataclass(frozen=True)
class AblationRow:
    """One row of a paper table.

    ``family``: the detector the row starts from (one of :data:`FAMILIES`); ``overrides``:
    ``DetectorConfig`` fields set on top of that family's preset; ``paper``: the paper's numbers
    for the row (keys from ``pipeline.evaluation.METRIC_KEYS``, percent); ``value``: the swept value
    this row stands for on a single-axis table (``topk=9`` -> 9), used to match ``--values`` and to plot.
    """

    label: str
    family: str
    overrides: Mapping[str, Any]
    paper: Mapping[str, float]
    value: Any = None


@dataclass(frozen=True)
class Axis:
    """The one field a single-axis table varies, and how to read user values for it.

    ``parse`` turns one command-line token into the field value (e.g. ``"1:4"`` -> ``(0.25,)``);
    ``display`` turns a field value back into the table's notation (the label of a row the paper
    does not have: ``k=4``, ``10S``, ``1:3``).
    """

    field: str
    parse: typing.Callable[[str], Any]
    display: typing.Callable[[Any], str] = str
    ranges: bool = True  # "a..b[:step]" allowed


@dataclass(frozen=True)
class AblationTable:
    """An ordered list of rows reproducing one of the paper's tables."""

    name: str  # the --table name
    number: str  # "1" .. "8"
    title: str
    rows: tuple[AblationRow, ...]
    split: str = "minival"  # where the paper's numbers come from
    notes: str = ""
    axis: Axis | None = None  # set for single-axis tables (k, anchor scale, aspect ratio)

    def row(self, label: str) -> AblationRow:
        for r in self.rows:
            if r.label == label:
                return r
        raise ValueError(f"table {self.name!r} has no row {label!r}; rows: {[r.label for r in self.rows]}")



def _paper(*values: float) -> dict[str, float]:
    """The paper's numbers in METRIC_KEYS order (only as many as given)."""
    return dict(zip(METRIC_KEYS, values))







# Table 1's "inconsistencies", added one by one (the row's switch plus all rows above it).
_NO_IMPRS = dict(group_norm=False, reg_loss="smooth_l1", reg_loss_weight=1.0, in_gt_box=False,
                 centerness=False, scalar=False)
_GIOU = dict(reg_loss="giou", reg_loss_weight=2.0)
IMPRS = dict(group_norm=True, **_GIOU, in_gt_box=True, centerness=True, scalar=True)
"""All five of Table 1's improvements ("Imprs." in Table 7)."""
# RetinaNet with one square anchor of scale 8S per location (the paper's "RetinaNet (#A=1)").
A1 = dict(anchor_scale=8.0, scales_per_octave=1, aspect_ratios=(1.0,))


def _cumulative(steps: Sequence[tuple[str, dict, float]]) -> list[AblationRow]:
    rows, acc = [], dict(A1, **_NO_IMPRS)
    for label, switch, ap in steps:
        acc = {**acc, **switch}
        rows.append(AblationRow(label, "retinanet", dict(acc), _paper(ap)))
    return rows


_T1 = AblationTable(
    "inconsistencies", "1", "Inconsistencies between RetinaNet (#A=1) and FCOS, added cumulatively",
    tuple(_cumulative([
        ("RetinaNet (#A=1)", {}, 32.5),
        ("+ GroupNorm", dict(group_norm=True), 33.4),
        ("+ GIoU", _GIOU, 34.9),
        ("+ In GT Box", dict(in_gt_box=True), 35.3),
        ("+ Centerness", dict(centerness=True), 36.8),
        ("+ Scalar", dict(scalar=True), 37.0),
    ]) + [AblationRow("FCOS", "fcos", {}, _paper(37.8))]),
    notes="FCOS has every item; its 37.8 includes centerness on the regression branch, GIoU and "
          "stride-normalised targets.",
)

_T2 = AblationTable(
    "positive_definition", "2", "Positive definition x regression starting status (RetinaNet #A=1 "
    "with all improvements)",
    tuple(AblationRow(label, "retinanet", {**A1, **IMPRS, "assigner": assigner, "regression": regression},
                      _paper(ap))
          for label, assigner, regression, ap in [
              ("IoU, Box", "max_iou", "box", 37.0),
              ("IoU, Point", "max_iou", "point", 36.9),
              ("Spatial & Scale, Box", "spatial_scale", "box", 37.8),
              ("Spatial & Scale, Point", "spatial_scale", "point", 37.8),
          ]),
    notes="Point regression assigns with the square 8S box around each point (ATSS#56).",
)

_T3 = AblationTable(
    "atss_vs_baselines", "3", "ATSS against the baselines' sample selection",
    (
        AblationRow("RetinaNet (#A=1)", "retinanet", {**A1, **IMPRS},
                    _paper(37.0, 55.1, 39.9, 21.4, 41.2, 48.6)),
        AblationRow("RetinaNet (#A=1) + ATSS", "retinanet", {**A1, **IMPRS, "assigner": "atss"},
                    _paper(39.3, 57.5, 42.8, 24.3, 43.3, 51.3)),
        AblationRow("FCOS", "fcos", {}, _paper(37.8, 55.6, 40.7, 22.1, 41.8, 48.8)),
        AblationRow("FCOS + Center sampling", "fcos", {"center_sampling": True},
                    _paper(38.6, 57.4, 41.4, 22.3, 42.5, 49.8)),
        AblationRow("FCOS + ATSS", "atss_fcos", {}, _paper(39.2, 57.3, 42.4, 22.7, 43.1, 51.5)),
    ),
    notes="RetinaNet (#A=1) rows carry all of Table 1's improvements.",
)

_T4 = AblationTable(
    "k", "4", "Hyperparameter k of ATSS (candidates per FPN level)",
    tuple(AblationRow(f"k={k}", "atss", {"topk": k}, _paper(ap), value=k)
          for k, ap in zip(range(3, 20, 2), (38.0, 38.8, 39.1, 39.3, 39.1, 39.0, 39.1, 39.2, 38.9))),
    axis=Axis("topk", parse_int, display=lambda v: f"k={v}"),
)

_T5 = AblationTable(
    "anchor_scale", "5", "Anchor scale (square anchor of side scale x stride)",
    tuple(AblationRow(f"{s}S", "atss", {"anchor_scale": float(s)}, _paper(*nums), value=float(s))
          for s, nums in [
              (5, (39.0, 57.9, 41.9, 23.2, 42.8, 50.5)),
              (6, (39.2, 57.6, 42.5, 23.5, 42.8, 51.1)),
              (7, (39.3, 57.6, 42.4, 22.9, 43.2, 51.3)),
              (8, (39.3, 57.5, 42.8, 24.3, 43.3, 51.3)),
              (9, (38.9, 56.5, 42.0, 22.9, 42.4, 50.3)),
          ]),
    notes="Aspect ratio 1:1.",
    axis=Axis("anchor_scale", parse_float, display=lambda v: f"{v:g}S"),
)

_T6 = AblationTable(
    "aspect_ratio", "6", "Anchor aspect ratio (scale 8S, one anchor per location)",
    tuple(AblationRow(name, "atss", {"aspect_ratios": parse_ratio(name)}, _paper(*nums),
                      value=parse_ratio(name))
          for name, nums in [
              ("1:4", (39.1, 57.2, 42.3, 23.1, 43.1, 51.4)),
              ("1:2", (39.0, 56.9, 42.5, 23.3, 43.5, 50.6)),
              ("1:1", (39.3, 57.5, 42.8, 24.3, 43.3, 51.3)),
              ("2:1", (39.3, 57.4, 42.3, 22.8, 43.4, 51.0)),
              ("4:1", (39.1, 56.9, 42.6, 22.9, 42.9, 50.7)),
          ]),
    notes="a:b is the anchor's height / width.",
    axis=Axis("aspect_ratios", parse_ratio, display=format_ratio, ranges=False),
)

# Table 7: #sc scales per octave x #ar aspect ratios. RetinaNet's 3-scale anchor set keeps its
# octave base scale 4 (sides 4, 5.04, 6.35 x stride); one-scale rows use ATSS's 8S.
_SC3 = dict(scales_per_octave=3, anchor_scale=4.0)
_SC1 = dict(scales_per_octave=1, anchor_scale=8.0)
_AR3 = dict(aspect_ratios=(0.5, 1.0, 2.0))
_AR1 = dict(aspect_ratios=(1.0,))
_T7 = AblationTable(
    "anchors_per_location", "7", "Anchors per location (#sc scales x #ar aspect ratios)",
    (
        AblationRow("RetinaNet (#A=9) #sc=3 #ar=3", "retinanet", {**_SC3, **_AR3},
                    _paper(36.3, 55.2, 38.8, 19.8, 39.8, 48.8)),
        AblationRow("+Imprs. #sc=3 #ar=3", "retinanet", {**_SC3, **_AR3, **IMPRS},
                    _paper(38.4, 56.2, 41.6, 22.2, 42.4, 50.1)),
        AblationRow("+Imprs.+ATSS #sc=3 #ar=3", "retinanet", {**_SC3, **_AR3, **IMPRS, "assigner": "atss"},
                    _paper(39.2, 57.6, 42.7, 23.8, 42.8, 50.9)),
        AblationRow("+Imprs.+ATSS #sc=3 #ar=1", "retinanet", {**_SC3, **_AR1, **IMPRS, "assigner": "atss"},
                    _paper(39.3, 57.7, 42.6, 23.8, 43.5, 51.2)),
        AblationRow("+Imprs.+ATSS #sc=1 #ar=3", "retinanet", {**_SC1, **_AR3, **IMPRS, "assigner": "atss"},
                    _paper(39.2, 57.1, 42.5, 23.2, 43.1, 50.3)),
        AblationRow("+Imprs.+ATSS #sc=1 #ar=1", "retinanet", {**_SC1, **_AR1, **IMPRS, "assigner": "atss"},
                    _paper(39.3, 57.5, 42.8, 24.3, 43.3, 51.3)),
    ),
    notes="Our choice where the paper is silent: 3-scale rows keep RetinaNet's octave base scale 4, "
          "1-scale rows use 8S. ATSS takes k x #anchors candidates per level (official code).",
)

_RESNET_DCN = dict(dcn_stages=(3, 4, 5), dcn_in_tower=True)
_RESNEXT_DCN = dict(dcn_stages=(4, 5), dcn_in_tower=True)
_T8 = AblationTable(
    "backbone", "8", "ATSS with larger backbones (the ATSS rows of Table 8)",
    tuple(AblationRow(label, "atss", overrides, _paper(*nums)) for label, overrides, nums in [
        ("R-101", dict(backbone="resnet101"), (43.6, 62.1, 47.4, 26.1, 47.0, 53.6)),
        ("X-101-32x8d", dict(backbone="resnext101_32x8d"), (45.1, 63.9, 49.1, 27.9, 48.2, 54.6)),
        ("X-101-64x4d", dict(backbone="resnext101_64x4d"), (45.6, 64.6, 49.7, 28.5, 48.9, 55.6)),
        ("R-101-DCN", dict(backbone="resnet101", **_RESNET_DCN), (46.3, 64.7, 50.4, 27.7, 49.8, 58.4)),
        ("X-101-32x8d-DCN", dict(backbone="resnext101_32x8d", **_RESNEXT_DCN),
         (47.7, 66.6, 52.1, 29.3, 50.8, 59.7)),
        ("X-101-64x4d-DCN", dict(backbone="resnext101_64x4d", **_RESNEXT_DCN),
         (47.7, 66.5, 51.9, 29.7, 50.8, 59.4)),
    ]),
    split="test-dev",
    notes="Paper: COCO test-dev, 2x schedule with multi-scale training (640-800); the backbone rows "
          "keep their backbone on every preset size and are meant for a GPU cluster.",
)

TABLES: dict[str, AblationTable] = {t.name: t for t in (_T1, _T2, _T3, _T4, _T5, _T6, _T7, _T8)}
"""``--table`` name -> table, in the paper's order."""
# Also accept the paper's numbering ("4", "T4", "table4").
_TABLE_NUMBERS = {t.number: t.name for t in TABLES.values()}


def get_table(name: str) -> AblationTable:
    """The table called ``name`` (or its number: ``"4"``, ``"T4"``, ``"table4"``)."""
    key = str(name).strip()
    if key in TABLES:
        return TABLES[key]
    m = re.fullmatch(r"(?i)(?:t|table)?\s*(\d)", key)
    if m and m.group(1) in _TABLE_NUMBERS:
        return TABLES[_TABLE_NUMBERS[m.group(1)]]
    choices = ", ".join(f"{n} (T{t.number})" for n, t in TABLES.items())
    raise ValueError(f"unknown table {name!r}; choose one of: {choices}")

