"""MLflow helpers shared by training, evaluation and sweeps.

* :func:`default_tracking_uri`: ``MLFLOW_TRACKING_URI`` if set, else a SQLite store in the working
  directory, as an **absolute** URI: Ray Train workers run in another cwd (RAY_NOTES section 1), so
  the driver resolves it and passes it on.
* :class:`TrackingConfig`: where a run is tracked (absolute store URI, experiment, parent, tags, run id).
* :func:`run_lifecycle`: THE run lifecycle (training, sweeps, jobs): start or attach to a run, and
  never leave it RUNNING: FINISHED on success, FAILED with the error as tag ``error`` and an
  ``error.txt`` artifact, KILLED on Ctrl-C/SIGTERM (:class:`TrackedRun` ends it from outside too).
* :func:`flatten_config`, :func:`log_params`, :func:`log_metrics`: MLflow-sized params/metrics.
* :func:`plot_loss_curves`, :func:`plot_per_category_ap`: PNGs (matplotlib Agg).
"""
from __future__ import annotations

import contextlib
import dataclasses
import math
import os
import traceback
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Optional

DEFAULT_EXPERIMENT = "atss"
# MLflow's own marker of a model-training experiment (as opposed to "genai_development"). The 3.17
# UI opens on the runs table only with ``workflowType=machine_learning`` (:func:`runs_table_url`).
EXPERIMENT_KIND_TAG = "mlflow.experimentKind"
MODEL_TRAINING = "custom_model_development"
DEFAULT_UI = "http://127.0.0.1:5000"  # where `mlflow ui` serves by default
MAX_PARAM_LENGTH = 6000  # MLflow's limit on a param value
_PARAMS_PER_BATCH = 100  # MLflow's limit on params in one log_batch
_METRICS_PER_BATCH = 1000


# ----------------------------------------------------------------------------------------------
# where runs go
# ----------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class TrackingConfig:
    """Where one run is tracked: an absolute store ``uri`` (see :meth:`resolve`), the experiment, and
    optionally the parent run (sweeps), extra ``tags`` and an existing ``run_id`` to log into."""

    uri: str
    experiment: str = DEFAULT_EXPERIMENT
    parent_run_id: Optional[str] = None
    run_id: Optional[str] = None
    tags: Mapping[str, str] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if not isinstance(self.uri, str) or not self.uri:
            raise ValueError(f"TrackingConfig.uri must be a non-empty URI, got {self.uri!r}")
        if not isinstance(self.experiment, str) or not self.experiment:
            raise ValueError(f"TrackingConfig.experiment must be a non-empty name, got {self.experiment!r}")
        if not isinstance(self.tags, Mapping):
            raise ValueError(f"TrackingConfig.tags must be a mapping, got {type(self.tags).__name__}")
        object.__setattr__(self, "tags", {str(k): str(v) for k, v in self.tags.items()})

    @classmethod
    def resolve(cls, uri: Optional[str] = None, experiment: str = DEFAULT_EXPERIMENT,
                parent_run_id: Optional[str] = None, run_id: Optional[str] = None,
                tags: Optional[Mapping[str, Any]] = None,
                cwd: str | os.PathLike | None = None) -> "TrackingConfig":
        """``uri`` made absolute against ``cwd`` (None: :func:`default_tracking_uri`)."""
        uri = absolute_tracking_uri(uri, cwd) if uri else default_tracking_uri(cwd)
        return cls(uri, experiment, parent_run_id, run_id, dict(tags or {}))

    def replace(self, **changes: Any) -> "TrackingConfig":
        return dataclasses.replace(self, **changes)

    def to_dict(self) -> dict[str, Any]:
        return {"uri": self.uri, "experiment": self.experiment, "parent_run_id": self.parent_run_id,
                "run_id": self.run_id, "tags": dict(self.tags)}

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> "TrackingConfig":
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(d) - known)
        if unknown:
            raise ValueError(f"TrackingConfig: unknown key(s) {unknown}; known keys: {sorted(known)}")
        return cls(**d)


def default_tracking_uri(cwd: str | os.PathLike | None = None) -> str:
    """``MLFLOW_TRACKING_URI`` (made absolute) or ``sqlite:///<abs cwd>/mlflow.db``."""
    env = os.environ.get("MLFLOW_TRACKING_URI")
    if env:
        return absolute_tracking_uri(env, cwd)
    base = Path(cwd or os.getcwd()).resolve()
    return f"sqlite:///{base / 'mlflow.db'}"


def absolute_tracking_uri(uri: str, cwd: str | os.PathLike | None = None) -> str:
    """Make a relative local store absolute against ``cwd`` (sqlite paths, ``file:`` and bare paths);
    server URIs (``http(s)://``, ``databricks``, ...) pass through unchanged."""
    base = Path(cwd or os.getcwd()).resolve()
    if uri.startswith("sqlite:///"):
        path = uri[len("sqlite:///"):]
        if path.startswith("/"):  # sqlite:////abs/path.db
            return uri
        return f"sqlite:///{(base / path).resolve()}"
    if uri.startswith("file:"):
        path = uri[len("file:"):]
        if path.startswith("//"):
            return uri
        return Path(base / path).resolve().as_uri()
    if "://" not in uri and ":" not in uri.split("/")[0]:  # a bare local path means a file store
        return (base / uri).resolve().as_uri()
    return uri


def ui_command(tracking_uri: str) -> str:
    """The command that shows this store in a browser."""
    if tracking_uri.startswith(("http://", "https://")):
        return f"open {tracking_uri}"
    return f"mlflow ui --backend-store-uri {tracking_uri}"


def runs_table_url(tracking_uri: str, experiment_id: str, ui: str = DEFAULT_UI) -> str:
    """The link that opens the experiment on its runs table: the server itself for an ``http(s)``
    store, else ``ui`` (where :func:`ui_command` serves). MLflow 3.17's UI picks its page from the
    browser's "GenAI | Model training" switch, not from the experiment's kind tag; the
    ``workflowType`` query sets that switch (and it sticks in the browser)."""
    base = tracking_uri if tracking_uri.startswith(("http://", "https://")) else ui
    return f"{base.rstrip('/')}/#/experiments/{experiment_id}?workflowType=machine_learning"


def _artifact_location(tracking_uri: str, experiment: str) -> str | None:
    """Artifacts of a local SQLite store sit beside the database, not in the creating process's cwd
    (a Ray worker's cwd is a session temp dir that disappears)."""
    if tracking_uri.startswith("sqlite:///"):
        db = Path(tracking_uri[len("sqlite:///"):])
        safe = "".join(ch if ch.isalnum() or ch in "-_." else "_" for ch in experiment)
        return (db.parent / "mlruns" / safe).as_uri()
    return None


def get_or_create_experiment(experiment: str, tracking_uri: str) -> str:
    """Experiment id by name, created (with a stable artifact location) when missing; marked as a
    model-training experiment (:data:`EXPERIMENT_KIND_TAG`) unless it already has a kind."""
    from mlflow import MlflowClient
    from mlflow.exceptions import MlflowException

    client = MlflowClient(tracking_uri)
    exp = client.get_experiment_by_name(experiment)
    if exp is not None:
        if exp.lifecycle_stage == "deleted":
            raise ValueError(f"MLflow experiment {experiment!r} is deleted in {tracking_uri}; restore it "
                             "or pick another experiment name")
        if EXPERIMENT_KIND_TAG not in exp.tags:  # created before the tag, or by someone else
            client.set_experiment_tag(exp.experiment_id, EXPERIMENT_KIND_TAG, MODEL_TRAINING)
        return exp.experiment_id
    try:
        return client.create_experiment(experiment, artifact_location=_artifact_location(tracking_uri, experiment),
                                        tags={EXPERIMENT_KIND_TAG: MODEL_TRAINING})
    except MlflowException:  # another process created it between the two calls
        exp = client.get_experiment_by_name(experiment)
        if exp is None:
            raise
        return exp.experiment_id


# ----------------------------------------------------------------------------------------------
# run lifecycle
# ----------------------------------------------------------------------------------------------
def create_run(tracking_uri: str, experiment: str = DEFAULT_EXPERIMENT, run_name: str | None = None,
               parent_run_id: str | None = None, tags: Mapping[str, Any] | None = None) -> str:
    """Create a run (status RUNNING) without making it the process's active run; returns its id."""
    from mlflow import MlflowClient

    client = MlflowClient(tracking_uri)
    exp_id = get_or_create_experiment(experiment, tracking_uri)
    all_tags = {str(k): str(v) for k, v in (tags or {}).items()}
    if parent_run_id:
        all_tags["mlflow.parentRunId"] = parent_run_id
    run = client.create_run(exp_id, run_name=run_name, tags=all_tags)
    return run.info.run_id


def _error_text(exc: BaseException) -> str:
    return f"{type(exc).__name__}: {exc}"


def stop_status(error: BaseException) -> str:
    """KILLED for a stop (Ctrl-C; SIGTERM turned into ``SystemExit`` by the jobs), FAILED otherwise."""
    return "KILLED" if isinstance(error, (KeyboardInterrupt, SystemExit)) else "FAILED"


def mark_run_failed(tracking_uri: str, run_id: str, error: BaseException | str,
                    status: str = "FAILED", traceback_text: str | None = None) -> None:
    """Terminate ``run_id`` as FAILED (or KILLED) with the error as tag ``error`` and ``error.txt``."""
    from mlflow import MlflowClient

    client = MlflowClient(tracking_uri)
    text = error if isinstance(error, str) else _error_text(error)
    client.set_tag(run_id, "error", text[:MAX_PARAM_LENGTH])
    if traceback_text:
        with contextlib.suppress(Exception):  # the status matters more than the attachment
            client.log_text(run_id, traceback_text, "error.txt")
    client.set_terminated(run_id, status)


def run_status(tracking_uri: str, run_id: str) -> str:
    from mlflow import MlflowClient

    return MlflowClient(tracking_uri).get_run(run_id).info.status


@dataclass(frozen=True)
class TrackedRun:
    """An MLflow run this process started or attached to (see :func:`run_lifecycle`)."""

    uri: str
    run_id: str

    @property
    def status(self) -> str:
        return run_status(self.uri, self.run_id)

    def finish(self, status: str = "FINISHED") -> None:
        """End the run with ``status`` unless it has already ended (e.g. its workers finished it)."""
        if self.status == "RUNNING":
            from mlflow import MlflowClient

            MlflowClient(self.uri).set_terminated(self.run_id, status)

    def fail(self, error: BaseException | str, status: str = "FAILED", traceback_text: str | None = None) -> None:
        """End the run FAILED (or KILLED) with ``error`` recorded, unless it already ended FINISHED."""
        if self.status != "FINISHED":
            mark_run_failed(self.uri, self.run_id, error, status, traceback_text)


def start_run(config: TrackingConfig, run_name: str | None = None, tags: Mapping[str, Any] | None = None,
              clear_tags: tuple[str, ...] = ()) -> TrackedRun:
    """Attach to ``config.run_id`` or create a run (a child of ``config.parent_run_id``); status RUNNING.

    Attaching revives the run: status RUNNING again, a previous attempt's ``error`` tag (and
    ``clear_tags``) removed. ``config.tags`` and ``tags`` are set in both cases."""
    from mlflow import MlflowClient

    all_tags = {**config.tags, **{str(k): str(v) for k, v in (tags or {}).items()}}
    if config.run_id is None:
        return TrackedRun(config.uri, create_run(config.uri, config.experiment, run_name, config.parent_run_id,
                                                 all_tags))
    client = MlflowClient(config.uri)
    existing = client.get_run(config.run_id)
    for tag in ("error", *clear_tags):
        if tag in existing.data.tags:
            client.delete_tag(config.run_id, tag)
    for k, v in all_tags.items():
        client.set_tag(config.run_id, k, v)
    if existing.info.status != "RUNNING":
        client.update_run(config.run_id, status="RUNNING")
    return TrackedRun(config.uri, config.run_id)


@contextlib.contextmanager
def run_lifecycle(config: TrackingConfig, run_name: str | None = None, *, tags: Mapping[str, Any] | None = None,
                  clear_tags: tuple[str, ...] = (), activate: bool = False,
                  error_of: Callable[[BaseException], BaseException] | None = None) -> Iterator[TrackedRun]:
    """The one MLflow run lifecycle: start or attach (:func:`start_run`), yield, then end the run.

    Leaving normally ends it FINISHED (unless it already ended: a caller may have ended it KILLED
    or FAILED itself). An exception ends it FAILED with ``error_of(exception)`` recorded (e.g. the
    worker's error inside Ray's wrapper), or KILLED on a stop (Ctrl-C, SIGTERM), unless it already
    ended FINISHED; the exception propagates. ``activate`` also makes it the process's active run
    (``mlflow.log_*``, ``mlflow.pytorch.log_model``); inside another active run it is nested.
    """
    import mlflow

    run = start_run(config, run_name, tags, clear_tags)
    if activate:
        mlflow.set_tracking_uri(config.uri)
        outer = mlflow.active_run()
        # A nested call (e.g. inside a Tune trial that has its own run) must not end the outer run.
        mlflow.start_run(run_id=run.run_id, nested=outer is not None and outer.info.run_id != run.run_id)
    try:
        yield run
    except BaseException as e:
        status = stop_status(e)
        with contextlib.suppress(Exception):  # never hide the original error
            run.fail(error_of(e) if error_of else e, status, traceback.format_exc())
        if activate:
            mlflow.end_run(status=run.status if run.status != "RUNNING" else status)
        raise
    else:
        run.finish()
        if activate:
            mlflow.end_run(status=run.status)


# ----------------------------------------------------------------------------------------------
# params and metrics
# ----------------------------------------------------------------------------------------------
def flatten_config(config: Mapping[str, Any], prefix: str = "", sep: str = ".") -> dict[str, str]:
    """Nested dicts -> ``{"a.b.c": "value"}`` with string values MLflow accepts.

    Lists and tuples become their ``repr``; ``None`` becomes ``"None"``; values longer than MLflow's
    limit are cut with a trailing ``...``.
    """
    out: dict[str, str] = {}
    for key, value in config.items():
        name = f"{prefix}{sep}{key}" if prefix else str(key)
        if isinstance(value, Mapping):
            if value:
                out.update(flatten_config(value, name, sep))
            else:
                out[name] = "{}"
            continue
        text = str(list(value)) if isinstance(value, tuple) else str(value)
        if len(text) > MAX_PARAM_LENGTH:
            text = text[: MAX_PARAM_LENGTH - 3] + "..."
        out[name] = text
    return out


def log_params(run_id: str, params: Mapping[str, Any], tracking_uri: str) -> None:
    """Log flattened params in batches (MLflow takes at most 100 per call)."""
    from mlflow import MlflowClient
    from mlflow.entities import Param

    client = MlflowClient(tracking_uri)
    items = [Param(k, str(v)) for k, v in params.items()]
    for i in range(0, len(items), _PARAMS_PER_BATCH):
        client.log_batch(run_id, params=items[i:i + _PARAMS_PER_BATCH])


def log_metrics(run_id: str, metrics: Mapping[str, float], step: int, tracking_uri: str) -> None:
    """One ``log_batch`` for a dict of scalars; non-finite and non-numeric values are skipped."""
    import time

    from mlflow import MlflowClient
    from mlflow.entities import Metric

    now = int(time.time() * 1000)
    items = []
    for k, v in metrics.items():
        if isinstance(v, bool) or not isinstance(v, (int, float)):
            continue
        if math.isfinite(float(v)):
            items.append(Metric(k, float(v), now, int(step)))
    client = MlflowClient(tracking_uri)
    for i in range(0, len(items), _METRICS_PER_BATCH):
        client.log_batch(run_id, metrics=items[i:i + _METRICS_PER_BATCH])


def metric_history(run_id: str, keys, tracking_uri: str) -> dict[str, list[tuple[int, float]]]:
    """``{key: [(step, value), ...]}`` sorted by step (for plots)."""
    from mlflow import MlflowClient

    client = MlflowClient(tracking_uri)
    return {k: sorted((m.step, m.value) for m in client.get_metric_history(run_id, k)) for k in keys}


# ----------------------------------------------------------------------------------------------
# plots
# ----------------------------------------------------------------------------------------------
def _pyplot():
    import matplotlib

    matplotlib.use("Agg")  # no display on cluster nodes
    import matplotlib.pyplot as plt

    return plt


def save_figure(fig, path: str | os.PathLike) -> Path:
    """Lay out, write (parents created) and close a matplotlib figure; returns the path."""
    fig.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path)
    _pyplot().close(fig)
    return path


def plot_loss_curves(history: Mapping[str, list[tuple[int, float]]], path: str | os.PathLike,
                     title: str = "training losses") -> Path:
    """One line per loss (``{name: [(iteration, value)]}``) on a log scale; returns the PNG path."""
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(7, 4), dpi=100)
    drew = False
    for name, points in history.items():
        points = [(s, v) for s, v in points if v > 0 and math.isfinite(v)]
        if points:
            steps, values = zip(*points)
            ax.plot(steps, values, label=name, linewidth=1.2)
            drew = True
    if drew:
        ax.set_yscale("log")
        ax.legend(loc="upper right", fontsize=8)
    else:
        ax.text(0.5, 0.5, "no loss values logged", ha="center", va="center", transform=ax.transAxes)
    ax.set_xlabel("iteration")
    ax.set_ylabel("loss")
    ax.set_title(title)
    ax.grid(True, alpha=0.3)
    return save_figure(fig, path)


def plot_per_category_ap(per_category: Mapping[str, float], path: str | os.PathLike,
                         title: str = "AP per category") -> Path:
    """Horizontal bars, best category on top (COCO's -1 "no ground truth" entries are left out)."""
    plt = _pyplot()
    items = sorted(((n, v) for n, v in per_category.items() if v >= 0), key=lambda kv: kv[1])
    height = max(2.5, 0.18 * len(items) + 1.0)
    fig, ax = plt.subplots(figsize=(7, height), dpi=100)
    if items:
        names, values = zip(*items)
        ax.barh(range(len(items)), values, color="tab:blue")
        ax.set_yticks(range(len(items)))
        ax.set_yticklabels(names, fontsize=7)
        ax.set_xlim(0, max(1e-3, max(values)) * 1.05)
    else:
        ax.text(0.5, 0.5, "no category with ground truth", ha="center", va="center", transform=ax.transAxes)
    ax.set_xlabel("AP (IoU .50:.95)")
    ax.set_title(title)
    ax.grid(True, axis="x", alpha=0.3)
    return save_figure(fig, path)
