"""Run a :class:`~pipeline.ablation.plan.SweepPlan` as a Ray Tune sweep.

Every Tune trial is a small function (:func:`run_trial`) that trains its :class:`TrialConfig`
(:mod:`pipeline.ablation.trial`, imported in the trial's process only: this driver never loads torch):

* a **1-worker trial** (the CPU default, a 1-GPU R-50 trial) runs the training loop inside the
  Tune trial itself (:func:`pipeline.training.worker.train_in_tune`, the same ``Trainer`` as Ray
  Train workers run, with a :class:`~pipeline.training.session.TuneSession`): the trial reserves
  the worker's CPUs/GPU, checkpoints are ``tune.Checkpoint`` s and restarts go through Tune
  (``tune.FailureConfig(max_failures)``). No Ray Train controller, worker group, placement group
  or queue actors per trial: on a 2-core box that is most of the bookkeeping's memory and CPU.
* a **multi-worker trial** fits a ``TorchTrainer`` (the Ray Train V2 pattern, RAY_NOTES section 2);
  rank 0's reports reach Tune through a ``TuneReportCallback``. The trial only holds a token of the
  head node: Train reserves its workers' bundles, so concurrency is bounded with
  ``max_concurrent_trials``. Train retries its worker group itself (``max_failures``).

Tune's ``param_space`` holds the swept hyperparameters under short keys (``topk``, and ``seed``
over several seeds), which is what Tune's progress table shows as columns (the new output engine
names a column after its key path and cannot rename it); :class:`PlannedTrials` suggests each
planned trial's config: those keys plus the whole ``TrialConfig.to_dict()``, in plan order, so
exactly the planned trials run. The trial trains with the values of the short keys.

MLflow: one parent run per sweep (tags ``ablation.table``, ``ablation.varied``, ``ablation.sweep``)
and one child run per trial named by its row (``k=5``, ``k=5 [seed 0]`` over several seeds), both
through :func:`pipeline.tracking.run_lifecycle`; the training logs params, metrics, artifacts and
its environment (``env.*``) into the child. The results table (Markdown, Parquet), the AP plot and
the plan go to the parent when the sweep ends, with the trials' environment (``env.*`` params and
tags), the verdict on the paper's claim (tag ``ablation.claim``) and the link that opens the
experiment on its runs table (tag ``ablation.runs_table``).

Layout under ``<storage_path>/<sweep name>/`` (a local path or a URI such as ``s3://bucket/prefix``):
Tune's experiment state and trial directories (the 1-worker trials' checkpoints), ``ablation/``
(the plan, the sweep state, the results) and ``trials/<trial>/`` (each trial's run directory: Ray
Train's checkpoints for multi-worker trials, evaluation outputs, markers). Running the same sweep
name again restores it with ``Tuner.restore``: finished trials keep their results, unfinished and
errored ones start again and their training resumes from its latest checkpoint.
"""
from __future__ import annotations

import dataclasses
import datetime
import functools
import json
import os
import time
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, Optional

import ray
from mlflow import MlflowClient
from mlflow.entities import RunTag
from ray import tune
from ray.tune.experimental.output import AirVerbosity, TuneTerminalReporter
from ray.tune.logger import CSVLoggerCallback, JsonLoggerCallback
from ray.tune.schedulers import ASHAScheduler
from ray.tune.search import Searcher

from pipeline import tracking
from pipeline.environment import Environment, environment_footer
from pipeline.evaluation import METRIC_KEYS
from pipeline.resources import resolve_device
from pipeline.training import Store, check_data_paths, connect_ray
from pipeline.training.reporting import quiet_ray_workers

from .plan import SweepConfig, SweepPlan, TrialConfig
from .report import format_table, plot_results, results_frame, summarize_seeds, table_claim
from .space import unique

PLAN_FILE = "plan.json"
STATE_FILE = "sweep.json"
# Environment Ray Train needs in every trial (RAY_NOTES sections 0 and 6): a 0.2 s health check
# makes each report() cost 0.2 s instead of 2 s; the print patch doubles worker output; on one node
# there is nothing to preempt, and the watcher is an actor (a process) per trial.
RAY_ENV = {"RAY_TRAIN_HEALTH_CHECK_INTERVAL_S": "0.2", "RAY_TRAIN_ENABLE_PRINT_PATCH": "0",
           "RAY_TRAIN_ENABLE_PREEMPTION_WATCHER": "0"}
# The local cluster this job starts (read by its processes when they start, so not for a cluster
# started elsewhere; values the user exported win). docs/ablation.md, "Footprint":
# * Ray runs its own processes on its bundled jemalloc and by default takes it out of the workers'
#   environment (some libraries do not work with it); torch does. Where glibc's arenas keep a
#   trial's freed activations, jemalloc returns them: about 0.2 GB less per trial (of ~1.2 GB), the
#   same losses to the last digit.
# * Ray starts one idle worker per CPU for the first driver; the trials are actors in processes of
#   their own, so those workers only hold memory.
LOCAL_CLUSTER_ENV = {"RAY_LD_PRELOAD_ON_WORKERS": "1", "RAY_prestart_worker_first_driver": "0"}
# Only in the workers (Ray's daemons would grow by the huge pages): the buffers jemalloc returns
# are faulted in again at every step, in 2 MB pages instead of 4 kB ones (a kernel whose THP is
# "never" ignores it, and pays about 14 % more CPU).
LOCAL_WORKER_ENV = {"MALLOC_CONF": "thp:always"}
ETA_PERIOD_S = 30  # Tune's own table comes every 30 s; the sweep's ETA line follows it


# ---------------------------------------------------------------------------------------------
# the sweep's own files
# ---------------------------------------------------------------------------------------------
def sweep_store(storage_path: str, name: str) -> Store:
    """``<storage_path>/<name>/ablation/``: the plan, the sweep state and the results."""
    return Store(storage_path, name, "ablation")


def load_state(storage_path: str, name: str) -> Optional[dict]:
    return sweep_store(storage_path, name).read_json(STATE_FILE)


def load_plan(config: SweepConfig) -> Optional[SweepPlan]:
    """The stored plan of the sweep ``config.name`` (None when no such sweep ran), with this
    invocation's ``verbose`` and, when given, ``max_concurrent_trials``."""
    config = config.resolve_paths()
    if config.name is None or load_state(config.storage_path, config.name) is None:
        return None
    plan = SweepPlan.from_dict(sweep_store(config.storage_path, config.name).read_json(PLAN_FILE))
    changes: dict[str, Any] = {"verbose": config.verbose}
    if config.max_concurrent_trials:
        changes["max_concurrent_trials"] = config.max_concurrent_trials
    return dataclasses.replace(plan, config=plan.config.replace(**changes))


def find_latest_sweep(storage_path: str) -> Optional[str]:
    """Name of the most recently saved sweep under ``storage_path`` (None if none)."""
    found = []
    for entry in Store(storage_path).list():
        if entry.is_dir:
            state = Store(storage_path, entry.name, "ablation").list()
            found += [(e.mtime_ns, entry.name) for e in state if e.name == STATE_FILE]
    return max(found)[1] if found else None


# ---------------------------------------------------------------------------------------------
# the Tune boundary
# ---------------------------------------------------------------------------------------------
def swept_values(plan: SweepPlan, trial: TrialConfig) -> dict[str, Any]:
    """The trial's values of the swept hyperparameters under their short keys (JSON-native):
    each varied detector field by its name, and ``seed`` when the sweep has several seeds."""
    detector = trial.train.detector.to_dict()
    values = {f: detector[f] for f in plan.varied}
    if len(plan.seeds) > 1:
        values["seed"] = trial.seed
    return values


def param_space(plan: SweepPlan) -> dict[str, Any]:
    """The swept hyperparameters as Tune domains under short keys (the progress table's columns)."""
    values = [swept_values(plan, t) for t in plan.trials]
    space = {k: tune.choice(unique([v[k] for v in values])) for k in values[0]} if values else {}
    clash = sorted(set(space) & set(plan.trials[0].to_dict())) if plan.trials else []
    if clash:
        raise ValueError(f"swept fields {clash} collide with the trial config's own keys")
    return space


class PlannedTrials(Searcher):
    """A Tune searcher that suggests each planned trial's config once, in plan order, then finishes:
    the short swept keys of :func:`param_space` with the trial's values, plus the whole
    ``TrialConfig.to_dict()``."""

    def __init__(self, plan: SweepPlan):
        super().__init__()
        self.configs = [{**swept_values(plan, t), **t.to_dict()} for t in plan.trials]
        self.next = 0

    def set_search_properties(self, metric, mode, config, **spec) -> bool:
        return True

    def suggest(self, trial_id: str) -> Optional[dict]:
        if self.next >= len(self.configs):
            return Searcher.FINISHED
        self.next += 1
        return self.configs[self.next - 1]

    def on_trial_complete(self, trial_id: str, result: Optional[dict] = None, error: bool = False) -> None:
        pass

    def save(self, checkpoint_path: str) -> None:
        with open(checkpoint_path, "w") as f:
            json.dump({"next": self.next}, f)

    def restore(self, checkpoint_path: str) -> None:
        with open(checkpoint_path) as f:
            self.next = json.load(f)["next"]


def trial_label(trial) -> str:
    """Tune's name and directory of a trial: the planned trial's name (``t00_k=5_s0``) and Tune's id
    (Tune would name the directory after every field of the config)."""
    return f"{trial.config.get('name', 'trial')}_{trial.trial_id}"


def trial_bundle(config: Mapping[str, Any], accelerator_type: Optional[str] = None) -> tune.PlacementGroupFactory:
    """What a Tune trial reserves: a 1-worker trial trains in it and holds the worker's CPUs/GPU
    (on a node of ``accelerator_type`` when given, as Train's ``ScalingConfig`` would ask); a
    multi-worker trial only drives its TorchTrainer (Train reserves the workers)."""
    res = TrialConfig.from_dict(config).resources
    if res.num_workers > 1:
        return tune.PlacementGroupFactory([res.trial_resources()])
    bundle = res.resources_per_worker()
    if accelerator_type and res.use_gpu:
        bundle[f"accelerator_type:{accelerator_type}"] = 0.001
    return tune.PlacementGroupFactory([bundle])


def run_trial(config: dict, max_failures: int = 0, accelerator_type: Optional[str] = None) -> None:
    """Tune function trainable: train the trial ``config`` (:class:`PlannedTrials`' suggestion) in
    this trial's process (:func:`pipeline.ablation.trial.train_trial`)."""
    # Imported in the trial's process only: the training loads torch (about 0.5 GB a process), and
    # this driver plans, starts and watches the trials without it (docs/ablation.md, Footprint).
    from .trial import train_trial

    train_trial(config, max_failures, accelerator_type)


class SweepReporter(TuneTerminalReporter):
    """Tune's console output for a sweep: Tune's own progress table every 30 s, followed by one
    line with the sweep's ETA; a trial's start and end are one line each (Tune would print the
    whole trial config, about 120 lines, and the whole last result)."""

    def __init__(self, plan: SweepPlan, concurrency: Optional[int]):
        space = param_space(plan)
        super().__init__(AirVerbosity.DEFAULT, num_samples=len(plan.trials), config=space)
        self.swept_keys, self.concurrency = list(space), concurrency
        self.eta_printed = float("-inf")

    def on_trial_start(self, iteration, trials, trial, **info):
        swept = ", ".join(f"{k}={trial.config[k]}" for k in self.swept_keys)
        print(f"Trial {trial} started: {trial.config.get('label')}" + (f" ({swept})" if swept else ""), flush=True)

    def on_trial_complete(self, iteration, trials, trial, **info):
        last = trial.last_result or {}
        ap = f", AP {last['AP']:.4f}" if isinstance(last.get("AP"), float) else ""
        print(f"Trial {trial} finished at iteration {last.get('iteration', '?')}{ap}", flush=True)

    def on_trial_error(self, iteration, trials, trial, **info):
        pass  # Tune's own reporter (silent otherwise) prints the error and its file; not twice

    def on_trial_recover(self, iteration, trials, trial, **info):
        pass

    def print_heartbeat(self, trials, *args, force: bool = False):
        super().print_heartbeat(trials, *args, force=force)
        now = time.monotonic()
        if trials and not force and now - self.eta_printed >= ETA_PERIOD_S:
            self.eta_printed = now
            print(sweep_eta_line(trials, self.concurrency), flush=True)


def sweep_eta_line(trials, concurrency: Optional[int]) -> str:
    """``[sweep] 1/3 trials done, 2 running, 0 pending; ETA 0:04:10``: the running trials' own
    ``eta_s`` and the pending ones at the mean trial time so far, spread over the concurrency."""
    by_status: dict[str, list] = {}
    for t in trials:
        by_status.setdefault(t.status, []).append(t)
    done = by_status.get("TERMINATED", []) + by_status.get("ERROR", [])
    running, pending = by_status.get("RUNNING", []), by_status.get("PENDING", [])
    remaining = [(t.last_result or {}).get("eta_s") for t in running]
    known = [r for r in remaining if isinstance(r, (int, float))]
    spent = [(t.last_result or {}).get("time_total_s") for t in done + running]
    totals = [float(s) + (r or 0.0) for s, r in zip(spent[len(done):], remaining) if s is not None]
    totals += [float(s) for s in spent[:len(done)] if s is not None]
    line = f"[sweep] {len(done)}/{len(trials)} trials done, {len(running)} running, {len(pending)} pending"
    if (running and len(known) < len(running)) or (pending and not totals):
        return line + "; ETA: after the first reports"
    slots = max(1, min(concurrency or len(running) or 1, len(trials)))
    per_trial = sum(totals) / len(totals) if totals else 0.0
    eta = max(known, default=0.0)
    if pending:
        eta = max(eta, (sum(known) + len(pending) * per_trial) / slots)
    return line + f"; ETA {datetime.timedelta(seconds=int(eta))}"


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
    runs_url: str = ""  # the experiment's runs table in the MLflow UI (tracking.runs_table_url)

    @property
    def ui_command(self) -> str:
        return tracking.ui_command(self.tracking_uri)


def check_data(plan: SweepPlan) -> None:
    """The trials' data exists (a synthetic set is generated here, once, instead of by racing trials)."""
    checked = []
    for trial in plan.trials:
        if trial.train.data not in checked:
            check_data_paths(trial.train)
            checked.append(trial.train.data)


def run_sweep(plan: SweepPlan, say=print) -> SweepResult:
    """Start (or attach to) Ray, run (or resume) the plan's trials, write and log the results."""
    t0 = time.perf_counter()
    cfg, name = plan.config, plan.name
    store = sweep_store(cfg.storage_path, name)
    state = store.read_json(STATE_FILE)
    _ensure_ray(cfg.verbose > 0, dashboard=any(t.resources.num_workers > 1 for t in plan.trials))
    cluster = resolve_device("auto")
    if cluster != plan.device and not os.environ.get("ATSS_TRIAL_DEVICE"):
        say(f"[sweep] note: the trials are planned for {plan.device.upper()} workers but this cluster has "
            f"{'GPUs' if cluster == 'gpu' else 'no GPUs'}; --device {cluster} plans for it")
    parent = tracking.TrackingConfig(cfg.mlflow_uri, cfg.experiment, run_id=state and state["parent_run_id"])
    tags = {"ablation.table": plan.table, "ablation.varied": ",".join(plan.varied), "ablation.sweep": name,
            "ablation.role": "sweep", "mlflow.note.content": f"{plan.title}. {plan.notes}".strip()}
    with tracking.run_lifecycle(parent, name, tags=tags, clear_tags=("ablation.unfinished",)) as run:
        if state is None:
            tracking.log_params(run.run_id, {
                "table": plan.table, "trials": len(plan.trials), "varied": ",".join(plan.varied),
                "preset": plan.trials[0].preset, "seeds": ",".join(map(str, plan.seeds)), "device": plan.device,
                **{f"sweep.{k}": v for k, v in tracking.flatten_config(
                    {k: v for k, v in cfg.to_dict().items() if k not in ("name", "verbose")}).items()}},
                cfg.mlflow_uri)
            plan = plan.with_parent_run(run.run_id)
            store.write_json(PLAN_FILE, plan.to_dict())
            store.write_json(STATE_FILE, {"name": name, "parent_run_id": run.run_id, "device": plan.device,
                                          "tracking_uri": cfg.mlflow_uri})
        client = MlflowClient(cfg.mlflow_uri)
        client.log_artifact(run.run_id, str(store.staging(PLAN_FILE)), "ablation")
        runs_url = tracking.runs_table_url(cfg.mlflow_uri, client.get_run(run.run_id).info.experiment_id)
        client.set_tag(run.run_id, "ablation.runs_table", runs_url)
        say(f"[sweep] MLflow runs table (one child run per trial): {runs_url}")
        grid = _fit(plan, restore=state is not None, say=say)
        results = _collect(grid, plan, _tune_statuses(Store(cfg.storage_path, name).uri))
        _close_children(cfg, run.run_id)
        environments = trial_environments(cfg, run.run_id)
        record_environment(client, run.run_id, environments, cfg.mlflow_uri)
        df, markdown, paths = _write_results(plan, results, store, client, run.run_id, environments)
        finished, failed = df[df["status"] == "done"], df[df["status"] == "error"]
        if len(finished):
            best = finished.loc[finished["AP"].idxmax()]
            tracking.log_metrics(run.run_id, {"best_AP": best["AP"], "trials_done": len(finished),
                                              "trials_failed": len(failed)}, 0, cfg.mlflow_uri)
            client.set_tag(run.run_id, "ablation.best_row", str(best["label"]))
        unfinished = df[df["status"].isin(("missing", "interrupted"))]
        if len(unfinished):
            # Tune was interrupted (Ctrl-C, a lost driver): its state is saved; the same name resumes.
            client.set_tag(run.run_id, "ablation.unfinished", str(len(unfinished)))
            client.set_terminated(run.run_id, "KILLED")
            say(f"[sweep] {len(unfinished)} trial(s) did not finish; resume with the same sweep name: "
                f"--name {name} --storage-path {cfg.storage_path}")
        elif len(failed) == len(df):
            run.fail(f"all {len(df)} trials failed; first: {failed['error'].iloc[0]}")
    return SweepResult(name, plan, df, markdown, paths, run.run_id, cfg.mlflow_uri, cfg.experiment,
                       time.perf_counter() - t0, runs_url)


def trial_environments(cfg: SweepConfig, parent_run_id: str) -> dict[str, Environment]:
    """Trial name -> the environment its training recorded in its child run (``env.json`` tag;
    trials that failed before training have none)."""
    return {r.data.tags["ablation.trial"]: Environment.from_tags(r.data.tags)
            for r in child_runs(cfg, parent_run_id) if "ablation.trial" in r.data.tags and "env.json" in r.data.tags}


def child_runs(cfg: SweepConfig, parent_run_id: str, where: str = "") -> list:
    """The MLflow runs of the sweep's trials (children of ``parent_run_id``), ``where`` further
    filtering them (MLflow's search syntax, e.g. ``attributes.status = 'RUNNING'``)."""
    client = MlflowClient(cfg.mlflow_uri)
    exp = client.get_experiment_by_name(cfg.experiment)
    query = f"tags.mlflow.parentRunId = '{parent_run_id}'" + (f" and {where}" if where else "")
    return client.search_runs([exp.experiment_id], query)


def record_environment(client, run_id: str, environments: Mapping[str, Environment], uri: str) -> None:
    """The parent run records what its trials' numbers depend on: the environment's ``env.*`` params
    and tags when the trials share one, and always the table's footer (``env.footer``, one line per
    environment when they differ) and the environments' keys (``env.keys``)."""
    unique = {env.key(): env for env in environments.values()}
    tags = {"env.footer": environment_footer(unique.values())[:tracking.MAX_PARAM_LENGTH],
            "env.keys": ",".join(unique) or "none"}
    if len(unique) == 1:
        env = next(iter(unique.values()))
        tags = {**env.to_tags(), **tags}
        logged = client.get_run(run_id).data.params  # a resumed sweep keeps its first values
        tracking.log_params(run_id, {k: v for k, v in env.to_params().items() if k not in logged}, uri)
    client.log_batch(run_id, tags=[RunTag(k, v) for k, v in tags.items()])


def _write_results(plan: SweepPlan, results: dict[int, dict], store: Store, client, run_id: str,
                   environments: Mapping[str, Environment]):
    """The results frame, its Markdown (verdict and environment footer), Parquet and plot (and the
    seed means), logged to the parent."""
    for trial in plan.trials:
        if trial.name in environments and trial.index in results:
            results[trial.index]["environment"] = environments[trial.name].key()
    df = results_frame(plan, results)
    markdown = format_table(plan, df, environments.values())
    judgement = table_claim(plan, df)
    if judgement is not None:
        client.set_tag(run_id, "ablation.claim", judgement.text()[:tracking.MAX_PARAM_LENGTH])
    files = {"markdown": "results.md", "parquet": "results.parquet", "plot": "ap.png"}
    store.staging("results.md").write_text(markdown)
    df.to_parquet(store.staging("results.parquet"), index=False)
    plot_results(plan, df, store.staging("ap.png"))
    if len(plan.seeds) > 1:
        files["summary"] = "results_mean.parquet"
        summarize_seeds(df).to_parquet(store.staging(files["summary"]), index=False)
    paths = {"plan": store.location(PLAN_FILE)}
    for key, filename in files.items():
        client.log_artifact(run_id, str(store.staging(filename)), "ablation")
        paths[key] = store.publish(filename)
    return df, markdown, paths


def _ensure_ray(verbose: bool, dashboard: bool = True) -> None:
    """Attach to ``RAY_ADDRESS``, else start a local cluster for this job. Without multi-worker
    trials the local cluster has no dashboard: Ray Train's placement-group cleaner needs it (RAY_NOTES
    section 0), 1-worker trials create no Train placement groups, and the dashboard's processes
    are about 0.4 GB and a tenth of the bookkeeping's CPU on a 2-core box."""
    if ray.is_initialized():
        return
    if os.environ.get("RAY_ADDRESS"):
        # An existing cluster (``ray job submit`` sets RAY_ADDRESS): the job's runtime env applies;
        # the trials' trainers set RAY_ENV themselves.
        connect_ray()
        return
    for k, v in {**RAY_ENV, **LOCAL_CLUSTER_ENV}.items():
        os.environ.setdefault(k, v)
    env = {k: os.environ[k] for k in RAY_ENV}
    env.update((k, os.environ.get(k, v)) for k, v in LOCAL_WORKER_ENV.items())
    # Ray Train's placement-group cleaner (which frees the resources of a trial that ASHA stops)
    # finds its cluster through RAY_ADDRESS, else by scanning this machine's processes, which
    # fails when another Ray cluster runs here too. A local cluster on a port we choose can tell
    # every worker its address up front.
    port = os.environ.get("RAY_GCS_SERVER_PORT") or str(_free_port())
    env["RAY_ADDRESS"] = f"127.0.0.1:{port}"
    previous = os.environ.get("RAY_GCS_SERVER_PORT")
    os.environ["RAY_GCS_SERVER_PORT"] = port
    try:
        ray.init(runtime_env={"env_vars": env, "worker_process_setup_hook": quiet_ray_workers},
                 log_to_driver=verbose, configure_logging=True, logging_level="warning",
                 include_dashboard=dashboard)
    finally:
        if previous is None:
            os.environ.pop("RAY_GCS_SERVER_PORT", None)


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("", 0))
        return s.getsockname()[1]


def _max_concurrent(plan: SweepPlan) -> Optional[int]:
    if plan.config.max_concurrent_trials is not None:
        return plan.config.max_concurrent_trials
    if plan.device == "gpu":
        return None
    cpus = ray.cluster_resources().get("CPU", 1)
    need = max(t.resources.num_workers * t.resources.cpus_per_worker for t in plan.trials)
    return max(1, int(cpus // need))


def _fit(plan: SweepPlan, restore: bool, say):
    cfg, name = plan.config, plan.name
    # Tune's auto loggers include TensorBoard's (and its "visualize with TensorBoard" hint) in a
    # project that tracks with MLflow; the CSV/JSON loggers Tune's ExperimentAnalysis reads are
    # passed explicitly below. Read when the Tuner builds its callbacks, here in the driver.
    os.environ.setdefault("TUNE_DISABLE_AUTO_CALLBACK_LOGGERS", "1")
    in_trial = any(t.resources.num_workers == 1 for t in plan.trials)
    trainable = tune.with_resources(
        tune.with_parameters(run_trial, max_failures=cfg.max_failures, accelerator_type=cfg.accelerator_type),
        functools.partial(trial_bundle, accelerator_type=cfg.accelerator_type))
    path = Store(cfg.storage_path, name).uri
    if restore and tune.Tuner.can_restore(path):
        say(f"[sweep] restoring {name} from {path}: finished trials keep their results, the others resume")
        return tune.Tuner.restore(path, trainable=trainable, resume_unfinished=True, resume_errored=True).fit()
    scheduler = None
    if cfg.asha:
        max_t = max(t.train.max_iter for t in plan.trials)
        first_eval = min(t.train.eval_period or max_t for t in plan.trials)
        grace = cfg.asha_grace_period or first_eval
        if grace < first_eval:
            # a trial's AP is unknown (None) before its first evaluation: nothing to compare at a rung
            raise ValueError(f"--asha-grace {grace} comes before the first evaluation (iteration {first_eval}); "
                             "give at least the eval period")
        # time_attr is the training iteration inside the reports; stop_last_trials=False lets a
        # trial that reaches the end finish (and close its MLflow run) instead of being killed.
        scheduler = ASHAScheduler(time_attr="iteration", metric="AP", mode="max", max_t=max_t, grace_period=grace,
                                  reduction_factor=cfg.asha_reduction_factor, stop_last_trials=False)
    concurrent = _max_concurrent(plan)
    say(f"[sweep] {name}: {len(plan.trials)} trials, {concurrent or 'unbounded'} at a time; results in {path}")
    callbacks = [CSVLoggerCallback(), JsonLoggerCallback()]
    if cfg.verbose:
        callbacks.insert(0, SweepReporter(plan, concurrent))
    # No metric/mode on the Tuner: the table's "current best trial" line would print a whole trial
    # config; the results table names the best row instead. verbose=0 silences Tune's own reporter
    # (its per-trial config dump); SweepReporter prints Tune's table instead.
    tuner = tune.Tuner(
        trainable, param_space=param_space(plan),
        tune_config=tune.TuneConfig(search_alg=PlannedTrials(plan), num_samples=len(plan.trials),
                                    scheduler=scheduler, max_concurrent_trials=concurrent, reuse_actors=False,
                                    trial_name_creator=trial_label, trial_dirname_creator=trial_label),
        run_config=tune.RunConfig(
            name=name, storage_path=cfg.storage_path, verbose=0, callbacks=callbacks,
            # 1-worker trials train in the trial: Tune keeps their checkpoints and restarts them;
            # multi-worker trials are retried by Ray Train (build_trainer's max_failures).
            failure_config=tune.FailureConfig(max_failures=cfg.max_failures if in_trial else 0),
            checkpoint_config=tune.CheckpointConfig(num_to_keep=plan.trials[0].train.checkpoints_to_keep)),
    )
    return tuner.fit()


def _tune_statuses(path: str) -> dict[str, str]:
    """Trial name -> Tune's saved status: TERMINATED (finished or stopped by the scheduler), ERROR,
    or PENDING/RUNNING for trials cut short by an interruption. Read from the experiment state on
    disk, which Tune saves before it stops the trials of an interrupted sweep (in memory they then
    look TERMINATED)."""
    try:
        trials = tune.ExperimentAnalysis(path).trials
    except Exception:  # noqa: BLE001 - no state to read: treat every trial as Tune reported it
        return {}
    return {t.config.get("name"): t.status for t in trials if isinstance(getattr(t, "config", None), dict)}


def _collect(grid, plan: SweepPlan, statuses: Mapping[str, str]) -> dict[int, dict]:
    """Trial index -> its last reported metrics + status/error (ResultGrid rows have no checkpoint)."""
    by_name = {t.name: t for t in plan.trials}
    out: dict[int, dict] = {}
    for result in grid:
        name = (result.config or {}).get("name")
        trial = by_name.get(name)
        if trial is None:
            continue
        metrics = dict(result.metrics or {})
        iterations = metrics.get("iteration")
        if result.error is not None:
            status, error = "error", f"{type(result.error).__name__}: {result.error}".splitlines()[0][:300]
        elif statuses.get(name, "TERMINATED") not in ("TERMINATED", "ERROR"):
            status, error = "interrupted", ""  # the sweep was stopped (Ctrl-C); its name resumes it
        elif iterations is not None and iterations < trial.train.max_iter:
            status, error = f"stopped at {iterations}", ""
        elif metrics.get("AP") is not None:
            status, error = "done", ""
        else:
            status, error = "missing", "no metrics reported"
        out[trial.index] = {**{m: metrics.get(m) for m in METRIC_KEYS}, "status": status, "error": error,
                            "iterations": iterations}
    return out


def _close_children(cfg: SweepConfig, parent_run_id: str) -> None:
    """Child runs left RUNNING (a trial stopped by ASHA is killed mid-run) end KILLED."""
    client = MlflowClient(cfg.mlflow_uri)
    for run in child_runs(cfg, parent_run_id, "attributes.status = 'RUNNING'"):
        client.set_tag(run.info.run_id, "ablation.stopped", "early stop by the Tune scheduler or sweep end")
        client.set_terminated(run.info.run_id, "KILLED")


def format_summary(res: SweepResult) -> str:
    """What the job prints at the end: the table, where it went, how to open MLflow."""
    lines = ["", res.markdown,
             f"sweep {res.name} finished in {res.wall_s / 60:.1f} min",
             f"  Markdown: {res.paths['markdown']}", f"  Parquet:  {res.paths['parquet']}",
             f"  plot:     {res.paths['plot']}",
             f"  MLflow:   experiment {res.experiment!r}, parent run {res.parent_run_id} (one child run per trial)",
             f"  open the MLflow UI with:  {res.ui_command}",
             f"  then the runs table:      {res.runs_url}"]
    return "\n".join(lines)
