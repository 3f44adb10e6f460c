"""The search-space language: user values for ``DetectorConfig`` fields and whole search spaces.

* :func:`resolve_field` / :func:`coerce_value`: a user's field name (aliases ``k``, ``scale``,
  ``ratio``) and value (a command-line token, JSON or YAML) as the field's type, or a ``ValueError``
  naming the field, the value and what is allowed.
* :func:`parse_values`: ``"5,9,13"``, ``"3..19:2"``, ``"1:4,1:1"`` for one field.
* :func:`parse_space`: a :class:`SearchSpace` (grid and/or sampled fields) from the compact syntax
  (``"k=5..15:2; scale~6..9"``), inline JSON, a JSON/YAML file or a dict.

Pure Python over :class:`detector.DetectorConfig`'s field types: no Ray, no MLflow, no torch use.
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

from detector.config import DetectorConfig
from detector.fields import check_value

# Short names users type on the command line -> DetectorConfig fields.
FIELD_ALIASES = {
    "k": "topk",
    "scale": "anchor_scale",
    "ratio": "aspect_ratios",
    "ratios": "aspect_ratios",
    "aspect_ratio": "aspect_ratios",
}


def parse_int(token: str) -> int:
    """A command-line integer, or a ValueError naming the token."""
    try:
        return int(token)
    except ValueError:
        raise ValueError(f"{token!r} is not an integer") from None


def parse_float(token: str) -> float:
    """A finite command-line number, or a ValueError naming the token."""
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
            num, den = parse_float(a), parse_float(b)
            if den == 0:
                raise ValueError(f"aspect ratio {part!r} divides by zero")
            out.append(num / den)
        else:
            out.append(parse_float(part))
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


def field_kind(name: str) -> tuple[type, bool]:
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
    kind, is_tuple = field_kind(name)
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
            out = tuple(_coerce_scalar(kind, v) for v in items)
        else:
            out = _coerce_scalar(kind, value)
    except ValueError as e:
        raise ValueError(f"bad value {value!r} for field {name!r} ({_type_name(name)}): {e}") from None
    return check_value(DetectorConfig, name, out)  # the field's range and choices (detector.fields)


def _type_name(name: str) -> str:
    kind, is_tuple = field_kind(name)
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
        return parse_int(str(value).strip())
    if kind is float:
        if isinstance(value, bool):
            raise ValueError("expected a number")
        if isinstance(value, (int, float)):
            if not math.isfinite(value):
                raise ValueError("expected a finite number")
            return float(value)
        return parse_float(str(value).strip())
    if kind is str:
        if not isinstance(value, str):
            raise ValueError("expected a string")
        return value.strip()
    raise ValueError(f"unsupported field type {kind}")  # pragma: no cover


RANGE = re.compile(r"^\s*(-?[\d.]+(?:e-?\d+)?)\s*\.\.\s*(-?[\d.]+(?:e-?\d+)?)\s*(?::\s*([\d.]+(?:e-?\d+)?))?\s*$")


def range_values(name: str, lo: Any, hi: Any, step: Any = None) -> list[Any]:
    """Inclusive ``lo..hi`` by ``step`` (default 1) in the field's type."""
    kind, is_tuple = field_kind(name)
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
        m = RANGE.match(token) if name != "aspect_ratios" else None
        values.extend(range_values(name, *m.groups()) if m else [coerce_value(name, token)])
    return unique(values)


def display_value(name: str, value: Any) -> str:
    """A field value as the tables write it: ``(0.25,)`` -> ``"1:4"``, ``8.0`` -> ``"8"``."""
    if name == "aspect_ratios":
        return format_ratio(value)
    if isinstance(value, tuple):
        return "/".join(f"{v:g}" if isinstance(v, float) else str(v) for v in value)
    if isinstance(value, float):
        return f"{value:g}"
    return str(value)


def unique(values: Sequence[Any]) -> list[Any]:
    """``values`` without repeats, first occurrence kept (values may be unhashable)."""
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
    kind, is_tuple = field_kind(name)
    if isinstance(spec, Mapping):
        if len(spec) != 1:
            raise ValueError(f"search space entry for {name!r} must have exactly one of grid, range, "
                             f"{', '.join(_SAMPLERS)}; got {sorted(spec)}")
        (how, args), = spec.items()
        if how == "grid":
            if not isinstance(args, (list, tuple)) or not args:
                raise ValueError(f"'grid' for {name!r} needs a non-empty list")
            return Dimension(name, grid=tuple(unique([coerce_value(name, v) for v in args])))
        if how == "range":
            if not isinstance(args, (list, tuple)) or len(args) not in (2, 3):
                raise ValueError(f"'range' for {name!r} needs [lo, hi] or [lo, hi, step]")
            return Dimension(name, grid=tuple(range_values(name, *args)))
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
        return Dimension(name, grid=tuple(unique([coerce_value(name, v) for v in spec])))
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
            if len(values) == 1 and not RANGE.match(rhs):
                fixed[name] = values[0]
            else:
                dims.append(Dimension(name, grid=tuple(values)))
            continue
        rng = RANGE.match(rhs) if name != "aspect_ratios" else None
        if rng:
            lo, hi, step = rng.groups()
            if step:
                raise ValueError(f"a sampled range takes no step: {part!r}")
            kind, _ = field_kind(name)
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


