"""The paper's ablation tables as lists of detector configurations, and their results tables.

A *table* (:class:`AblationTable`) is the ordered list of rows of one of the paper's Tables 1-8:
each :class:`AblationRow` names the detector family it starts from (``atss``, ``retinanet``,
``fcos``, ``atss_fcos``), the :class:`detector.DetectorConfig` overrides that make the row, and the
paper's numbers for it (COCO AP in percent; ``AP`` only where the paper gives nothing else).
The family becomes a concrete preset of the chosen size (``retinanet`` + ``r50`` ->
``retinanet_r50``, + ``tiny`` -> ``retinanet_tiny``), so every table also runs on the CPU-sized
presets with exactly the same switches.

A user search space (:func:`parse_space`) is the other source of trials: a grid and/or sampled
values over ``DetectorConfig`` fields, from the command line (``"k=5..15:2; scale~6..9"``), inline
JSON or a JSON/YAML file.

Either becomes a :class:`SweepPlan`: the list of :class:`TrialSpec` (one per configuration and
seed), each holding its full validated ``DetectorConfig``. Planning never touches Ray, so a bad
table, value, field or an impossible combination fails here with a message naming it.

After the sweep, :func:`results_frame` puts our metrics beside the paper's,
:func:`format_table` prints them (Markdown) and :func:`plot_results` draws AP against the swept
value. No Ray and no MLflow in this module (see :mod:`pipeline.sweep`).
"""
from __future__ import annotations

import itertools
import json
import math
import os
import random
import re
import typing
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from detector.config import PRESETS, DetectorConfig, get_preset

METRICS = ("AP", "AP50", "AP75", "APs", "APm", "APl")
FAMILIES = ("atss", "retinanet", "fcos", "atss_fcos")
SIZES = ("r50", "tiny")

# Short names users type on the command line -> DetectorConfig fields.
FIELD_ALIASES = {
    "k": "topk",
    "scale": "anchor_scale",
    "ratio": "aspect_ratios",
    "ratios": "aspect_ratios",
    "aspect_ratio": "aspect_ratios",
}

# ---------------------------------------------------------------------------------------------
# tables
# ---------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class AblationRow:
    """One row of a paper table.

    ``family``: the detector the row starts from (one of :data:`FAMILIES`); ``overrides``:
    ``DetectorConfig`` fields set on top of that family's preset; ``paper``: the paper's numbers
    for the row (keys from :data:`METRICS`, percent); ``value``: the swept value this row stands
    for on a single-axis table (``topk=9`` -> 9), used to match ``--values`` and to plot.
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
    ``display`` turns a field value back into the table's notation.
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
    """The paper's numbers in METRICS order (only as many as given)."""
    return dict(zip(METRICS, values))


def _parse_int(token: str) -> int:
    try:
        return int(token)
    except ValueError:
        raise ValueError(f"{token!r} is not an integer") from None


def _parse_float(token: str) -> float:
    try:
        value = float(token)
    except ValueError:
        raise ValueError(f"{token!r} is not a number") from None
    if not math.isfinite(value):
        raise ValueError(f"{token!r} is not a finite number")
    return value


def parse_ratio(token: str) -> tuple[float, ...]:
    """An aspect ratio as the paper writes it: ``"1:4"`` -> ``(0.25,)``; ``"0.5"`` -> ``(0.5,)``.

    ``a:b`` is ``a / b`` in the detector's convention (height / width). Several ratios per
    location are separated by ``/``: ``"1:2/1:1/2:1"`` -> ``(0.5, 1.0, 2.0)``.
    """
    out = []
    for part in token.split("/"):
        part = part.strip()
        if ":" in part:
            a, _, b = part.partition(":")
            num, den = _parse_float(a), _parse_float(b)
            if den == 0:
                raise ValueError(f"aspect ratio {part!r} divides by zero")
            out.append(num / den)
        else:
            out.append(_parse_float(part))
    if not out or any(r <= 0 for r in out):
        raise ValueError(f"aspect ratio {token!r} must be positive")
    return tuple(out)


def format_ratio(ratios: Sequence[float]) -> str:
    """``(0.25,)`` -> ``"1:4"``, ``(2.0,)`` -> ``"2:1"``, other values as decimals."""
    parts = []
    for r in ratios:
        if r >= 1 and float(r).is_integer():
            parts.append(f"{int(r)}:1")
        elif r < 1 and float(1 / r).is_integer():
            parts.append(f"1:{int(1 / r)}")
        else:
            parts.append(f"{r:g}")
    return "/".join(parts)


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
    axis=Axis("topk", _parse_int),
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
    axis=Axis("anchor_scale", _parse_float, display=lambda v: f"{v:g}S"),
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


# ---------------------------------------------------------------------------------------------
# presets
# ---------------------------------------------------------------------------------------------
def preset_size(preset: str) -> str:
    """``"tiny"`` or ``"r50"``: the size family of a preset name (``retinanet_tiny`` -> ``tiny``);
    the size names themselves are accepted too."""
    if preset in SIZES:
        return preset
    if preset not in PRESETS:
        raise ValueError(f"unknown detector preset {preset!r}; choose one of {sorted(PRESETS)}")
    return "tiny" if preset == "tiny" or preset.endswith("_tiny") else "r50"


def family_preset(family: str, size: str) -> str:
    """The preset of ``family`` in ``size``: ``("retinanet", "tiny")`` -> ``"retinanet_tiny"``."""
    if family not in FAMILIES:
        raise ValueError(f"unknown detector family {family!r}; choose one of {FAMILIES}")
    if size not in SIZES:
        raise ValueError(f"unknown preset size {size!r}; choose one of {SIZES}")
    name = f"{family}_{size}"
    if name not in PRESETS:  # pragma: no cover - guards a preset rename in detector/
        raise ValueError(f"detector preset {name!r} is missing from detector.config.PRESETS")
    return name


# ---------------------------------------------------------------------------------------------
# parsing user values
# ---------------------------------------------------------------------------------------------
_FIELD_TYPES = typing.get_type_hints(DetectorConfig)
_BOOL_WORDS = {"true": True, "1": True, "yes": True, "on": True,
               "false": False, "0": False, "no": False, "off": False}


def resolve_field(name: str) -> str:
    """A ``DetectorConfig`` field name from a user's name (aliases: ``k``, ``scale``, ``ratio``)."""
    key = str(name).strip()
    key = FIELD_ALIASES.get(key, key)
    if key not in _FIELD_TYPES:
        known = sorted(_FIELD_TYPES)
        raise ValueError(f"unknown detector config field {name!r} in the search space; known fields: "
                         f"{', '.join(known)} (aliases: {', '.join(f'{a}={f}' for a, f in FIELD_ALIASES.items())})")
    return key


def _field_kind(name: str) -> tuple[type, bool]:
    """``(scalar type, is_tuple)`` of a DetectorConfig field."""
    hint = _FIELD_TYPES[name]
    if typing.get_origin(hint) is tuple:
        args = [a for a in typing.get_args(hint) if a is not Ellipsis]
        return (args[0] if args else float), True
    return hint, False


def coerce_value(name: str, value: Any) -> Any:
    """``value`` (from JSON/YAML or a command-line token) as the type of field ``name``.

    Raises ``ValueError`` naming the field and the value when it does not fit.
    """
    kind, is_tuple = _field_kind(name)
    try:
        if is_tuple:
            if isinstance(value, str):
                if name == "aspect_ratios":
                    return parse_ratio(value)
                items = [v for v in re.split(r"[/\s]+", value.strip()) if v]
            elif isinstance(value, (list, tuple)):
                items = list(value)
            else:
                items = [value]
            if not items:
                raise ValueError("empty tuple")
            return tuple(_coerce_scalar(kind, v) for v in items)
        return _coerce_scalar(kind, value)
    except ValueError as e:
        raise ValueError(f"bad value {value!r} for field {name!r} ({_type_name(name)}): {e}") from None


def _type_name(name: str) -> str:
    kind, is_tuple = _field_kind(name)
    return f"tuple of {kind.__name__}" if is_tuple else kind.__name__


def _coerce_scalar(kind: type, value: Any) -> Any:
    if kind is bool:
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.strip().lower() in _BOOL_WORDS:
            return _BOOL_WORDS[value.strip().lower()]
        if isinstance(value, int) and value in (0, 1):
            return bool(value)
        raise ValueError("expected true/false")
    if kind is int:
        if isinstance(value, bool):
            raise ValueError("expected an integer")
        if isinstance(value, float):
            if not value.is_integer():
                raise ValueError("expected an integer")
            return int(value)
        if isinstance(value, int):
            return value
        return _parse_int(str(value).strip())
    if kind is float:
        if isinstance(value, bool):
            raise ValueError("expected a number")
        if isinstance(value, (int, float)):
            if not math.isfinite(value):
                raise ValueError("expected a finite number")
            return float(value)
        return _parse_float(str(value).strip())
    if kind is str:
        if not isinstance(value, str):
            raise ValueError("expected a string")
        return value.strip()
    raise ValueError(f"unsupported field type {kind}")  # pragma: no cover


_RANGE = re.compile(r"^\s*(-?[\d.]+(?:e-?\d+)?)\s*\.\.\s*(-?[\d.]+(?:e-?\d+)?)\s*(?::\s*([\d.]+(?:e-?\d+)?))?\s*$")


def _range_values(name: str, lo: Any, hi: Any, step: Any = None) -> list[Any]:
    """Inclusive ``lo..hi`` by ``step`` (default 1) in the field's type."""
    kind, is_tuple = _field_kind(name)
    if is_tuple or kind not in (int, float):
        raise ValueError(f"a range only works for a numeric field; {name!r} is a {_type_name(name)}")
    lo, hi = coerce_value(name, lo), coerce_value(name, hi)
    step = coerce_value(name, 1 if step is None else step)
    if step <= 0:
        raise ValueError(f"range step for {name!r} must be > 0, got {step}")
    if hi < lo:
        raise ValueError(f"empty range {lo}..{hi} for {name!r}")
    n = int(math.floor((hi - lo) / step + 1e-9)) + 1
    if n > 1000:
        raise ValueError(f"range {lo}..{hi}:{step} for {name!r} gives {n} values (more than 1000)")
    return [kind(round(lo + i * step, 10)) for i in range(n)]


def parse_values(name: str, text: str) -> list[Any]:
    """A comma list and/or inclusive ranges of values for field ``name``.

    ``"5,9,13"``, ``"3..19:2"``, ``"5..7,13"``; aspect ratios as ``"1:4,1:1"``. Duplicates are
    dropped (first kept). Raises ``ValueError`` naming the token that does not parse.
    """
    name = resolve_field(name)
    if not isinstance(text, str) or not text.strip():
        raise ValueError(f"no values given for {name!r}")
    values: list[Any] = []
    for token in text.split(","):
        token = token.strip()
        if not token:
            raise ValueError(f"empty value in {text!r} for {name!r}")
        m = _RANGE.match(token) if name != "aspect_ratios" else None
        values.extend(_range_values(name, *m.groups()) if m else [coerce_value(name, token)])
    return _unique(values)


def _unique(values: Sequence[Any]) -> list[Any]:
    out: list[Any] = []
    for v in values:
        if v not in out:
            out.append(v)
    return out


# ---------------------------------------------------------------------------------------------
# user search spaces
# ---------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Dimension:
    """One field of a search space: a grid of values, or a distribution sampled per trial."""

    field: str
    grid: tuple[Any, ...] = ()
    sample: str | None = None  # "randint" | "uniform" | "loguniform" | "choice"
    args: tuple[Any, ...] = ()

    def draw(self, rng: random.Random) -> Any:
        if self.sample == "choice":
            return self.args[rng.randrange(len(self.args))]
        lo, hi = self.args
        if self.sample == "randint":
            return rng.randint(lo, hi)
        if self.sample == "uniform":
            return round(rng.uniform(lo, hi), 4)
        return round(math.exp(rng.uniform(math.log(lo), math.log(hi))), 6)  # loguniform


@dataclass(frozen=True)
class SearchSpace:
    """A user search space: the grid's cartesian product, times ``num_samples`` draws of the
    sampled fields (Tune's semantics), with ``fixed`` overrides on every trial."""

    dimensions: tuple[Dimension, ...]
    fixed: Mapping[str, Any] = field(default_factory=dict)
    num_samples: int = 1

    @property
    def sampled(self) -> bool:
        return any(d.sample for d in self.dimensions)

    @property
    def varied(self) -> tuple[str, ...]:
        return tuple(d.field for d in self.dimensions)

    def configurations(self, seed: int = 0) -> list[dict[str, Any]]:
        """Every configuration (a dict of overrides) in a deterministic order."""
        grid = [d for d in self.dimensions if not d.sample]
        dists = [d for d in self.dimensions if d.sample]
        rng = random.Random(seed)
        out = []
        for _ in range(self.num_samples if dists else 1):
            drawn = {d.field: d.draw(rng) for d in dists}
            for combo in itertools.product(*(d.grid for d in grid)):
                cfg = dict(self.fixed)
                cfg.update(zip((d.field for d in grid), combo))
                cfg.update(drawn)
                out.append({k: cfg[k] for k in [*self.fixed, *self.varied]})
        return out


_SAMPLERS = ("randint", "uniform", "loguniform", "choice")


def _dimension(name: str, spec: Any) -> Dimension | None:
    """A JSON/YAML value -> a Dimension (``None`` for a fixed scalar)."""
    kind, is_tuple = _field_kind(name)
    if isinstance(spec, Mapping):
        if len(spec) != 1:
            raise ValueError(f"search space entry for {name!r} must have exactly one of grid, range, "
                             f"{', '.join(_SAMPLERS)}; got {sorted(spec)}")
        (how, args), = spec.items()
        if how == "grid":
            if not isinstance(args, (list, tuple)) or not args:
                raise ValueError(f"'grid' for {name!r} needs a non-empty list")
            return Dimension(name, grid=tuple(_unique([coerce_value(name, v) for v in args])))
        if how == "range":
            if not isinstance(args, (list, tuple)) or len(args) not in (2, 3):
                raise ValueError(f"'range' for {name!r} needs [lo, hi] or [lo, hi, step]")
            return Dimension(name, grid=tuple(_range_values(name, *args)))
        if how == "choice":
            if not isinstance(args, (list, tuple)) or not args:
                raise ValueError(f"'choice' for {name!r} needs a non-empty list")
            return Dimension(name, sample="choice", args=tuple(coerce_value(name, v) for v in args))
        if how in ("randint", "uniform", "loguniform"):
            if not isinstance(args, (list, tuple)) or len(args) != 2:
                raise ValueError(f"{how!r} for {name!r} needs [lo, hi]")
            if is_tuple or kind not in (int, float):
                raise ValueError(f"{how!r} needs a numeric field; {name!r} is a {_type_name(name)}")
            if how == "randint" and kind is not int:
                raise ValueError(f"'randint' needs an integer field; {name!r} is a {_type_name(name)}")
            lo, hi = (coerce_value(name, a) for a in args)
            if how != "randint":
                lo, hi = float(lo), float(hi)
            if hi < lo or (how == "loguniform" and lo <= 0):
                raise ValueError(f"bad bounds {args} for {how!r} on {name!r}")
            if how != "randint" and kind is int:
                how = "randint"  # uniform over an integer field draws integers
            return Dimension(name, sample=how, args=(lo, hi))
        raise ValueError(f"unknown search space kind {how!r} for {name!r}; use grid, range or "
                         f"{', '.join(_SAMPLERS)}")
    if isinstance(spec, list) and not (is_tuple and spec and not isinstance(spec[0], (list, tuple, str))):
        # A list is a grid, except a flat list of numbers for a tuple field, which is one value.
        if not spec:
            raise ValueError(f"empty list of values for {name!r}")
        return Dimension(name, grid=tuple(_unique([coerce_value(name, v) for v in spec])))
    return None


def _from_mapping(data: Mapping[str, Any], num_samples: int | None) -> SearchSpace:
    data = dict(data)
    if "space" in data:  # {"space": {...}, "num_samples": N}
        meta = {k: v for k, v in data.items() if k != "space"}
        unknown = sorted(set(meta) - {"num_samples"})
        if unknown:
            raise ValueError(f"unknown top-level key(s) {unknown} in the search space (allowed: space, "
                             "num_samples)")
        data, file_samples = dict(data["space"]), meta.get("num_samples")
    else:
        file_samples = data.pop("num_samples", None)
    if not isinstance(data, Mapping) or not data:
        raise ValueError("the search space is empty; give at least one field")
    dims, fixed = [], {}
    for raw_name, spec in data.items():
        name = resolve_field(raw_name)
        if name in fixed or any(d.field == name for d in dims):
            raise ValueError(f"field {name!r} appears twice in the search space")
        dim = _dimension(name, spec)
        if dim is None:
            fixed[name] = coerce_value(name, spec)
        else:
            dims.append(dim)
    return _space(dims, fixed, num_samples if num_samples is not None else file_samples)


def _space(dims: list[Dimension], fixed: dict, num_samples: int | None) -> SearchSpace:
    if not dims:
        raise ValueError("the search space varies nothing: give a list, a range or a distribution for "
                         "at least one field")
    if num_samples is None:
        num_samples = 4 if any(d.sample for d in dims) else 1
    if isinstance(num_samples, bool) or not isinstance(num_samples, int) or num_samples < 1:
        raise ValueError(f"num_samples must be a positive integer, got {num_samples!r}")
    return SearchSpace(tuple(dims), fixed, num_samples)


def _from_compact(text: str, num_samples: int | None) -> SearchSpace:
    """``"k=5..15:2; scale~6..9; group_norm=false"``: ``=`` is a grid (or one fixed value), ``~``
    samples (a range uniformly, a comma list as a choice)."""
    dims, fixed = [], {}
    for part in [p for p in re.split(r"[;\s]+", text.strip()) if p]:
        m = re.fullmatch(r"([A-Za-z_][A-Za-z0-9_]*)\s*([=~])\s*(.+)", part)
        if not m:
            raise ValueError(f"cannot read {part!r} in the search space; write field=values (a grid: "
                             "5,9,13 or 5..15:2) or field~lo..hi / field~a,b (sampled), separated by ';'")
        name, op, rhs = resolve_field(m.group(1)), m.group(2), m.group(3)
        if name in fixed or any(d.field == name for d in dims):
            raise ValueError(f"field {name!r} appears twice in the search space")
        if op == "=":
            values = parse_values(name, rhs)
            if len(values) == 1 and not _RANGE.match(rhs):
                fixed[name] = values[0]
            else:
                dims.append(Dimension(name, grid=tuple(values)))
            continue
        rng = _RANGE.match(rhs) if name != "aspect_ratios" else None
        if rng:
            lo, hi, step = rng.groups()
            if step:
                raise ValueError(f"a sampled range takes no step: {part!r}")
            kind, _ = _field_kind(name)
            dims.append(_dimension(name, {"randint" if kind is int else "uniform": [lo, hi]}))
        else:
            dims.append(Dimension(name, sample="choice", args=tuple(parse_values(name, rhs))))
    return _space(dims, fixed, num_samples)


def parse_space(source: str | Mapping[str, Any], num_samples: int | None = None) -> SearchSpace:
    """A search space from a dict, a JSON/YAML file path, inline JSON, or the compact syntax.

    JSON/YAML: ``{"topk": [5, 9, 13]}`` (grid), ``{"topk": {"range": [5, 15, 2]}}``,
    ``{"anchor_scale": {"uniform": [6, 9]}}``, ``{"topk": {"randint": [5, 15]}}``,
    ``{"aspect_ratios": {"choice": [[1.0], [0.5, 1.0, 2.0]]}}``, a scalar fixes a field;
    optional ``"num_samples": N``. Compact: ``"k=5..15:2; scale~6..9"``.
    """
    if isinstance(source, Mapping):
        return _from_mapping(source, num_samples)
    if not isinstance(source, str) or not source.strip():
        raise ValueError("empty search space")
    text = source.strip()
    path = Path(os.path.expanduser(text))
    if text.endswith((".json", ".yaml", ".yml")) or path.is_file():
        if not path.is_file():
            raise ValueError(f"search space file not found: {path}")
        raw = path.read_text()
        try:
            if path.suffix in (".yaml", ".yml"):
                import yaml

                data = yaml.safe_load(raw)
            else:
                data = json.loads(raw)
        except Exception as e:  # json.JSONDecodeError, yaml.YAMLError
            raise ValueError(f"search space file {path} does not parse: {e}") from None
        if not isinstance(data, Mapping):
            raise ValueError(f"search space file {path} must hold a mapping of field -> values")
        return _from_mapping(data, num_samples)
    if text.startswith("{"):
        try:
            data = json.loads(text)
        except json.JSONDecodeError as e:
            raise ValueError(f"the search space is not valid JSON: {e}") from None
        return _from_mapping(data, num_samples)
    return _from_compact(text, num_samples)


# ---------------------------------------------------------------------------------------------
# plans
# ---------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class TrialSpec:
    """One trial: a configuration of the sweep under one seed.

    ``label`` names the configuration (the paper's row name for a table), ``overrides`` are the
    fields set on top of ``preset``, ``detector`` is the full validated config and ``paper`` the
    paper's numbers for it (empty when the paper has no such row).
    """

    index: int
    label: str
    preset: str
    overrides: Mapping[str, Any]
    detector: DetectorConfig
    seed: int
    paper: Mapping[str, float] = field(default_factory=dict)

    @property
    def name(self) -> str:
        """A short unique name (``t03_k=9_s0``) for directories and run names."""
        slug = re.sub(r"[^A-Za-z0-9=.-]+", "_", self.label).strip("_.=-")[:48]
        return f"t{self.index:02d}_{slug}_s{self.seed}"

    def to_dict(self) -> dict[str, Any]:
        return {"index": self.index, "name": self.name, "label": self.label, "preset": self.preset,
                "seed": self.seed, "overrides": _jsonable(dict(self.overrides)),
                "detector_config": _jsonable(self.detector.to_dict()), "paper": dict(self.paper)}

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> "TrialSpec":
        return cls(index=int(d["index"]), label=d["label"], preset=d["preset"],
                   overrides={k: coerce_value(k, v) for k, v in d["overrides"].items()},
                   detector=DetectorConfig.from_dict(d["detector_config"]), seed=int(d["seed"]),
                   paper=dict(d.get("paper", {})))


@dataclass(frozen=True)
class SweepPlan:
    """What a sweep will run: its trials (in order) and how to present them.

    ``table`` is the paper table's name (``"custom"`` for a user space); ``varied`` the
    ``DetectorConfig`` fields whose value differs between the trials.
    """

    table: str
    title: str
    trials: tuple[TrialSpec, ...]
    varied: tuple[str, ...]
    split: str = "minival"
    notes: str = ""
    axis: str | None = None  # the single swept field, when there is one (for the plot's x axis)

    @property
    def labels(self) -> list[str]:
        return _unique([t.label for t in self.trials])

    @property
    def seeds(self) -> list[int]:
        return _unique([t.seed for t in self.trials])

    def to_dict(self) -> dict[str, Any]:
        return {"table": self.table, "title": self.title, "varied": list(self.varied), "split": self.split,
                "notes": self.notes, "axis": self.axis, "trials": [t.to_dict() for t in self.trials]}

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> "SweepPlan":
        return cls(table=d["table"], title=d["title"], trials=tuple(TrialSpec.from_dict(t) for t in d["trials"]),
                   varied=tuple(d["varied"]), split=d.get("split", "minival"), notes=d.get("notes", ""),
                   axis=d.get("axis"))


def _jsonable(value: Any) -> Any:
    if isinstance(value, Mapping):
        return {str(k): _jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_jsonable(v) for v in value]
    return value


def _check_seeds(seeds: Sequence[int]) -> list[int]:
    seeds = list(seeds)
    if not seeds:
        raise ValueError("give at least one seed")
    if any(isinstance(s, bool) or not isinstance(s, int) or s < 0 for s in seeds):
        raise ValueError(f"seeds must be non-negative integers, got {seeds}")
    if len(set(seeds)) != len(seeds):
        raise ValueError(f"seeds repeat: {seeds}")
    return seeds


def _build(label: str, preset: str, overrides: Mapping[str, Any]) -> DetectorConfig:
    try:
        return get_preset(preset, **overrides)
    except ValueError as e:
        raise ValueError(f"configuration {label!r} ({preset} + {dict(overrides)}) is impossible: {e}") from None


def _varied_fields(configs: Sequence[DetectorConfig]) -> tuple[str, ...]:
    if len(configs) < 2:
        return ()
    dicts = [c.to_dict() for c in configs]
    return tuple(k for k in dicts[0] if any(d[k] != dicts[0][k] for d in dicts[1:]))


def plan_table(name: str, preset: str = "tiny", values: str | Sequence[Any] | None = None,
               rows: str | Sequence[str | int] | None = None, seeds: Sequence[int] = (0,),
               overrides: Mapping[str, Any] | None = None) -> SweepPlan:
    """The trials of paper table ``name`` on the size family of ``preset``.

    ``values`` (single-axis tables only) replaces the paper's values of the swept field
    (``"5,9,13"``, ``"3..19:2"`` or a list); values the paper has keep the paper's numbers.
    ``rows`` keeps only some rows (labels or 1-based positions, or a comma string of them).
    ``overrides`` are extra fields set on every trial before the row's own. Every configuration is
    built and validated here.
    """
    table = get_table(name)
    size = preset_size(preset)
    seeds = _check_seeds(seeds)
    extra = {resolve_field(k): coerce_value(resolve_field(k), v) for k, v in (overrides or {}).items()}
    selected = list(table.rows)
    if values is not None and rows is not None:
        raise ValueError("give either values or rows, not both")
    if values is not None:
        if table.axis is None:
            raise ValueError(f"table {table.name!r} (T{table.number}) has no single swept field, so "
                             f"--values does not apply; pick rows with --rows instead "
                             f"(rows: {[r.label for r in table.rows]})")
        axis = table.axis
        if isinstance(values, str):
            if not values.strip():
                raise ValueError(f"no values given for {axis.field!r}")
            parsed = []
            for token in values.split(","):
                token = token.strip()
                m = _RANGE.match(token) if axis.ranges else None
                try:
                    parsed.extend(_range_values(axis.field, *m.groups()) if m else [axis.parse(token)])
                except ValueError as e:
                    raise ValueError(f"bad value {token!r} for {axis.field!r} of table {table.name!r}: {e}") from None
        else:
            parsed = [coerce_value(axis.field, v) for v in values]
        parsed = _unique([coerce_value(axis.field, v) for v in parsed])
        if not parsed:
            raise ValueError(f"no values given for {axis.field!r}")
        by_value = {r.value: r for r in table.rows}
        selected = [by_value.get(v) or AblationRow(_axis_label(table, v), table.rows[0].family,
                                                   {axis.field: v}, {}, value=v)
                    for v in parsed]
    elif rows is not None:
        selected = _select_rows(table, rows)
    specs, index = [], 0
    for row in selected:
        preset_name = family_preset(row.family, size)
        row_overrides = {**extra, **row.overrides}
        cfg = _build(row.label, preset_name, row_overrides)
        for seed in seeds:
            specs.append(TrialSpec(index, row.label, preset_name, row_overrides, cfg, seed, dict(row.paper)))
            index += 1
    return SweepPlan(table.name, f"Table {table.number}: {table.title}", tuple(specs),
                     _varied_fields([s.detector for s in specs]) or ((table.axis.field,) if table.axis else ()),
                     table.split, table.notes, table.axis.field if table.axis else None)


def _axis_label(table: AblationTable, value: Any) -> str:
    if table.name == "k":
        return f"k={value}"
    return table.axis.display(value)


def _select_rows(table: AblationTable, rows: str | Sequence[str | int]) -> list[AblationRow]:
    items = [r.strip() for r in rows.split(",")] if isinstance(rows, str) else list(rows)
    out = []
    for item in items:
        if isinstance(item, int) or (isinstance(item, str) and item.isdigit()):
            pos = int(item)
            if not 1 <= pos <= len(table.rows):
                raise ValueError(f"table {table.name!r} has rows 1..{len(table.rows)}, not {pos}")
            row = table.rows[pos - 1]
        else:
            row = table.row(item)
        if row not in out:
            out.append(row)
    if not out:
        raise ValueError(f"no rows selected from table {table.name!r}")
    return out


def plan_space(space: SearchSpace | str | Mapping[str, Any], preset: str = "tiny", seeds: Sequence[int] = (0,),
               num_samples: int | None = None, sample_seed: int = 0) -> SweepPlan:
    """The trials of a user search space on top of ``preset`` (sampled values drawn with
    ``sample_seed``, so a dry run shows exactly what will run)."""
    if not isinstance(space, SearchSpace):
        space = parse_space(space, num_samples)
    seeds = _check_seeds(seeds)
    preset_size(preset)  # validates the name
    preset = {"r50": "atss_r50", "tiny": "tiny"}.get(preset, preset)
    specs, index = [], 0
    configurations = space.configurations(sample_seed)
    seen: dict[str, int] = {}
    for overrides in configurations:
        label = ", ".join(f"{k}={_display(k, overrides[k])}" for k in space.varied)
        seen[label] = seen.get(label, 0) + 1
        if seen[label] > 1:  # sampling drew the same configuration again: keep it, name it apart
            label = f"{label} (draw {seen[label]})"
        cfg = _build(label, preset, overrides)
        paper = _paper_for(space.varied, overrides)
        for seed in seeds:
            specs.append(TrialSpec(index, label, preset, overrides, cfg, seed, paper))
            index += 1
    axis = space.varied[0] if len(space.varied) == 1 else None
    title = f"Custom sweep over {', '.join(space.varied)} ({preset})"
    return SweepPlan("custom", title, tuple(specs), _varied_fields([s.detector for s in specs]) or space.varied,
                     notes="sampled" if space.sampled else "", axis=axis)


def _display(name: str, value: Any) -> str:
    if name == "aspect_ratios":
        return format_ratio(value)
    if isinstance(value, tuple):
        return "/".join(f"{v:g}" if isinstance(v, float) else str(v) for v in value)
    if isinstance(value, float):
        return f"{value:g}"
    return str(value)


def _paper_for(varied: Sequence[str], overrides: Mapping[str, Any]) -> dict[str, float]:
    """Paper numbers for a custom configuration that varies exactly one table's axis (on ATSS)."""
    if len(varied) != 1:
        return {}
    for table in TABLES.values():
        if table.axis and table.axis.field == varied[0] and set(overrides) == {varied[0]}:
            for row in table.rows:
                if row.value == overrides[varied[0]]:
                    return dict(row.paper)
    return {}


# ---------------------------------------------------------------------------------------------
# results
# ---------------------------------------------------------------------------------------------
def results_frame(plan: SweepPlan, results: Mapping[int, Mapping[str, Any] | None]):
    """One row per trial: its settings, our metrics (percent), the paper's and the differences.

    ``results`` maps a trial index to its final metrics as the training reports them (COCO's
    0..1 scale; ``-1`` = undefined) plus optional ``status``/``error``/``iterations``; a trial
    missing from it (or ``None``) counts as not finished. Columns: ``trial``, ``label``, ``seed``,
    one per varied field (as text), ``status``, then ``AP``.., ``paper_AP``.., ``diff_AP``.. .
    """
    import pandas as pd

    records = []
    for spec in plan.trials:
        res = results.get(spec.index) or {}
        rec: dict[str, Any] = {"trial": spec.name, "label": spec.label, "seed": spec.seed}
        for name in plan.varied:
            rec[name] = _display(name, getattr(spec.detector, name))
        rec["status"] = res.get("status", "done" if any(m in res for m in METRICS) else "missing")
        rec["iterations"] = res.get("iterations")
        ours = {m: _percent(res.get(m)) for m in METRICS}
        paper = {m: float(spec.paper[m]) if m in spec.paper else math.nan for m in METRICS}
        rec.update(ours)
        rec.update({f"paper_{m}": paper[m] for m in METRICS})
        rec.update({f"diff_{m}": ours[m] - paper[m] for m in METRICS})  # NaN where either is missing
        rec["error"] = str(res.get("error") or "")
        records.append(rec)
    df = pd.DataFrame.from_records(records)
    for col in ("iterations",):
        df[col] = pd.array(df[col], dtype="Int64")
    return df


def _percent(value: Any) -> float:
    """COCO 0..1 -> percent; -1 (no ground truth in that size range) and missing -> NaN."""
    if value is None or isinstance(value, bool):
        return math.nan
    try:
        v = float(value)
    except (TypeError, ValueError):
        return math.nan
    if not math.isfinite(v) or v < 0:
        return math.nan
    return 100.0 * v


def summarize_seeds(df):
    """Mean over seeds of every metric, one row per configuration label (same column layout),
    plus ``seeds`` (how many finished) and ``AP_std``."""
    import pandas as pd

    metric_cols = [c for c in df.columns if c.split("_", 1)[-1] in METRICS or c in METRICS]
    keep = [c for c in df.columns if c not in metric_cols and c not in ("trial", "seed", "status", "error",
                                                                       "iterations")]
    groups = []
    for label, g in df.groupby("label", sort=False):
        row = {c: g[c].iloc[0] for c in keep}
        row["seeds"] = int(g["AP"].notna().sum())
        for c in metric_cols:
            row[c] = g[c].mean()
        row["AP_std"] = g["AP"].std(ddof=1) if g["AP"].notna().sum() > 1 else math.nan
        groups.append(row)
    return pd.DataFrame.from_records(groups)


def _fmt(v: Any, signed: bool = False) -> str:
    if v is None or (isinstance(v, float) and math.isnan(v)):
        return "-"
    return f"{v:+.1f}" if signed else f"{v:.1f}"


def format_table(plan: SweepPlan, df) -> str:
    """Markdown: three lines per configuration (ours, the paper's, ours - paper) and a column per metric."""
    # The label names the configuration (the paper's row name); the varied fields' values are
    # columns of the Parquet file.
    multi_seed = len(plan.seeds) > 1
    head = ["configuration", *(["seed"] if multi_seed else []), "", *METRICS]
    lines = [f"### {plan.title}", ""]
    if plan.notes:
        lines += [f"_{plan.notes}_", ""]
    lines += ["| " + " | ".join(head) + " |", "|" + "|".join("---" for _ in head) + "|"]
    for _, r in df.iterrows():
        first = [str(r["label"]), *([str(r["seed"])] if multi_seed else [])]
        blank = [""] * len(first)
        status = "" if r["status"] in ("done",) else f" ({r['status']})"
        lines.append("| " + " | ".join(first + [f"ours{status}"] + [_fmt(r[m]) for m in METRICS]) + " |")
        if any(not math.isnan(r[f"paper_{m}"]) for m in METRICS):
            lines.append("| " + " | ".join(blank + [f"paper ({plan.split})"]
                                           + [_fmt(r[f"paper_{m}"]) for m in METRICS]) + " |")
            lines.append("| " + " | ".join(blank + ["difference"]
                                           + [_fmt(r[f"diff_{m}"], signed=True) for m in METRICS]) + " |")
    lines.append("")
    lines.append("AP in percent (COCO AP@[.50:.95]); '-' = not given by the paper, undefined "
                 "(no ground truth of that size) or not finished.")
    return "\n".join(lines) + "\n"


def plot_results(plan: SweepPlan, df, path: str | os.PathLike) -> Path:
    """PNG of AP (ours, and the paper's on a second axis) against the swept value.

    Numeric axes (k, anchor scale) are drawn as curves at their values; other tables put one
    tick per configuration in table order. Several seeds: the mean with a min-max band.
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    labels = plan.labels
    numeric = plan.axis in ("topk", "anchor_scale") or (
        plan.axis is not None and _field_kind(plan.axis)[0] in (int, float) and not _field_kind(plan.axis)[1])
    xs: list[float] = []
    for label in labels:
        spec = next(t for t in plan.trials if t.label == label)
        xs.append(float(getattr(spec.detector, plan.axis)) if numeric else float(len(xs)))
    ours = [df.loc[df["label"] == lab, "AP"] for lab in labels]
    mean = [s.mean() if s.notna().any() else math.nan for s in ours]
    lo = [s.min() if s.notna().any() else math.nan for s in ours]
    hi = [s.max() if s.notna().any() else math.nan for s in ours]
    paper = [df.loc[df["label"] == lab, "paper_AP"].iloc[0] for lab in labels]

    fig, ax = plt.subplots(figsize=(max(6.0, 0.9 * len(labels) + 3), 4.2), dpi=110)
    ax.plot(xs, mean, "o-", color="tab:blue", label="ours")
    if len(plan.seeds) > 1:
        ax.fill_between(xs, lo, hi, color="tab:blue", alpha=0.2, label="ours (min-max over seeds)")
    ax.set_ylabel("AP, ours (%)", color="tab:blue")
    handles, names = ax.get_legend_handles_labels()
    if any(not math.isnan(p) for p in paper):
        ax2 = ax.twinx()
        ax2.plot(xs, paper, "s--", color="tab:orange", label=f"paper ({plan.split})")
        ax2.set_ylabel(f"AP, paper (%)", color="tab:orange")
        h2, n2 = ax2.get_legend_handles_labels()
        handles, names = handles + h2, names + n2
    if numeric:
        ax.set_xlabel(plan.axis)
        ax.set_xticks(xs)
        ax.set_xticklabels([_display(plan.axis, type(getattr(plan.trials[0].detector, plan.axis))(x))
                            for x in xs])
    else:
        ax.set_xticks(xs)
        ax.set_xticklabels(labels, rotation=20, ha="right", fontsize=8)
    ax.set_title(plan.title, fontsize=10)
    ax.grid(True, alpha=0.3)
    ax.legend(handles, names, loc="best", fontsize=8)
    fig.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path)
    plt.close(fig)
    return path
