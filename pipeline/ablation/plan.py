"""Planning: a paper table or a search space becomes the list of trials that will run, fully resolved.

Every trial is one :class:`TrialConfig`, built once here: its name, label, index and seed, the
paper's numbers for its row, its :class:`~pipeline.training.TrainConfig` (from
:func:`~pipeline.training.build_train_config`: the detector with ``num_classes`` from the data's
categories, the resolved schedule and LR, periods, storage and MLflow) and its
:class:`~pipeline.resources.TrialResources`. That one object is what ``jobs/ablation.py --dry-run``
prints, what ``plan.json`` stores, what Tune's ``param_space`` carries (``to_dict`` at the Tune
boundary) and what the trial trains (``from_dict`` in the Tune trial).

Planning never starts Ray: a bad table, value, field, setting or an impossible combination fails
here with a ``ValueError`` naming it (``FileNotFoundError`` for missing data).
"""
from __future__ import annotations

import dataclasses
import datetime
import os
import re
import sys
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar, Optional

from detector.config import PRESETS, DetectorConfig, get_preset
from detector.fields import Rule, check_fields
from pipeline import tracking
from pipeline.resources import (TrialResources, cpu_plan, declared_cpu_scale, local_gpu_count, plan_for,
                                resolve_device)
from pipeline.training import TrainConfig, build_train_config, check_settings, is_tiny

from .space import RANGE, SearchSpace, coerce_value, display_value, parse_space, range_values, resolve_field, unique
from .tables import FAMILIES, TABLES, AblationRow, AblationTable, get_table

SIZES = ("r50", "tiny")
DEFAULT_EXPERIMENT = "atss-ablation"
_NAME_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.=-]*")
# TrainConfig settings the sweep sets per trial itself (the sweep's own options set the rest).
_PER_TRIAL = ("preset", "detector", "data", "batch_size", "iterations", "schedule", "seed", "storage_path",
              "run_name", "amp", "mlflow_enabled", "mlflow_uri", "mlflow_experiment", "mlflow_parent_run_id",
              "mlflow_tags", "mlflow_run_id")


# ---------------------------------------------------------------------------------------------
# how a sweep runs
# ---------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class SweepConfig:
    """How to run a plan: where results go, training length, resources, scheduling.

    ``data``: ``DataConfig`` fields; ``train``: further :func:`~pipeline.training.build_train_config`
    settings for every trial (``base_lr``, ``log_period``, ...); ``amp``: None (fp32) or ``"bf16"``.
    Resources: ``device`` ``"auto"`` is resolved by :func:`trial_device`; a GPU plan comes from the
    backbone (:func:`pipeline.resources.plan_for`), a CPU plan from ``workers_per_trial`` x
    ``cpus_per_worker``; ``batch_per_worker`` overrides either. ``max_concurrent_trials`` None: as
    many as the cluster's CPUs hold on a CPU cluster, unbounded on a GPU cluster (trials wait for
    their placement group, which is what makes an autoscaler add nodes).
    """

    name: Optional[str] = None
    storage_path: Optional[str] = None
    mlflow_uri: Optional[str] = None
    experiment: str = DEFAULT_EXPERIMENT
    iterations: Optional[int] = None
    schedule: Optional[str] = None
    data: Mapping[str, Any] = field(default_factory=dict)
    train: Mapping[str, Any] = field(default_factory=dict)
    amp: Optional[str] = None
    device: str = "auto"
    workers_per_trial: Optional[int] = None
    cpus_per_worker: Optional[float] = None
    batch_per_worker: Optional[int] = None
    accelerator_type: Optional[str] = None
    max_concurrent_trials: Optional[int] = None
    max_failures: int = 0
    asha: bool = False
    asha_grace_period: Optional[int] = None
    asha_reduction_factor: int = 2
    eval_period: Optional[int] = None
    log_model: bool = False
    verbose: int = 1

    # What each field allows beyond its annotated type (detector.fields checks both).
    RULES: ClassVar[Mapping[str, Rule]] = {
        "iterations": Rule(ge=1),
        "device": Rule(choices=("auto", "cpu", "gpu")),
        "workers_per_trial": Rule(ge=1),
        "cpus_per_worker": Rule(gt=0),
        "batch_per_worker": Rule(ge=1),
        "max_concurrent_trials": Rule(ge=1),
        "max_failures": Rule(ge=0),
        "asha_grace_period": Rule(ge=1),
        "asha_reduction_factor": Rule(ge=2),
        "eval_period": Rule(ge=1),
        "verbose": Rule(ge=0),
    }

    def __post_init__(self) -> None:
        check_fields(self)
        if self.name is not None and not _NAME_RE.fullmatch(self.name):
            raise ValueError(f"sweep name {self.name!r}: use letters, digits and _ . = - (it names a directory)")
        if self.iterations is not None and self.schedule is not None:
            raise ValueError("give either iterations or a schedule (1x, 2x), not both")
        if self.iterations is None and self.schedule is None:
            object.__setattr__(self, "schedule", "1x")
        if self.eval_period is not None and self.iterations is not None and self.eval_period > self.iterations:
            raise ValueError(f"eval_period {self.eval_period} is longer than the run ({self.iterations} iterations)")
        check_settings(self.train, "train settings")
        clash = sorted(set(self.train) & set(_PER_TRIAL))
        if clash:
            raise ValueError(f"train settings {clash} are set by the sweep itself (per trial); use the "
                             "sweep's own options instead")
        object.__setattr__(self, "data", dict(self.data))
        object.__setattr__(self, "train", dict(self.train))

    @property
    def length_text(self) -> str:
        return f"{self.iterations} iterations" if self.iterations else f"the {self.schedule} schedule"

    def replace(self, **changes: Any) -> "SweepConfig":
        return dataclasses.replace(self, **changes)

    def resolve_paths(self, cwd: Optional[str | os.PathLike] = None) -> "SweepConfig":
        """Absolute storage path (Ray rejects relative ones) and MLflow URI (workers run elsewhere)."""
        base = Path(cwd or os.getcwd()).resolve()
        storage = self.storage_path or str(base / "ray_results")
        if "://" not in storage:
            storage = str((base / Path(storage).expanduser()).resolve())
        uri = (tracking.absolute_tracking_uri(self.mlflow_uri, base) if self.mlflow_uri
               else tracking.default_tracking_uri(base))
        return self.replace(storage_path=storage, mlflow_uri=uri)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> "SweepConfig":
        known = {f.name for f in dataclasses.fields(cls)}
        return cls(**{k: v for k, v in d.items() if k in known})


def trial_device(device: str) -> str:
    """``"cpu"`` or ``"gpu"``: the kind of plan the trials get.

    An explicit choice wins; ``"auto"`` takes the cluster's declaration (``ATSS_TRIAL_DEVICE``, set
    by the cluster configs), else the GPUs of the Ray cluster this process is connected to, else
    this machine's GPUs (what a local cluster started here will have, :func:`local_gpu_count`).
    """
    ray = sys.modules.get("ray")  # not connected unless Ray was imported and initialised already
    if device != "auto" or (ray is not None and ray.is_initialized()):
        return resolve_device(device)
    return resolve_device(device, {"GPU": local_gpu_count()})


# ---------------------------------------------------------------------------------------------
# the trials
# ---------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class TrialConfig:
    """One trial, fully resolved: what the dry run prints, Tune carries and the trial trains.

    ``label`` names the configuration (the paper's row name for a table), ``paper`` holds the
    paper's numbers for it (empty when the paper has no such row), ``train`` is the run and
    ``resources`` the Ray Train workers it runs on.
    """

    index: int
    label: str
    paper: Mapping[str, float]
    train: TrainConfig
    resources: TrialResources

    @property
    def name(self) -> str:
        """A short unique name (``t03_k=9_s0``) for directories and run names."""
        return trial_name(self.index, self.label, self.seed)

    @property
    def seed(self) -> int:
        return self.train.seed

    @property
    def detector(self) -> DetectorConfig:
        return self.train.detector

    @property
    def preset(self) -> str:
        return self.train.preset

    @property
    def run_label(self) -> str:
        """The MLflow run name of the trial: its row (and seed)."""
        return self.train.mlflow.tags.get("ablation.run_label", self.label) if self.train.mlflow else self.label

    def to_dict(self) -> dict[str, Any]:
        """JSON-native (``name`` and the resources' derived totals are for people; ``from_dict`` skips them)."""
        return {"index": self.index, "name": self.name, "label": self.label, "paper": dict(self.paper),
                "train": self.train.to_dict(), "resources": self.resources.to_dict()}

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> "TrialConfig":
        fields = {f.name for f in dataclasses.fields(TrialResources)}
        return cls(index=int(d["index"]), label=d["label"], paper=dict(d.get("paper", {})),
                   train=TrainConfig.from_dict(d["train"]),
                   resources=TrialResources(**{k: v for k, v in d["resources"].items() if k in fields}))


def trial_name(index: int, label: str, seed: int) -> str:
    slug = re.sub(r"[^A-Za-z0-9=.-]+", "_", label).strip("_.=-")[:48]
    return f"t{index:02d}_{slug}_s{seed}"


@dataclass(frozen=True)
class SweepPlan:
    """What a sweep will run: its trials (in order), how (``config``, ``device``) and how to present them.

    ``table`` is the paper table's name (``"custom"`` for a user space); ``varied`` the
    ``DetectorConfig`` fields whose value differs between the trials; ``axis`` the single swept
    field, when there is one (the plot's x axis).
    """

    table: str
    title: str
    trials: tuple[TrialConfig, ...]
    varied: tuple[str, ...]
    config: SweepConfig
    device: str
    split: str = "minival"
    notes: str = ""
    axis: Optional[str] = None

    @property
    def name(self) -> str:
        return self.config.name

    @property
    def labels(self) -> list[str]:
        return unique([t.label for t in self.trials])

    @property
    def seeds(self) -> list[int]:
        return unique([t.seed for t in self.trials])

    def with_parent_run(self, parent_run_id: str) -> "SweepPlan":
        """The same plan with every trial's MLflow run under the sweep's parent run."""
        trials = tuple(dataclasses.replace(t, train=t.train.replace(
            mlflow=t.train.mlflow.replace(parent_run_id=parent_run_id))) for t in self.trials)
        return dataclasses.replace(self, trials=trials)

    def to_dict(self) -> dict[str, Any]:
        return {"table": self.table, "title": self.title, "varied": list(self.varied), "split": self.split,
                "notes": self.notes, "axis": self.axis, "device": self.device, "config": self.config.to_dict(),
                "trials": [t.to_dict() for t in self.trials]}

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> "SweepPlan":
        return cls(table=d["table"], title=d["title"], trials=tuple(TrialConfig.from_dict(t) for t in d["trials"]),
                   varied=tuple(d["varied"]), config=SweepConfig.from_dict(d["config"]), device=d["device"],
                   split=d.get("split", "minival"), notes=d.get("notes", ""), axis=d.get("axis"))


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
    return "tiny" if is_tiny(preset) else "r50"


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
# planning
# ---------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class _Configuration:
    """One configuration before seeds: a label, a preset and its overrides, the paper's numbers."""

    label: str
    preset: str
    overrides: Mapping[str, Any]
    paper: Mapping[str, float]


def plan_table(name: str, preset: str = "tiny", values: str | Sequence[Any] | None = None,
               rows: str | Sequence[str | int] | None = None, seeds: Sequence[int] = (0,),
               overrides: Mapping[str, Any] | None = None, config: SweepConfig | None = None) -> SweepPlan:
    """The trials of paper table ``name`` on the size family of ``preset``, run as ``config`` says.

    ``values`` (single-axis tables only) replaces the paper's values of the swept field
    (``"5,9,13"``, ``"3..19:2"`` or a list); values the paper has keep the paper's numbers.
    ``rows`` keeps only some rows (labels or 1-based positions, or a comma string of them).
    ``overrides`` are extra fields set on every trial before the row's own.
    """
    table = get_table(name)
    size = preset_size(preset)
    extra = {resolve_field(k): coerce_value(resolve_field(k), v) for k, v in (overrides or {}).items()}
    if values is not None and rows is not None:
        raise ValueError("give either values or rows, not both")
    if values is not None:
        selected = _axis_rows(table, values)
    elif rows is not None:
        selected = _select_rows(table, rows)
    else:
        selected = list(table.rows)
    clash = sorted(set(extra) & {f for row in selected for f in row.overrides})
    if clash:  # the row's own value would win: refuse instead of dropping the override
        raise ValueError(f"cannot fix {', '.join(f'{k}={extra[k]!r}' for k in clash)} on table {table.name!r}: "
                         f"its rows set {clash} themselves; sweep other values with --values, or use --space")
    configurations = [_Configuration(row.label, family_preset(row.family, size), {**extra, **row.overrides},
                                     dict(row.paper)) for row in selected]
    axis = table.axis.field if table.axis else None
    return _plan(table.name, f"Table {table.number}: {table.title}", configurations, seeds, config, preset,
                 default_varied=(axis,) if axis else (), split=table.split, notes=table.notes, axis=axis)


def _axis_rows(table: AblationTable, values: str | Sequence[Any]) -> list[AblationRow]:
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
            m = RANGE.match(token) if axis.ranges else None
            try:
                parsed.extend(range_values(axis.field, *m.groups()) if m else [axis.parse(token)])
            except ValueError as e:
                raise ValueError(f"bad value {token!r} for {axis.field!r} of table {table.name!r}: {e}") from None
    else:
        parsed = list(values)
    parsed = unique([coerce_value(axis.field, v) for v in parsed])
    if not parsed:
        raise ValueError(f"no values given for {axis.field!r}")
    by_value = {r.value: r for r in table.rows}
    return [by_value.get(v) or AblationRow(axis.display(v), table.rows[0].family, {axis.field: v}, {}, value=v)
            for v in parsed]


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
               num_samples: int | None = None, sample_seed: int = 0, config: SweepConfig | None = None) -> SweepPlan:
    """The trials of a user search space on top of ``preset`` (sampled values drawn with
    ``sample_seed``, so a dry run shows exactly what will run)."""
    if not isinstance(space, SearchSpace):
        space = parse_space(space, num_samples)
    preset_size(preset)  # validates the name
    base = {"r50": "atss_r50", "tiny": "tiny"}.get(preset, preset)
    configurations, seen = [], {}
    for overrides in space.configurations(sample_seed):
        label = ", ".join(f"{k}={display_value(k, overrides[k])}" for k in space.varied)
        seen[label] = seen.get(label, 0) + 1
        if seen[label] > 1:  # sampling drew the same configuration again: keep it, name it apart
            label = f"{label} (draw {seen[label]})"
        configurations.append(_Configuration(label, base, overrides, _paper_for(space.varied, overrides)))
    axis = space.varied[0] if len(space.varied) == 1 else None
    return _plan("custom", f"Custom sweep over {', '.join(space.varied)} ({base})", configurations, seeds,
                 config, preset, default_varied=space.varied, notes="sampled" if space.sampled else "", axis=axis)


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


def _check_seeds(seeds: Sequence[int]) -> list[int]:
    seeds = list(seeds)
    if not seeds:
        raise ValueError("give at least one seed")
    if any(isinstance(s, bool) or not isinstance(s, int) or s < 0 for s in seeds):
        raise ValueError(f"seeds must be non-negative integers, got {seeds}")
    if len(set(seeds)) != len(seeds):
        raise ValueError(f"seeds repeat: {seeds}")
    return seeds


def _plan(table: str, title: str, configurations: Sequence[_Configuration], seeds: Sequence[int],
          config: SweepConfig | None, preset: str, default_varied: Sequence[str], split: str = "minival",
          notes: str = "", axis: Optional[str] = None) -> SweepPlan:
    """Build and check every trial (the one place a trial's TrainConfig and resources are made)."""
    seeds = _check_seeds(seeds)
    config = (config or SweepConfig()).resolve_paths()
    if config.name is None:
        config = config.replace(name=f"ablation-{table}-{preset}-{datetime.datetime.now():%Y%m%d-%H%M%S}")
    device = trial_device(config.device)
    detectors = [_detector(c) for c in configurations]
    varied = _varied_fields(detectors) or tuple(default_varied)
    trials = []
    for configuration, detector in zip(configurations, detectors):
        for seed in seeds:
            trials.append(_trial(len(trials), configuration, detector, seed, config, device, table, varied,
                                 multi_seed=len(seeds) > 1))
    return SweepPlan(table, title, tuple(trials), varied, config, device, split, notes, axis)


def _detector(c: _Configuration) -> DetectorConfig:
    try:
        return get_preset(c.preset, **c.overrides)
    except ValueError as e:
        raise ValueError(f"configuration {c.label!r} ({c.preset} + {dict(c.overrides)}) is impossible: {e}") from None


def _varied_fields(configs: Sequence[DetectorConfig]) -> tuple[str, ...]:
    if len(configs) < 2:
        return ()
    dicts = [c.to_dict() for c in configs]
    return tuple(k for k in dicts[0] if any(d[k] != dicts[0][k] for d in dicts[1:]))


def trial_resources(detector: DetectorConfig, config: SweepConfig, device: str) -> TrialResources:
    """The resources of one trial: the backbone's GPU plan, or a CPU plan; the sweep's overrides applied."""
    dcn = bool(detector.dcn_stages) or detector.dcn_in_tower
    if device == "gpu":
        overrides = {k: v for k, v in (("num_workers", config.workers_per_trial),
                                       ("cpus_per_worker", config.cpus_per_worker),
                                       ("batch_per_worker", config.batch_per_worker)) if v is not None}
        # A rehearsal cluster scales its nodes' CPUs; the trial keeps its share (1 elsewhere).
        return plan_for(detector.backbone, dcn, **overrides).scale_cpus(declared_cpu_scale())
    return cpu_plan(detector.backbone, dcn, num_workers=config.workers_per_trial or 1,
                    cpus_per_worker=config.cpus_per_worker or 1, batch_per_worker=config.batch_per_worker or 2)


def _trial(index: int, c: _Configuration, detector: DetectorConfig, seed: int, config: SweepConfig, device: str,
           table: str, varied: Sequence[str], multi_seed: bool) -> TrialConfig:
    name = trial_name(index, c.label, seed)
    try:
        resources = trial_resources(detector, config, device)
    except ValueError as e:
        raise ValueError(f"trial {name} ({c.label}): resources: {e}") from None
    tags = {"ablation.table": table, "ablation.row": c.label, "ablation.varied": ",".join(varied),
            "ablation.sweep": config.name, "ablation.seed": str(seed), "ablation.trial": name,
            "ablation.run_label": f"{c.label} [seed {seed}]" if multi_seed else c.label}
    try:
        train = build_train_config(
            preset=c.preset, detector=detector, data=config.data, batch_size=resources.global_batch,
            schedule=config.schedule, iterations=config.iterations, seed=seed, amp=config.amp, eval_at_end=True,
            storage_path=f"{config.storage_path.rstrip('/')}/{config.name}/trials", run_name=name,
            mlflow_uri=config.mlflow_uri, mlflow_experiment=config.experiment, mlflow_tags=tags,
            log_model=config.log_model, report_period=0, **config.train)
        train = train.replace(**{k: v for k, v in _periods(train.max_iter, config).items() if k not in config.train})
        if "report_period" not in config.train:
            # every log period to Tune too: its table shows the trials' iteration, loss, images/s and ETA
            train = train.replace(report_period=train.log_period)
    except ValueError as e:
        raise ValueError(f"trial {name} ({c.label}): training config: {e}") from None
    return TrialConfig(index, c.label, dict(c.paper), train, resources)


def _periods(max_iter: int, config: SweepConfig) -> dict[str, int]:
    """The sweep's default periods for a run of ``max_iter`` iterations."""
    # ASHA compares trials at evaluations: four rungs' worth by default.
    eval_period = config.eval_period or (max(1, max_iter // 4) if config.asha else 0)
    if eval_period > max_iter:
        raise ValueError(f"eval_period {eval_period} is longer than the run ({max_iter} iterations)")
    # Reports happen at evaluations (with AP, what ASHA compares) and at checkpoints. Short runs
    # checkpoint at their evaluations, so an interrupted trial resumes from its latest one; long
    # runs also every 2500 iterations.
    return {"eval_period": eval_period, "log_period": max(1, min(50, max_iter // 5)),
            "checkpoint_period": min(2500, eval_period or 2500)}


# ---------------------------------------------------------------------------------------------
# the dry run
# ---------------------------------------------------------------------------------------------
def describe(plan: SweepPlan) -> str:
    """Human-readable dry run: one block per trial (the detector's settings that differ from its
    preset, the classes, the schedule and the resources)."""
    cfg = plan.config
    lines = [plan.title, f"sweep {plan.name!r}: {len(plan.trials)} trial(s), {plan.device.upper()} plan, "
             f"{cfg.length_text} each, max concurrent trials "
             f"{cfg.max_concurrent_trials or 'auto'}{', ASHA on AP' if cfg.asha else ''}",
             f"varied: {', '.join(plan.varied) or '-'}; storage {cfg.storage_path}/{plan.name}; "
             f"MLflow {cfg.mlflow_uri} (experiment {cfg.experiment!r})", ""]
    for trial in plan.trials:
        train, res = trial.train, trial.resources
        preset, detector = get_preset(train.preset).to_dict(), train.detector.to_dict()
        shown = [*plan.varied, *(k for k in detector if detector[k] != preset[k] and k not in plan.varied)]
        over = ", ".join(f"{k}={display_value(k, getattr(train.detector, k))}" for k in shown
                         if k != "num_classes") or "-"
        paper = f"paper AP {trial.paper['AP']:.1f}" if "AP" in trial.paper else "no paper row"
        per = ", ".join(f"{k} {v:g}" for k, v in res.resources_per_worker().items())
        node = f" on a {res.node_class} node" if res.node_class else ""
        s = train.schedule
        lines.append(f"[{trial.index}] {trial.name}: {trial.label} (seed {trial.seed}; {paper})")
        lines.append(f"    detector: {train.preset} + {over}; {train.detector.num_classes} classes")
        lines.append(f"    training: {s.max_iter} iterations, batch {train.batch_size}, LR {s.base_lr:g}"
                     f"{', bf16 autocast' if train.amp else ''}")
        lines.append(f"    resources: {res.num_workers} worker(s) x ({per}){node}, batch {res.global_batch} "
                     f"({res.batch_per_worker}/worker)")
    return "\n".join(lines)
