"""Run a :class:`pipeline.ablation.SweepPlan` as a Ray Tune sweep over Ray Train trainings.

The Ray Train V2 pattern (RAY_NOTES section 2): every Tune trial is a small function that builds
a ``TorchTrainer`` for its configuration and fits it; the trial's rank-0 ``ray.train.report`` calls
reach Tune through ``TuneReportCallback`` (so Tune sees the validation AP of every evaluation and
ASHA can stop a trial on it). Tune itself only reserves a token of the head node per trial: the
Train workers' CPUs/GPUs are reserved by Ray Train's own placement group, so concurrency is
bounded with ``max_concurrent_trials``.

MLflow: the driver creates one parent run per sweep (tags ``ablation.table``, ``ablation.varied``,
``ablation.sweep``); every trial creates one child run (``parent_run_id``) before its workers start,
and rank 0 of the training logs params, metrics and artifacts into it. The results table (Markdown,
Parquet), the AP plot and the plan go to the parent when the sweep ends.

Layout under ``<storage_path>/<sweep name>/`` (a local path or a URI such as ``s3://bucket/prefix``):
Tune's experiment state, ``ablation/`` (the plan, the sweep settings, the results) and
``trials/<trial>/`` (each trial's Ray Train run with its checkpoints). Running the same sweep name
again restores it with ``Tuner.restore``: finished trials keep their results, unfinished and errored
ones start again and their training resumes from its latest checkpoint.
"""
from __future__ import annotations

import dataclasses
import datetime
import json
import os
import re
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

from . import tracking
from .ablation import METRICS, SweepPlan, TrialSpec, format_table, plot_results, results_frame, summarize_seeds
from .resources import TrialResources, cpu_plan, plan_for, resolve_device

DEFAULT_EXPERIMENT = "atss-ablation"
PLAN_FILE = "plan.json"
STATE_FILE = "sweep.json"
_NAME_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.=-]*")
# Environment Ray Train needs in every trial (RAY_NOTES sections 0 and 6): a 0.2 s health check
# makes each report() cost 0.2 s instead of 2 s; the print patch doubles worker output.
RAY_ENV = {"RAY_TRAIN_HEALTH_CHECK_INTERVAL_S": "0.2", "RAY_TRAIN_ENABLE_PRINT_PATCH": "0"}


@dataclass
class SweepConfig:
    """How to run a plan: where results go, training length, resources, scheduling.

    ``train`` holds extra :class:`pipeline.train.TrainConfig` fields for every trial (``base_lr``,
    ``log_period``, ...); ``data`` the ``DataConfig`` fields. Resources: ``device`` ``"auto"`` asks
    :func:`pipeline.resources.resolve_device`; a GPU plan comes from the backbone
    (:func:`pipeline.resources.plan_for`), a CPU plan from ``workers_per_trial`` x
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
    data: dict = field(default_factory=dict)
    train: dict = field(default_factory=dict)
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

    def __post_init__(self) -> None:
        if self.name is not None and not _NAME_RE.fullmatch(self.name):
            raise ValueError(f"sweep name {self.name!r}: use letters, digits and _ . = - (it names a directory)")
        if self.iterations is not None and self.schedule is not None:
            raise ValueError("give either iterations or a schedule (1x, 2x), not both")
        if self.iterations is None and self.schedule is None:
            self.schedule = "1x"
        if self.iterations is not None and (isinstance(self.iterations, bool) or not isinstance(self.iterations, int)
                                            or self.iterations < 1):
            raise ValueError(f"iterations must be a positive integer, got {self.iterations!r}")
        for name in ("workers_per_trial", "batch_per_worker", "max_concurrent_trials", "asha_grace_period",
                     "eval_period"):
            v = getattr(self, name)
            if v is not None and (isinstance(v, bool) or not isinstance(v, int) or v < 1):
                raise ValueError(f"{name} must be a positive integer, got {v!r}")
        if self.cpus_per_worker is not None and not self.cpus_per_worker > 0:
            raise ValueError(f"cpus_per_worker must be > 0, got {self.cpus_per_worker!r}")
        if self.device not in ("auto", "cpu", "gpu"):
            raise ValueError(f"device must be auto, cpu or gpu, got {self.device!r}")
        if self.asha_reduction_factor < 2:
            raise ValueError(f"asha_reduction_factor must be >= 2, got {self.asha_reduction_factor}")
        if self.max_failures < 0:
            raise ValueError(f"max_failures must be >= 0, got {self.max_failures}")
        if self.eval_period is not None and self.iterations is not None and self.eval_period > self.iterations:
            raise ValueError(f"eval_period {self.eval_period} is longer than the run ({self.iterations} iterations)")
        reserved = {"preset", "detector", "data", "batch_size", "iterations", "schedule", "seed", "storage_path",
                    "run_name", "mlflow_uri", "mlflow_experiment", "mlflow_parent_run_id", "mlflow_tags",
                    "mlflow_run_id"}
        clash = sorted(set(self.train) & reserved)
        if clash:
            raise ValueError(f"train settings {clash} are set by the sweep itself (per trial); use the "
                             "sweep's own options instead")

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "SweepConfig":
        known = {f.name for f in dataclasses.fields(cls)}
        return cls(**{k: v for k, v in d.items() if k in known})


# ---------------------------------------------------------------------------------------------
# planning (no Ray started)
# ---------------------------------------------------------------------------------------------
def default_sweep_name(plan: SweepPlan, preset: str) -> str:
    return f"ablation-{plan.table}-{preset}-{datetime.datetime.now():%Y%m%d-%H%M%S}"


def resolve_paths(cfg: SweepConfig, cwd: Optional[str | os.PathLike] = None) -> SweepConfig:
    """Absolute storage path (Ray rejects relative ones) and MLflow URI (workers run elsewhere)."""
    base = Path(cwd or os.getcwd()).resolve()
    storage = cfg.storage_path or str(base / "ray_results")
    if "://" not in storage:
        storage = str((base / Path(storage).expanduser()).resolve())
    uri = (tracking.absolute_tracking_uri(cfg.mlflow_uri, base) if cfg.mlflow_uri
           else tracking.default_tracking_uri(base))
    return dataclasses.replace(cfg, storage_path=storage, mlflow_uri=uri)


def trial_resources(spec: TrialSpec, cfg: SweepConfig, device: str) -> TrialResources:
    """The resources of one trial: the backbone's GPU plan, or a CPU plan; CLI overrides applied."""
    dcn = bool(spec.detector.dcn_stages) or spec.detector.dcn_in_tower
    if device == "gpu":
        overrides = {k: v for k, v in (("num_workers", cfg.workers_per_trial),
                                       ("cpus_per_worker", cfg.cpus_per_worker),
                                       ("batch_per_worker", cfg.batch_per_worker)) if v is not None}
        return plan_for(spec.detector.backbone, dcn, **overrides)
    return cpu_plan(spec.detector.backbone, dcn, num_workers=cfg.workers_per_trial or 1,
                    cpus_per_worker=cfg.cpus_per_worker or 1, batch_per_worker=cfg.batch_per_worker or 2)


def _eval_period(cfg: SweepConfig, max_iter: int) -> int:
    if cfg.eval_period is not None:
        return cfg.eval_period
    # ASHA compares trials at evaluations: four rungs' worth by default.
    return max(1, max_iter // 4) if cfg.asha else 0


def _run_length(tc: dict) -> int:
    """Iterations of a trial's resolved schedule (a named schedule scales with the batch)."""
    from .train import TrainConfig

    return TrainConfig.from_dict(tc).schedule_().max_iter


def trial_train_config(spec: TrialSpec, plan: SweepPlan, cfg: SweepConfig, resources: TrialResources,
                       sweep_name: str, parent_run_id: Optional[str] = None):
    """The :class:`pipeline.train.TrainConfig` of one trial (validated)."""
    from .train import TrainConfig

    trial_dir = f"{cfg.storage_path.rstrip('/')}/{sweep_name}/trials"
    base = dict(preset=spec.preset, detector=dict(spec.overrides), data=dict(cfg.data),
                batch_size=resources.global_batch, schedule=cfg.schedule, iterations=cfg.iterations, seed=spec.seed,
                eval_at_end=True, storage_path=trial_dir, run_name=spec.name, mlflow_uri=cfg.mlflow_uri,
                mlflow_experiment=cfg.experiment, mlflow_parent_run_id=parent_run_id,
                mlflow_tags=trial_tags(spec, plan, sweep_name))
    length_fields = {k: v for k, v in cfg.train.items() if k in ("lr_steps", "reference_batch_size")}
    max_iter = TrainConfig(**base, **length_fields).schedule_().max_iter
    eval_period = _eval_period(cfg, max_iter)
    if eval_period > max_iter:
        raise ValueError(f"eval_period {eval_period} is longer than the run ({max_iter} iterations)")
    train = {
        "log_period": max(1, min(50, max_iter // 5)),
        "log_model": cfg.log_model,
        # Reports happen at evaluations (with AP, what ASHA compares) and at checkpoints; a report
        # without AP is ignored by ASHA. Short runs checkpoint at their evaluations, so an interrupted
        # trial resumes from its latest one; long runs also every 2500 iterations.
        "report_period": 0,
        "checkpoint_period": min(2500, eval_period or 2500),
        **cfg.train,
    }
    return TrainConfig(**base, eval_period=eval_period, **train)


def trial_tags(spec: TrialSpec, plan: SweepPlan, sweep_name: str) -> dict[str, str]:
    return {"ablation.table": plan.table, "ablation.row": spec.label, "ablation.varied": ",".join(plan.varied),
            "ablation.sweep": sweep_name, "ablation.seed": str(spec.seed), "ablation.trial": spec.name}


@dataclass
class TrialJob:
    """Everything a trial needs, resolved in the driver (JSON-able)."""

    spec: TrialSpec
    train_config: dict
    resources: TrialResources

    def to_dict(self, plan: SweepPlan) -> dict[str, Any]:
        res = self.resources
        return {**self.spec.to_dict(), "varied": {f: _jsonable(getattr(self.spec.detector, f)) for f in plan.varied},
                "resources": {**res.to_dict(), "resources_per_worker": res.resources_per_worker(),
                              "trial_resources": res.trial_resources(), "total": res.total_resources()},
                "train_config": self.train_config}


def _jsonable(v: Any) -> Any:
    return list(v) if isinstance(v, tuple) else v


def plan_jobs(plan: SweepPlan, cfg: SweepConfig, sweep_name: str, device: str,
              parent_run_id: Optional[str] = None) -> list[TrialJob]:
    """Resolve resources and the training config of every trial; any invalid setting raises here."""
    jobs = []
    for spec in plan.trials:
        try:
            res = trial_resources(spec, cfg, device)
        except ValueError as e:
            raise ValueError(f"trial {spec.name} ({spec.label}): resources: {e}") from None
        try:
            tc = trial_train_config(spec, plan, cfg, res, sweep_name, parent_run_id)
        except ValueError as e:
            raise ValueError(f"trial {spec.name} ({spec.label}): training config: {e}") from None
        jobs.append(TrialJob(spec, tc.to_dict(), res))
    return jobs


def _length_text(cfg: SweepConfig) -> str:
    return f"{cfg.iterations} iterations" if cfg.iterations else f"the {cfg.schedule} schedule"


def describe(plan: SweepPlan, jobs: list[TrialJob], cfg: SweepConfig, sweep_name: str, device: str) -> str:
    """Human-readable dry run: one block per trial (settings that differ from the preset, resources)."""
    lines = [f"{plan.title}", f"sweep {sweep_name!r}: {len(jobs)} trial(s), {device.upper()} plan, "
             f"{_length_text(cfg)} each, max concurrent trials "
             f"{cfg.max_concurrent_trials or 'auto'}{', ASHA on AP' if cfg.asha else ''}",
             f"varied: {', '.join(plan.varied) or '-'}; storage {cfg.storage_path}/{sweep_name}; "
             f"MLflow {cfg.mlflow_uri} (experiment {cfg.experiment!r})", ""]
    for job in jobs:
        spec, res = job.spec, job.resources
        paper = f"paper AP {spec.paper['AP']:.1f}" if "AP" in spec.paper else "no paper row"
        over = ", ".join(f"{k}={v}" for k, v in spec.overrides.items()) or "-"
        per = ", ".join(f"{k} {v:g}" for k, v in res.resources_per_worker().items())
        node = f" on a {res.node_class} node" if res.node_class else ""
        lines.append(f"[{spec.index}] {spec.name}: {spec.label} (seed {spec.seed}; {paper})")
        lines.append(f"    detector: {spec.preset} + {over}")
        lines.append(f"    resources: {res.num_workers} worker(s) x ({per}){node}, batch {res.global_batch} "
                     f"({res.batch_per_worker}/worker)")
    return "\n".join(lines)


# ---------------------------------------------------------------------------------------------
# the Tune trial
# ---------------------------------------------------------------------------------------------
def _run_trial(config: dict, jobs: dict) -> None:
    """Tune function trainable: fit one TorchTrainer for the trial named ``config["trial"]``.

    The child MLflow run is created (or re-attached after a restore) before any worker starts,
    so a trial whose workers never come up is still visible, and ends FAILED with the error.
    """
    from ray.tune.integration.ray_train import TuneReportCallback

    from .train import RunDir, TrainConfig, worker_error, build_trainer

    for k, v in RAY_ENV.items():  # the trial's TorchTrainer controller and workers inherit these
        os.environ.setdefault(k, v)
    job = jobs[config["trial"]]
    cfg = TrainConfig.from_dict(job["train_config"])
    res = TrialResources(**job["resources"])
    run_dir = RunDir(cfg.storage_path, cfg.run_name)
    known = run_dir.read_json("mlflow_run.json")
    if known and known.get("tracking_uri") == cfg.mlflow_uri:
        run_id = known["run_id"]  # a restored sweep: this trial's run continues
        from mlflow import MlflowClient

        client = MlflowClient(cfg.mlflow_uri)
        if "ablation.stopped" in client.get_run(run_id).data.tags:
            client.delete_tag(run_id, "ablation.stopped")
    else:
        run_id = tracking.create_run(cfg.mlflow_uri, cfg.mlflow_experiment, job["run_label"],
                                     cfg.mlflow_parent_run_id, {**cfg.mlflow_tags, "atss.run_dir": run_dir.uri})
        run_dir.write_json("mlflow_run.json", {"tracking_uri": cfg.mlflow_uri, "run_id": run_id})
    cfg = cfg.replace(mlflow_run_id=run_id)
    scaling = res.scaling_config_kwargs()
    extra = {"placement_strategy": scaling["placement_strategy"]}
    if job.get("accelerator_type"):
        extra["accelerator_type"] = job["accelerator_type"]
    trainer = build_trainer(cfg, num_workers=res.num_workers, use_gpu=res.use_gpu,
                            resources_per_worker=scaling["resources_per_worker"], max_failures=job["max_failures"],
                            callbacks=[TuneReportCallback()], scaling_kwargs=extra)
    try:
        trainer.fit()
    except BaseException as e:
        cause = worker_error(e)
        if tracking.run_status(cfg.mlflow_uri, run_id) == "RUNNING":
            tracking.mark_run_failed(cfg.mlflow_uri, run_id, cause,
                                     "KILLED" if isinstance(e, KeyboardInterrupt) else "FAILED")
        if cause is not e and isinstance(cause, Exception):
            raise cause from e
        raise
    if tracking.run_status(cfg.mlflow_uri, run_id) == "RUNNING":
        from mlflow import MlflowClient

        MlflowClient(cfg.mlflow_uri).set_terminated(run_id, "FINISHED")


# ---------------------------------------------------------------------------------------------
# the sweep
# ---------------------------------------------------------------------------------------------
@dataclass
class SweepResult:
    name: str
    plan: SweepPlan
    table: Any  # pandas DataFrame, one row per trial (results_frame)
    markdown: str
    paths: dict  # "markdown", "parquet", "plot", "plan" -> where they are (local path or storage URI)
    parent_run_id: str
    tracking_uri: str
    experiment: str
    wall_s: float

    @property
    def ui_command(self) -> str:
        return tracking.ui_command(self.tracking_uri)


def _filesystem(storage_path: str):
    """``(pyarrow filesystem, path inside it)`` of a local path or a URI (``s3://``, ``gs://``, ``file://``)."""
    import pyarrow.fs

    if "://" in storage_path:
        return pyarrow.fs.FileSystem.from_uri(storage_path)
    return pyarrow.fs.LocalFileSystem(), storage_path


class SweepStore:
    """The sweep's own files (plan, state, results) in ``<storage_path>/<name>/ablation/``.

    Files are written to a local directory first (the storage itself when it is local) and copied
    to remote storage (``s3://``...) when the storage is a URI, so the results outlive the driver's
    node like Tune's state and the trials' checkpoints do.
    """

    def __init__(self, storage_path: str, name: str):
        self.fs, root = _filesystem(storage_path)
        self.uri = f"{storage_path.rstrip('/')}/{name}"
        self.base = f"{root.rstrip('/')}/{name}/ablation"
        self.remote = "://" in storage_path
        self.local_dir = (Path(tempfile.gettempdir()) / "atss-ablation" / name if self.remote
                          else Path(self.base))

    def location(self, filename: str) -> str:
        return f"{self.uri}/ablation/{filename}" if self.remote else str(self.local_dir / filename)

    def local(self, filename: str) -> Path:
        self.local_dir.mkdir(parents=True, exist_ok=True)
        return self.local_dir / filename

    def publish(self, filename: str) -> str:
        """Copy a file written at :meth:`local` to the store; returns where it now is."""
        if self.remote:
            self.fs.create_dir(self.base, recursive=True)
            with self.fs.open_output_stream(f"{self.base}/{filename}") as f:
                f.write(self.local(filename).read_bytes())
        return self.location(filename)

    def write_text(self, filename: str, text: str) -> str:
        self.local(filename).write_text(text)
        return self.publish(filename)

    def read_text(self, filename: str) -> Optional[str]:
        import pyarrow.fs

        path = f"{self.base}/{filename}"
        if self.fs.get_file_info(path).type == pyarrow.fs.FileType.NotFound:
            return None
        with self.fs.open_input_stream(path) as f:
            return f.read().decode()


def find_latest_sweep(storage_path: str) -> Optional[str]:
    """Name of the most recently saved sweep under ``storage_path`` (None if none)."""
    import pyarrow.fs

    fs, root = _filesystem(storage_path)
    try:
        entries = fs.get_file_info(pyarrow.fs.FileSelector(root, allow_not_found=True))
    except OSError:
        return None
    found = []
    for entry in entries:
        if entry.type != pyarrow.fs.FileType.Directory:
            continue
        info = fs.get_file_info(f"{entry.path}/ablation/{STATE_FILE}")
        if info.type == pyarrow.fs.FileType.File:
            found.append((info.mtime_ns or 0, entry.base_name))
    return max(found)[1] if found else None


def load_state(cfg: SweepConfig, name: str) -> Optional[dict]:
    text = SweepStore(cfg.storage_path, name).read_text(STATE_FILE)
    return json.loads(text) if text else None


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("", 0))
        return s.getsockname()[1]


def _ensure_ray(verbose: bool) -> None:
    import ray

    if ray.is_initialized():
        return
    if os.environ.get("RAY_ADDRESS"):
        # An existing cluster (``ray job submit`` sets RAY_ADDRESS): the job's runtime env applies;
        # the trials set RAY_ENV themselves.
        from .train import connect_ray

        connect_ray()
        return
    for k, v in RAY_ENV.items():
        os.environ.setdefault(k, v)
    # Concurrent trials print similar lines; Ray's deduplication would fold them into one.
    os.environ.setdefault("RAY_DEDUP_LOGS", "0")
    env = {k: os.environ[k] for k in RAY_ENV}
    # Ray Train's placement-group cleaner (which frees the resources of a trial that ASHA stops)
    # finds its cluster through RAY_ADDRESS, else by scanning this machine's processes, which
    # fails when another Ray cluster runs here too. A local cluster on a port we choose can tell
    # every worker its address up front.
    port = os.environ.get("RAY_GCS_SERVER_PORT") or str(_free_port())
    env["RAY_ADDRESS"] = f"127.0.0.1:{port}"
    previous = os.environ.get("RAY_GCS_SERVER_PORT")
    os.environ["RAY_GCS_SERVER_PORT"] = port
    try:
        ray.init(runtime_env={"env_vars": env}, log_to_driver=verbose, configure_logging=True,
                 logging_level="warning")
    finally:
        if previous is None:
            os.environ.pop("RAY_GCS_SERVER_PORT", None)


def _max_concurrent(cfg: SweepConfig, jobs: list[TrialJob], device: str) -> Optional[int]:
    if cfg.max_concurrent_trials is not None:
        return cfg.max_concurrent_trials
    if device == "gpu":
        return None
    import ray

    cpus = ray.cluster_resources().get("CPU", 1)
    need = max(j.resources.num_workers * j.resources.cpus_per_worker for j in jobs)
    return max(1, int(cpus // need))


@dataclass
class PreparedSweep:
    """A sweep checked and resolved in the driver, before Ray starts (see :func:`prepare_sweep`)."""

    plan: SweepPlan
    cfg: SweepConfig
    state: Optional[dict]  # the stored state of a sweep being resumed
    device: Optional[str]  # None: decided by the cluster once Ray is up ("auto")
    jobs: list

    @property
    def name(self) -> str:
        return self.cfg.name


def prepare_sweep(plan: SweepPlan, cfg: SweepConfig, *, resume: bool = False, preset_name: Optional[str] = None,
                  say=print) -> PreparedSweep:
    """Check everything that can be checked without Ray: every trial's training config and
    resources, and the data (a synthetic set is generated here, once, instead of by racing trials).

    A sweep name that already has state under the storage path is resumed with its stored plan.
    Raises ``ValueError`` / ``FileNotFoundError`` naming the problem.
    """
    from .train import TrainConfig, check_data_paths

    cfg = resolve_paths(cfg)
    name = cfg.name
    state = load_state(cfg, name) if name else None
    if resume and state is None:
        raise FileNotFoundError(f"nothing to resume: no sweep named {name!r} under {cfg.storage_path}")
    if state is not None:
        stored = SweepPlan.from_dict(json.loads(SweepStore(cfg.storage_path, name).read_text(PLAN_FILE)))
        if [t.to_dict() for t in stored.trials] != [t.to_dict() for t in plan.trials]:
            say(f"[sweep] {name}: resuming the stored plan ({stored.title}, {len(stored.trials)} trials); "
                "the table/values given now are ignored")
        plan = stored
        stored_cfg = dict(state["sweep_config"], verbose=cfg.verbose)
        if cfg.max_concurrent_trials:
            stored_cfg["max_concurrent_trials"] = cfg.max_concurrent_trials
        cfg = dataclasses.replace(SweepConfig.from_dict(stored_cfg), name=name)
    name = name or default_sweep_name(plan, preset_name or plan.trials[0].preset)
    cfg = dataclasses.replace(cfg, name=name)
    device = state["device"] if state else (cfg.device if cfg.device != "auto" else None)
    jobs = plan_jobs(plan, cfg, name, device or resolve_device("auto", {}))
    check_data_paths(TrainConfig.from_dict(jobs[0].train_config))
    return PreparedSweep(plan, cfg, state, device, jobs)


def run_sweep(plan: SweepPlan, cfg: SweepConfig, *, resume: bool = False,
              preset_name: Optional[str] = None, say=print) -> SweepResult:
    """Run (or resume) ``plan`` and write its results; returns the table and where things went."""
    return execute_sweep(prepare_sweep(plan, cfg, resume=resume, preset_name=preset_name, say=say), say=say)


def execute_sweep(prep: PreparedSweep, say=print) -> SweepResult:
    """Start (or attach to) Ray, run the trials, write and log the results."""
    from mlflow import MlflowClient

    t0 = time.perf_counter()
    plan, cfg, state, device, name = prep.plan, prep.cfg, prep.state, prep.device, prep.name
    _ensure_ray(cfg.verbose > 0)
    if device is None:  # "auto": the cluster decides (its declaration, or the GPUs Ray sees)
        device = resolve_device("auto")

    store = SweepStore(cfg.storage_path, name)
    client = MlflowClient(cfg.mlflow_uri)
    parent_run_id = state["parent_run_id"] if state else None
    if parent_run_id is None:
        parent_run_id = tracking.create_run(
            cfg.mlflow_uri, cfg.experiment, name, tags={
                "ablation.table": plan.table, "ablation.varied": ",".join(plan.varied), "ablation.sweep": name,
                "ablation.role": "sweep", "mlflow.note.content": f"{plan.title}. {plan.notes}".strip()})
        tracking.log_params(parent_run_id, {
            "table": plan.table, "trials": len(plan.trials), "varied": ",".join(plan.varied),
            "preset": plan.trials[0].preset, "seeds": ",".join(map(str, plan.seeds)), "device": device,
            **{f"sweep.{k}": v for k, v in tracking.flatten_config(
                {k: v for k, v in cfg.to_dict().items() if k not in ("name", "verbose")}).items()}},
            cfg.mlflow_uri)
    else:
        client.update_run(parent_run_id, status="RUNNING")
        for tag in ("ablation.unfinished", "error"):
            if tag in client.get_run(parent_run_id).data.tags:
                client.delete_tag(parent_run_id, tag)
    jobs = plan_jobs(plan, cfg, name, device, parent_run_id)
    store.write_text(PLAN_FILE, json.dumps(plan.to_dict(), indent=1))
    store.write_text(STATE_FILE, json.dumps({"name": name, "parent_run_id": parent_run_id, "device": device,
                                             "tracking_uri": cfg.mlflow_uri, "sweep_config": cfg.to_dict()},
                                            indent=1))
    client.log_artifact(parent_run_id, str(store.local(PLAN_FILE)), "ablation")

    try:
        grid = _fit(plan, cfg, jobs, name, device, restore=state is not None, say=say)
        results = _collect(grid, jobs, _tune_statuses(store.uri))
    except BaseException as e:
        tracking.mark_run_failed(cfg.mlflow_uri, parent_run_id, e,
                                 "KILLED" if isinstance(e, KeyboardInterrupt) else "FAILED")
        raise
    _close_children(cfg, parent_run_id, results)

    df = results_frame(plan, results)
    markdown = format_table(plan, df)
    files = {"markdown": "results.md", "parquet": "results.parquet", "plot": "ap.png"}
    store.local("results.md").write_text(markdown)
    df.to_parquet(store.local("results.parquet"), index=False)
    plot_results(plan, df, store.local("ap.png"))
    if len(plan.seeds) > 1:
        files["summary"] = "results_mean.parquet"
        summarize_seeds(df).to_parquet(store.local(files["summary"]), index=False)
    paths = {"plan": store.location(PLAN_FILE)}
    for key, filename in files.items():
        client.log_artifact(parent_run_id, str(store.local(filename)), "ablation")
        paths[key] = store.publish(filename)
    finished = df[df["status"] == "done"]
    if len(finished):
        best = finished.loc[finished["AP"].idxmax()]
        tracking.log_metrics(parent_run_id, {"best_AP": best["AP"], "trials_done": len(finished),
                                             "trials_failed": int((df["status"] == "error").sum())}, 0, cfg.mlflow_uri)
        client.set_tag(parent_run_id, "ablation.best_row", str(best["label"]))
    failed = df[df["status"] == "error"]
    unfinished = df[df["status"].isin(("missing", "interrupted"))]
    if len(unfinished):
        # Tune was interrupted (Ctrl-C, a lost driver): its state is saved; the same name resumes.
        client.set_tag(parent_run_id, "ablation.unfinished", str(len(unfinished)))
        client.set_terminated(parent_run_id, "KILLED")
        say(f"[sweep] {len(unfinished)} trial(s) did not finish; resume with the same sweep name: "
            f"--name {name} --storage-path {cfg.storage_path}")
    elif len(failed) == len(df):
        tracking.mark_run_failed(cfg.mlflow_uri, parent_run_id, f"all {len(df)} trials failed; first: "
                                 f"{failed['error'].iloc[0]}")
    else:
        client.set_terminated(parent_run_id, "FINISHED")
    return SweepResult(name, plan, df, markdown, paths, parent_run_id,
                       cfg.mlflow_uri, cfg.experiment, time.perf_counter() - t0)


def _fit(plan: SweepPlan, cfg: SweepConfig, jobs: list[TrialJob], name: str, device: str, restore: bool, say):
    from ray import tune

    job_table = {j.spec.name: {"train_config": j.train_config, "resources": dataclasses.asdict(j.resources),
                               "max_failures": cfg.max_failures, "accelerator_type": cfg.accelerator_type,
                               "run_label": f"{j.spec.label} [seed {j.spec.seed}]" if len(plan.seeds) > 1
                               else j.spec.label}
                 for j in jobs}
    trainable = tune.with_resources(tune.with_parameters(_run_trial, jobs=job_table),
                                    jobs[0].resources.trial_resources())
    path = SweepStore(cfg.storage_path, name).uri
    if restore and tune.Tuner.can_restore(path):
        say(f"[sweep] restoring {name} from {path}: finished trials keep their results, the others resume")
        tuner = tune.Tuner.restore(path, trainable=trainable, resume_unfinished=True, resume_errored=True)
        return tuner.fit()
    scheduler = None
    if cfg.asha:
        from ray.tune.schedulers import ASHAScheduler

        max_t = max(_run_length(j.train_config) for j in jobs)
        grace = cfg.asha_grace_period or min(j.train_config["eval_period"] or max_t for j in jobs)
        # time_attr is the training iteration inside the reports; stop_last_trials=False lets a
        # trial that reaches the end finish (and close its MLflow run) instead of being killed.
        scheduler = ASHAScheduler(time_attr="iteration", max_t=max_t, grace_period=grace,
                                  reduction_factor=cfg.asha_reduction_factor, stop_last_trials=False)
    concurrent = _max_concurrent(cfg, jobs, device)
    say(f"[sweep] {name}: {len(jobs)} trials, {concurrent or 'unbounded'} at a time; results in {path}")
    tuner = tune.Tuner(
        trainable,
        param_space={"trial": tune.grid_search([j.spec.name for j in jobs])},
        tune_config=tune.TuneConfig(metric="AP", mode="max", scheduler=scheduler,
                                    max_concurrent_trials=concurrent, reuse_actors=False),
        run_config=tune.RunConfig(name=name, storage_path=cfg.storage_path, verbose=cfg.verbose,
                                  failure_config=tune.FailureConfig(max_failures=0)),
    )
    return tuner.fit()


def _tune_statuses(path: str) -> dict[str, str]:
    """Trial name -> Tune's saved status: TERMINATED (finished or stopped by the scheduler), ERROR,
    or PENDING/RUNNING for trials cut short by an interruption. Read from the experiment state on
    disk, which Tune saves before it stops the trials of an interrupted sweep (in memory they then
    look TERMINATED)."""
    from ray.tune import ExperimentAnalysis

    try:
        trials = ExperimentAnalysis(path).trials
    except Exception:  # noqa: BLE001 - no state to read: treat every trial as Tune reported it
        return {}
    return {t.config.get("trial"): t.status for t in trials if isinstance(getattr(t, "config", None), dict)}


def _collect(grid, jobs: list[TrialJob], statuses: dict[str, str]) -> dict[int, dict]:
    """Trial index -> its last reported metrics + status/error (ResultGrid rows have no checkpoint)."""
    by_name = {j.spec.name: j for j in jobs}
    out: dict[int, dict] = {}
    for result in grid:
        trial = (result.config or {}).get("trial")
        job = by_name.get(trial)
        if job is None:
            continue
        metrics = dict(result.metrics or {})
        iterations = metrics.get("iteration")
        max_iter = _run_length(job.train_config)
        if result.error is not None:
            status, error = "error", f"{type(result.error).__name__}: {result.error}".splitlines()[0][:300]
        elif statuses.get(trial, "TERMINATED") not in ("TERMINATED", "ERROR"):
            status, error = "interrupted", ""  # the sweep was stopped (Ctrl-C); its name resumes it
        elif iterations is not None and iterations < max_iter:
            status, error = f"stopped at {iterations}", ""
        elif any(m in metrics for m in METRICS):
            status, error = "done", ""
        else:
            status, error = "missing", "no metrics reported"
        out[job.spec.index] = {**{m: metrics.get(m) for m in METRICS}, "status": status, "error": error,
                               "iterations": iterations}
    return out


def _close_children(cfg: SweepConfig, parent_run_id: str, results: dict[int, dict]) -> None:
    """Child runs left RUNNING (a trial stopped by ASHA is killed mid-run) end KILLED."""
    from mlflow import MlflowClient

    client = MlflowClient(cfg.mlflow_uri)
    exp = client.get_experiment_by_name(cfg.experiment)
    runs = client.search_runs([exp.experiment_id], f"tags.mlflow.parentRunId = '{parent_run_id}' "
                                                   "and attributes.status = 'RUNNING'")
    for run in runs:
        client.set_tag(run.info.run_id, "ablation.stopped", "early stop by the Tune scheduler or sweep end")
        client.set_terminated(run.info.run_id, "KILLED")


def format_summary(res: SweepResult) -> str:
    """What the job prints at the end: the table, where it went, how to open MLflow."""
    lines = ["", res.markdown,
             f"sweep {res.name} finished in {res.wall_s / 60:.1f} min",
             f"  Markdown: {res.paths['markdown']}", f"  Parquet:  {res.paths['parquet']}",
             f"  plot:     {res.paths['plot']}",
             f"  MLflow:   experiment {res.experiment!r}, parent run {res.parent_run_id} (one child run per trial)",
             f"  open the MLflow UI with:  {res.ui_command}"]
    return "\n".join(lines)
