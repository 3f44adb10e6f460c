"""`TrainConfig`: one training run, typed and fully resolved; :func:`build_train_config` makes it.

:func:`build_train_config` is the one place where user settings (a preset name and detector
overrides, data fields, a schedule name or length, the LR at the reference batch, paths, tracking)
become a :class:`TrainConfig`. It reads the training data's categories once, so the detector it
holds has the ``num_classes`` that trains, resolves the schedule (linear scaling applied) and makes
the storage path and MLflow store absolute (Ray workers run in another directory). Everything
downstream (the plan of a sweep, Tune's ``param_space``, the Ray Train workers, the checkpoint's
record, MLflow params) carries this object; dicts appear only at those boundaries
(:meth:`TrainConfig.to_dict` / :meth:`TrainConfig.from_dict`, an exact round trip, also through JSON).
"""
from __future__ import annotations

import dataclasses
import datetime
import functools
import hashlib
import inspect
import json
import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar, Mapping, Optional

from detector.config import PRESETS, DetectorConfig, get_preset
from detector.fields import FieldError, Rule, check_fields, check_value
from pipeline.data import CategoryMap, DataConfig, read_index
from pipeline.data.sources import resolve_split, synthetic_spec
from pipeline.evaluation import BACKENDS
from pipeline.schedule import REFERENCE_BATCH_SIZE, Schedule, resolve_schedule
from pipeline.tracking import DEFAULT_EXPERIMENT, TrackingConfig

__all__ = ["TrainConfig", "build_train_config", "is_tiny", "read_categories", "AMP_MODES", "SETTINGS",
           "check_settings"]

AMP_MODES = (None, "bf16")  # None: fp32 (the paper's and the official code's precision)
_RUN_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.=-]*")


def is_tiny(preset: str) -> bool:
    """The CPU-sized presets (``tiny``, ``*_tiny``): their data defaults are ``DataConfig.tiny()``."""
    return preset == "tiny" or preset.endswith("_tiny")


@dataclass(frozen=True)
class TrainConfig:
    """One training run as it will run (built by :func:`build_train_config`; validated by :meth:`validate`).

    Model and data
        detector: the ``DetectorConfig`` that trains (``num_classes`` = the training data's categories);
        data: the ``DataConfig``; preset: the preset the detector started from (a record only).
    Optimisation (``pipeline.schedule``)
        schedule: the resolved :class:`~pipeline.schedule.Schedule` (iterations, LR steps, warm-up, the LR
            after linear scaling); batch_size: global images per iteration (split evenly over workers);
        momentum, weight_decay, bias_lr_factor, bias_weight_decay; max_grad_norm (None: no clipping,
            as the paper; non-finite norms always stop the run).
        amp: None trains in fp32 (default, as the paper); ``"bf16"`` trains under bf16 autocast.
            Evaluation always runs in fp32.
        seed; torch_threads: intra-op threads per worker (None: torch's default).
    Periods (iterations; 0 disables)
        log_period, checkpoint_period (+ checkpoints_to_keep), eval_period (+ eval_at_end,
        eval_batch_size, eval_backend), report_period (extra reports for Tune schedulers).
    Where things go
        storage_path (absolute path or URI) / run_name: the run directory; a run name that has
        checkpoints resumes. mlflow: where the run is tracked (None: no MLflow); log_model,
        register_model: the final model through ``mlflow.pytorch``.
    Testing
        fail_at_iteration: the last rank raises once at this iteration (fault-tolerance tests).
    """

    detector: DetectorConfig
    data: DataConfig
    schedule: Schedule
    batch_size: int
    storage_path: str
    run_name: str
    preset: str = "tiny"
    momentum: float = 0.9
    weight_decay: float = 1e-4
    bias_lr_factor: float = 2.0
    bias_weight_decay: float = 0.0
    max_grad_norm: Optional[float] = None
    amp: Optional[str] = None
    seed: int = 0
    torch_threads: Optional[int] = None
    log_period: int = 20
    checkpoint_period: int = 2500
    checkpoints_to_keep: int = 2
    eval_period: int = 0
    eval_at_end: bool = True
    eval_batch_size: int = 2
    eval_backend: Optional[str] = None
    report_period: int = 0
    mlflow: Optional[TrackingConfig] = None
    log_model: bool = True
    register_model: Optional[str] = None
    fail_at_iteration: Optional[int] = None

    # What each field allows beyond its annotated type (detector.fields checks both; nested configs
    # are checked by their own classes).
    RULES: ClassVar[Mapping[str, Rule]] = {
        "batch_size": Rule(ge=1),
        "preset": Rule(choices=tuple(PRESETS)),
        "momentum": Rule(ge=0, lt=1),
        "weight_decay": Rule(ge=0),
        "bias_lr_factor": Rule(ge=0),
        "bias_weight_decay": Rule(ge=0),
        "max_grad_norm": Rule(gt=0),
        "amp": Rule(choices=AMP_MODES),
        "seed": Rule(ge=0),
        "torch_threads": Rule(ge=1),
        "log_period": Rule(ge=0),
        "checkpoint_period": Rule(ge=0),
        "checkpoints_to_keep": Rule(ge=1),
        "eval_period": Rule(ge=0),
        "eval_batch_size": Rule(ge=1),
        "eval_backend": Rule(choices=(None, *BACKENDS)),
        "report_period": Rule(ge=0),
        "fail_at_iteration": Rule(ge=0),
    }

    def __post_init__(self) -> None:
        self.validate()

    def validate(self) -> None:
        """Every field check, in one place; raises ``ValueError`` naming the field, value and what is allowed."""
        check_fields(self)
        if self.schedule.batch_size != self.batch_size:
            raise ValueError(f"TrainConfig.schedule was resolved for batch {self.schedule.batch_size}, "
                             f"but batch_size is {self.batch_size}; build it with build_train_config")
        if not ("://" in self.storage_path or os.path.isabs(self.storage_path)):
            raise ValueError(f"TrainConfig.storage_path must be an absolute path or a URI, got {self.storage_path!r}")
        if not _RUN_NAME.fullmatch(self.run_name):
            raise ValueError(f"TrainConfig.run_name {self.run_name!r}: use letters, digits and _ . = - "
                             "(it becomes a directory name)")

    # -- derived values ----------------------------------------------------------------------------
    @property
    def max_iter(self) -> int:
        return self.schedule.max_iter

    @property
    def run_uri(self) -> str:
        """The run directory: ``<storage_path>/<run_name>``."""
        return f"{self.storage_path.rstrip('/')}/{self.run_name}"

    @property
    def evaluates(self) -> bool:
        return self.eval_at_end or self.eval_period > 0

    def replace(self, **changes: Any) -> "TrainConfig":
        """A validated copy with ``changes``; a new ``batch_size`` or schedule needs :func:`build_train_config`."""
        return dataclasses.replace(self, **changes)

    def fingerprint(self) -> str:
        """Hash of what determines the numbers (not where they are written), for the NaN guard."""
        d = self.to_dict()
        for k in ("storage_path", "run_name", "mlflow", "log_model", "register_model", "log_period",
                  "fail_at_iteration"):
            d.pop(k)
        return hashlib.sha1(json.dumps(d, sort_keys=True, default=str).encode()).hexdigest()[:12]

    # -- the Ray / MLflow / json boundary ----------------------------------------------------------
    def to_dict(self) -> dict[str, Any]:
        """JSON-native dict (nested dicts for detector, data, schedule and mlflow; tuples as lists)."""
        out: dict[str, Any] = {}
        for f in dataclasses.fields(self):
            v = getattr(self, f.name)
            out[f.name] = v.to_dict() if hasattr(v, "to_dict") else v
        out["detector"] = {k: list(v) if isinstance(v, tuple) else v for k, v in out["detector"].items()}
        return out

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> "TrainConfig":
        """Inverse of :meth:`to_dict` (``from_dict(to_dict()) == self``); unknown keys raise ``ValueError``."""
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(d) - known)
        if unknown:
            raise ValueError(f"TrainConfig: unknown key(s) {unknown}; known keys: {sorted(known)}")
        missing = sorted(k for k in ("detector", "data", "schedule", "batch_size", "storage_path", "run_name")
                         if k not in d)
        if missing:
            raise ValueError(f"TrainConfig: missing key(s) {missing} (a TrainConfig.to_dict() holds them; "
                             "user settings go through build_train_config)")
        values = dict(d)
        values["detector"] = DetectorConfig.from_dict(dict(d["detector"]))
        values["data"] = DataConfig.from_dict(dict(d["data"]))
        values["schedule"] = Schedule.from_dict(dict(d["schedule"]))
        if values.get("mlflow") is not None:
            values["mlflow"] = TrackingConfig.from_dict(values["mlflow"])
        return cls(**values)


# ----------------------------------------------------------------------------------------------
# the training data's categories
# ----------------------------------------------------------------------------------------------
def read_categories(data: DataConfig, split: str = "train") -> CategoryMap:
    """The categories of ``split`` without loading its annotations.

    Synthetic data: from its spec (nothing is generated). A Parquet/Arrow index: its stored
    categories. A COCO json: the ``categories`` block (read from the end of the file, where COCO
    writes it; the whole file is parsed only when it is elsewhere)."""
    if data.source == "synthetic":  # explicit files are refused with a synthetic source
        return CategoryMap.from_coco(synthetic_spec(data).categories())
    ann, _ = resolve_split(data, split)
    if "://" not in ann and not Path(ann).is_file():
        raise FileNotFoundError(f"{split} annotation file not found: {ann} (data source {data.source!r})")
    stat = os.stat(ann) if "://" not in ann else None
    return _categories_of_file(ann, stat.st_size if stat else 0, stat.st_mtime_ns if stat else 0)


@functools.lru_cache(maxsize=16)
def _categories_of_file(path: str, size: int, mtime_ns: int) -> CategoryMap:
    if path.endswith((".parquet", ".arrow")):
        return read_index(path).category_map
    categories = _tail_categories(path)
    if categories is None:
        with open(path, "rb") as f:
            try:
                whole = json.load(f)
            except (json.JSONDecodeError, UnicodeDecodeError) as e:
                raise ValueError(f"annotation file {path} is not valid JSON: {e}") from None
        if not isinstance(whole, dict) or not isinstance(whole.get("categories"), list):
            raise ValueError(f"{path} is not a COCO annotation file: no top-level 'categories' list")
        categories = whole["categories"]
    try:
        return CategoryMap.from_coco(categories)
    except (KeyError, TypeError, ValueError) as e:
        raise ValueError(f"{path}: bad 'categories' block ({e})") from None


def _tail_categories(path: str, tail: int = 1 << 20) -> Optional[list]:
    """The ``categories`` list when it is the last member of the top-level object (COCO's layout), else None."""
    with open(path, "rb") as f:
        f.seek(0, os.SEEK_END)
        f.seek(max(0, f.tell() - tail))
        text = f.read().decode("utf-8", errors="replace")
    key = text.rfind('"categories"')
    if key < 0:
        return None
    colon = re.compile(r"\s*:\s*").match(text, key + len('"categories"'))
    if colon is None:
        return None
    try:
        value, end = json.JSONDecoder().raw_decode(text, colon.end())
    except json.JSONDecodeError:
        return None
    # Only whitespace and one closing brace may follow: then the value belongs to the outermost object.
    if text[end:].strip() != "}" or not isinstance(value, list) or not all(isinstance(c, dict) for c in value):
        return None
    return value


# ----------------------------------------------------------------------------------------------
# user settings -> TrainConfig
# ----------------------------------------------------------------------------------------------
def _data_config(preset: str, data: DataConfig | Mapping[str, Any] | None) -> DataConfig:
    if isinstance(data, DataConfig):
        return data
    base = DataConfig.tiny() if is_tiny(preset) else DataConfig()
    data = dict(data or {})
    names = {f.name for f in dataclasses.fields(DataConfig)}
    unknown = sorted(set(data) - names)
    if unknown:
        raise ValueError(f"TrainConfig.data: unknown key(s) {unknown}; known keys: {sorted(names)}")
    try:
        return base.replace(**data)
    except FieldError as e:
        raise e.within("TrainConfig.data") from None
    except (TypeError, ValueError) as e:
        raise ValueError(f"TrainConfig.data: {e}") from None


def _detector_config(preset: str, detector: DetectorConfig | Mapping[str, Any] | None,
                     categories: CategoryMap) -> DetectorConfig:
    n = categories.num_classes
    if isinstance(detector, DetectorConfig):
        return detector.replace(num_classes=n)
    overrides = dict(detector or {})
    given = overrides.get("num_classes")
    if given is not None and check_value(DetectorConfig, "num_classes", given) != n:
        raise ValueError(f"detector num_classes={given} but the training data has {n} categories; "
                         "drop the override or use matching data")
    try:
        return get_preset(preset, **{**overrides, "num_classes": n})
    except FieldError as e:
        raise e.within("TrainConfig.detector") from None
    except (TypeError, ValueError) as e:
        raise ValueError(f"TrainConfig.detector: {e}") from None


def _absolute_storage(path: Optional[str], cwd: Path) -> str:
    if not path:
        return str(cwd / "ray_results")
    if "://" in path:
        return path
    return str((cwd / Path(path).expanduser()).resolve())


def build_train_config(
    *,
    preset: str = "tiny",
    detector: DetectorConfig | Mapping[str, Any] | None = None,
    data: DataConfig | Mapping[str, Any] | None = None,
    batch_size: int = 16,
    schedule: Optional[str] = "1x",
    iterations: Optional[int] = None,
    lr_steps: Optional[list[int] | tuple[int, ...]] = None,
    base_lr: float = 0.01,
    reference_batch_size: int = REFERENCE_BATCH_SIZE,
    scale_lr: bool = True,
    warmup_iters: Optional[int] = None,
    warmup_factor: float = 1.0 / 3.0,
    gamma: float = 0.1,
    momentum: float = 0.9,
    weight_decay: float = 1e-4,
    bias_lr_factor: float = 2.0,
    bias_weight_decay: float = 0.0,
    max_grad_norm: Optional[float] = None,
    amp: Optional[str] = None,
    seed: int = 0,
    torch_threads: Optional[int] = None,
    log_period: int = 20,
    checkpoint_period: int = 2500,
    checkpoints_to_keep: int = 2,
    eval_period: int = 0,
    eval_at_end: bool = True,
    eval_batch_size: int = 2,
    eval_backend: Optional[str] = None,
    report_period: int = 0,
    storage_path: Optional[str] = None,
    run_name: Optional[str] = None,
    mlflow_enabled: bool = True,
    mlflow_uri: Optional[str] = None,
    mlflow_experiment: str = DEFAULT_EXPERIMENT,
    mlflow_parent_run_id: Optional[str] = None,
    mlflow_tags: Optional[Mapping[str, Any]] = None,
    mlflow_run_id: Optional[str] = None,
    log_model: bool = True,
    register_model: Optional[str] = None,
    fail_at_iteration: Optional[int] = None,
    cwd: Optional[str | os.PathLike] = None,
) -> TrainConfig:
    """The :class:`TrainConfig` of these settings. Defaults are the paper's (batch 16, LR 0.01 at 16, 1x).

    * ``preset`` + ``detector`` (field overrides, or a whole ``DetectorConfig``): the detector;
      ``num_classes`` comes from the training data's categories (:func:`read_categories`).
    * ``data``: ``DataConfig`` fields on top of ``DataConfig.tiny()`` for tiny presets, else the
      paper's ``DataConfig()`` (or a ``DataConfig``).
    * ``schedule`` ``"1x"``/``"2x"`` or ``iterations`` (+ ``lr_steps``), ``base_lr`` at
      ``reference_batch_size``, ``scale_lr``, warm-up and ``gamma``: resolved by
      :func:`pipeline.schedule.resolve_schedule` (the linear scaling rule for other batch sizes).
    * ``amp``: None (fp32) or ``"bf16"``.
    * ``storage_path`` (default ``<cwd>/ray_results``) made absolute; ``run_name`` default
      ``atss_<preset>_<time>``; MLflow (``mlflow_enabled=False``: none) with ``mlflow_uri`` made
      absolute (default ``MLFLOW_TRACKING_URI`` or ``sqlite:///<cwd>/mlflow.db``).

    Raises ``ValueError`` (or ``FileNotFoundError`` for missing training annotations) naming the setting.
    """
    if preset not in PRESETS:
        raise ValueError(f"TrainConfig.preset: unknown detector preset {preset!r}; choose one of {sorted(PRESETS)}")
    base = Path(cwd or os.getcwd()).resolve()
    data_cfg = _data_config(preset, data)
    det_cfg = _detector_config(preset, detector, read_categories(data_cfg, "train"))
    resolved = resolve_schedule(batch_size, schedule, iterations, lr_steps, base_lr, reference_batch_size,
                                warmup_iters, warmup_factor, gamma, scale_lr)
    mlflow = (TrackingConfig.resolve(mlflow_uri, mlflow_experiment, mlflow_parent_run_id, mlflow_run_id,
                                     mlflow_tags, cwd=base) if mlflow_enabled else None)
    return TrainConfig(
        detector=det_cfg, data=data_cfg, schedule=resolved, batch_size=batch_size,
        storage_path=_absolute_storage(storage_path, base),
        run_name=run_name or f"atss_{preset}_{datetime.datetime.now():%Y%m%d-%H%M%S}", preset=preset,
        momentum=momentum, weight_decay=weight_decay, bias_lr_factor=bias_lr_factor,
        bias_weight_decay=bias_weight_decay, max_grad_norm=max_grad_norm, amp=amp, seed=seed,
        torch_threads=torch_threads, log_period=log_period, checkpoint_period=checkpoint_period,
        checkpoints_to_keep=checkpoints_to_keep, eval_period=eval_period, eval_at_end=eval_at_end,
        eval_batch_size=eval_batch_size, eval_backend=eval_backend, report_period=report_period,
        mlflow=mlflow, log_model=log_model, register_model=register_model, fail_at_iteration=fail_at_iteration)


# The names build_train_config takes (a --config file's keys).
SETTINGS = tuple(n for n in inspect.signature(build_train_config).parameters if n != "cwd")


def check_settings(settings: Mapping[str, Any], source: str = "settings") -> None:
    """``ValueError`` naming the keys of ``settings`` that :func:`build_train_config` does not take."""
    unknown = sorted(set(settings) - set(SETTINGS))
    if unknown:
        raise ValueError(f"{source}: unknown key(s) {unknown}; known keys: {sorted(SETTINGS)}")
