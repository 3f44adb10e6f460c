"""Cluster launcher configs as typed node types: can the trials run there, what will it cost, and the
local rehearsal cluster that stands in for it.

* :class:`ClusterSpec` reads a ``ray up`` config (``cluster/aws.yaml``, ``cluster/gcp.yaml``): worker
  node types with their Ray resources, ``max_workers``, priority, spot or on-demand, and the price
  per node-hour from the config's ``metadata.atss.price_per_node_hour`` (Ray ignores ``metadata``).
* :func:`check_trials` checks every trial's resource bundle against the node types before anything
  starts; Ray would leave a trial no node type can hold pending forever.
* :func:`node_plan` turns a sweep's trials into peak nodes per type, GPU-hours and cost, from the
  throughput table :data:`THROUGHPUT` (images/s per GPU, each figure with its source).
* :func:`rehearsal_config` derives the autoscaling config of the local rehearsal cluster
  (``cluster/local.sh start --like aws``) from a cloud config: the same node types, GPU counts,
  node-class tokens, ``accelerator_type``, ``max_workers`` and priorities, on Ray's fake multi-node
  provider (each "node" is a raylet on this machine, GPUs are resources only), with CPUs scaled to
  this machine and a short idle timeout.

Resource bundles are ``{resource: amount}`` dicts, as Ray's autoscaler sees them
(:meth:`pipeline.resources.TrialResources.node_demand`).
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable, Mapping, Optional, Sequence

import yaml

from pipeline.resources import (
    COMPUTE_ENV,
    CPU_SCALE_ENV,
    DEVICE_ENV,
    NODE_CLASSES,
    TrialResources,
    all_gpu_plans,
)

# The fake multi-node provider names the head node type this way and the head node this id
# (ray.autoscaler._private.fake_multi_node.node_provider); the autoscaler v2 needs both to match.
FAKE_HEAD_NODE_TYPE = "ray.head.default"
FAKE_HEAD_NODE_ID = "fffffffffffffffffffffffffffffffffffffffffffffffffff00000"
# Loaded as an "external" provider: Ray's own "fake_multinode" type needs an example.yaml that the
# wheel does not ship (autoscaler v2 reads defaults from it). The subclass gives each simulated node
# its own runtime-resources directory (pipeline/rehearsal_provider.py says why).
FAKE_PROVIDER_MODULE = "pipeline.rehearsal_provider.RehearsalNodeProvider"
# Names `cluster/local.sh start --like` knows (cluster/<name>.yaml).
LIKE_NAMES = ("aws", "gcp")

_TOKEN_CLASS = {c.custom_resource: c.name for c in NODE_CLASSES.values()}


class ClusterConfigError(ValueError):
    """A cluster config that cannot serve the sweeps (message names the file, field and value)."""


class InfeasibleTrialError(ValueError):
    """A trial that no node type of the cluster can hold."""


def _fmt(res: Mapping[str, float]) -> str:
    return ", ".join(f"{k} {v:g}" for k, v in res.items())


# ----------------------------------------------------------------------------------------------
# the cluster config
# ----------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class NodeType:
    """One ``available_node_types`` entry of a cluster config."""

    name: str
    resources: Mapping[str, float]
    min_workers: int = 0
    max_workers: int = 0
    priority: Optional[int] = None
    idle_timeout_s: Optional[float] = None
    spot: bool = False
    instance_type: Optional[str] = None
    price_per_hour: Optional[float] = None

    @property
    def gpus(self) -> float:
        return self.resources.get("GPU", 0)

    @property
    def cpus(self) -> float:
        return self.resources.get("CPU", 0)

    @property
    def node_class(self) -> Optional[str]:
        """``gpu1``/``gpu8`` from the node-class token it advertises (see pipeline.resources)."""
        classes = [_TOKEN_CLASS[t] for t in self.resources if t in _TOKEN_CLASS]
        return classes[0] if len(classes) == 1 else None

    @property
    def accelerator(self) -> Optional[str]:
        names = [k.split(":", 1)[1] for k in self.resources if k.startswith("accelerator_type:")]
        return names[0] if names else None

    def holds(self, bundle: Mapping[str, float]) -> bool:
        return all(self.resources.get(k, 0) + 1e-9 >= v for k, v in bundle.items())

    def describe(self) -> str:
        kind = f"{self.instance_type}, " if self.instance_type else ""
        return f"{self.name} ({kind}{_fmt(self.resources)})"


@dataclass(frozen=True)
class ClusterSpec:
    """The parts of a ``ray up`` config that decide where trials run and what they cost."""

    source: str
    provider: str
    head: NodeType
    workers: Mapping[str, NodeType]
    max_workers: int
    idle_timeout_minutes: float
    upscaling_speed: float = 1.0
    price_source: str = ""

    @classmethod
    def from_yaml(cls, path: str | Path, prices: Optional[Mapping[str, float]] = None) -> "ClusterSpec":
        """Read a cluster config; ``prices`` (node type -> USD per node-hour) override its metadata."""
        path = Path(path)
        try:
            config = yaml.safe_load(path.read_text())
        except FileNotFoundError:
            raise ClusterConfigError(f"cluster config {path}: no such file") from None
        except yaml.YAMLError as e:
            raise ClusterConfigError(f"cluster config {path}: not valid YAML ({e})") from None
        return cls.from_dict(config, str(path), prices)

    @classmethod
    def from_dict(cls, config: Any, source: str = "<config>",
                  prices: Optional[Mapping[str, float]] = None) -> "ClusterSpec":
        if not isinstance(config, dict):
            raise ClusterConfigError(f"cluster config {source}: expected a mapping, got {type(config).__name__}")
        types = config.get("available_node_types")
        head_name = config.get("head_node_type")
        if not isinstance(types, dict) or not types:
            raise ClusterConfigError(f"cluster config {source}: available_node_types is missing or empty")
        if head_name not in types:
            raise ClusterConfigError(f"cluster config {source}: head_node_type {head_name!r} is not one of "
                                     f"available_node_types ({', '.join(types)})")
        meta = (config.get("metadata") or {}).get("atss") or {}
        listed = dict(meta.get("price_per_node_hour") or {})
        unknown = sorted(set(listed) - set(types))
        if unknown:
            raise ClusterConfigError(f"cluster config {source}: metadata.atss.price_per_node_hour names "
                                     f"unknown node types {unknown}; known: {', '.join(types)}")
        unknown = sorted(set(prices or {}) - set(types))
        if unknown:
            raise ClusterConfigError(f"node price for {unknown}: not a node type of {source}; "
                                     f"known: {', '.join(types)}")
        listed.update(prices or {})
        parsed = {}
        for name, entry in types.items():
            parsed[name] = _node_type(name, entry, source, listed.get(name))
        provider = (config.get("provider") or {}).get("type", "")
        return cls(source=source, provider=provider, head=parsed[head_name],
                   workers={n: t for n, t in parsed.items() if n != head_name},
                   max_workers=int(config.get("max_workers", sum(t.max_workers for t in parsed.values()))),
                   idle_timeout_minutes=float(config.get("idle_timeout_minutes", 5)),
                   upscaling_speed=float(config.get("upscaling_speed", 1.0)),
                   price_source=str(meta.get("price_source", "")))

    def gpu_types(self) -> list[NodeType]:
        return [t for t in self.workers.values() if t.gpus > 0]

    def largest(self) -> NodeType:
        """The worker node type with the most GPUs (then CPUs, then priority): what an error message points to."""
        return max(self.workers.values() or [self.head], key=lambda t: (t.gpus, t.cpus, t.priority or 0))

    def types_for(self, plan: TrialResources) -> list[NodeType]:
        """Worker node types that can hold the trial, the autoscaler's preference first
        (higher priority: spot before on-demand), then the smaller node."""
        demand = plan.node_demand()
        fits = [t for t in self.workers.values() if t.max_workers > 0 and all(t.holds(b) for b in demand)]
        if not plan.use_gpu and all(self.head.holds(b) for b in demand):
            fits.append(self.head)
        return sorted(fits, key=lambda t: (-(t.priority or 0), t.gpus, t.cpus, t.name))


def _node_type(name: str, entry: Any, source: str, price: Any) -> NodeType:
    where = f"cluster config {source}: available_node_types.{name}"
    if not isinstance(entry, dict) or not isinstance(entry.get("resources"), dict):
        raise ClusterConfigError(f"{where}: needs a 'resources' mapping")
    resources = {}
    for k, v in entry["resources"].items():
        if not isinstance(v, (int, float)) or isinstance(v, bool) or v < 0:
            raise ClusterConfigError(f"{where}.resources.{k}: expected a non-negative number, got {v!r}")
        resources[str(k)] = v
    if price is not None and (not isinstance(price, (int, float)) or isinstance(price, bool) or price < 0):
        raise ClusterConfigError(f"{where}: price per node-hour must be a non-negative number, got {price!r}")
    node_config = entry.get("node_config") or {}
    spot = (node_config.get("InstanceMarketOptions", {}).get("MarketType") == "spot"
            or node_config.get("scheduling", {}).get("provisioningModel") == "SPOT"
            or bool(node_config.get("scheduling", {}).get("preemptible")))
    return NodeType(name=name, resources=resources, min_workers=int(entry.get("min_workers", 0)),
                    max_workers=int(entry.get("max_workers", 0)), priority=entry.get("priority"),
                    idle_timeout_s=entry.get("idle_timeout_s"), spot=spot,
                    instance_type=node_config.get("InstanceType") or node_config.get("machineType"),
                    price_per_hour=None if price is None else float(price))


def check_gpu_node_types(spec: ClusterSpec, plans: Optional[Mapping[str, TrialResources]] = None) -> None:
    """A cluster for GPU sweeps: at least one GPU node type, a node type for every node class, and
    every GPU node type holds the largest trial of its class. Raises :class:`ClusterConfigError`."""
    plans = all_gpu_plans() if plans is None else plans
    gpu = spec.gpu_types()
    if not gpu:
        raise ClusterConfigError(
            f"cluster config {spec.source}: no GPU node type (no worker type has resources.GPU > 0; "
            f"worker types: {', '.join(t.describe() for t in spec.workers.values()) or 'none'})")
    for node_class in NODE_CLASSES.values():
        members = [t for t in gpu if t.node_class == node_class.name]
        class_plans = {k: p for k, p in plans.items() if p.node_class == node_class.name}
        if not class_plans:
            continue
        if not members:
            raise ClusterConfigError(
                f"cluster config {spec.source}: no node type of class {node_class.name} (resource "
                f"{node_class.custom_resource}), so trials like {next(iter(class_plans))} could never start")
        biggest_name, biggest = max(class_plans.items(),
                                    key=lambda kv: (kv[1].node_demand()[0].get("GPU", 0),
                                                    kv[1].node_demand()[0].get("CPU", 0)))
        for t in members:
            for bundle in biggest.node_demand():
                if not t.holds(bundle):
                    raise ClusterConfigError(
                        f"cluster config {spec.source}: node type {t.describe()} cannot hold the largest "
                        f"{node_class.name} trial {biggest_name} ({biggest.num_workers} worker(s), "
                        f"needs {_fmt(bundle)} on one node)")


def check_trials(trials: Mapping[str, TrialResources], spec: ClusterSpec) -> dict[str, NodeType]:
    """The node type each trial will get; :class:`InfeasibleTrialError` for the first trial no node
    type can hold (naming the trial, what it asks for and the largest node type)."""
    chosen = {}
    for name, plan in trials.items():
        types = spec.types_for(plan)
        if not types:
            ask = "; ".join(_fmt(b) for b in plan.node_demand()[:1])
            per = _fmt(plan.resources_per_worker())
            raise InfeasibleTrialError(
                f"trial {name}: no node type of {spec.source} can hold it: it asks for {plan.num_workers} "
                f"worker(s) x ({per}) = {ask} on one node; the largest node type is {spec.largest().describe()}")
        chosen[name] = types[0]
    return chosen


# ----------------------------------------------------------------------------------------------
# throughput and the node plan
# ----------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Throughput:
    """Training images per second per GPU of one backbone on one GPU model, and where it comes from."""

    backbone: str
    dcn: bool
    accelerator: str
    images_per_s_per_gpu: float
    source: str
    estimate: bool


# The ATSS README's time per image (ATSS.md 6.1; inference on one V100, FCOS's timing) for the
# models it lists; R-18/34 and plain R-101 1x have no published figure.
_V100_INFERENCE_MS = {
    ("resnet50", False): (44, "ATSS README ATSS_R_50_FPN_1x: 44 ms/img"),
    ("resnet50", True): (54, "ATSS README ATSS_dcnv2_R_50_FPN_1x: 54 ms/img"),
    ("resnet101", False): (57, "ATSS README ATSS_R_101_FPN_2x: 57 ms/img"),
    ("resnet101", True): (73, "ATSS README ATSS_dcnv2_R_101_FPN_2x: 73 ms/img"),
    ("resnext101_32x8d", False): (110, "ATSS README ATSS_X_101_32x8d_FPN_2x: 110 ms/img"),
    ("resnext101_32x8d", True): (143, "ATSS README ATSS_dcnv2_X_101_32x8d_FPN_2x: 143 ms/img"),
    ("resnext101_64x4d", False): (112, "ATSS README ATSS_X_101_64x4d_FPN_2x: 112 ms/img"),
    ("resnext101_64x4d", True): (144, "ATSS README ATSS_dcnv2_X_101_64x4d_FPN_2x: 144 ms/img"),
    # Estimates: R-50's time scaled by the backbones' share of R-50 FPN ATSS FLOPs (the FPN and head,
    # most of the cost at 800x1333, are the same).
    ("resnet18", False): (44 * 0.75, "estimate: R-50 time x 0.75 (lighter backbone, same FPN/head)"),
    ("resnet34", False): (44 * 0.85, "estimate: R-50 time x 0.85 (lighter backbone, same FPN/head)"),
    ("resnet18", True): (54 * 0.75, "estimate: DCN R-50 time x 0.75 (lighter backbone, same FPN/head)"),
    ("resnet34", True): (54 * 0.85, "estimate: DCN R-50 time x 0.85 (lighter backbone, same FPN/head)"),
}
# A training step (forward, backward, update; fp32 as in the paper) costs about three inference passes.
_TRAIN_OVER_INFERENCE = 3.0
# fp32/TF32 training speed relative to a V100 (estimates from the GPUs' dense FP32/TF32 throughput
# and memory bandwidth, not measured here).
_GPU_SPEEDUP = {"V100": (1.0, "V100 (the README's GPU)"),
                "A100": (2.0, "A100 ~2x V100 (TF32 convolutions; estimate)"),
                "L40S": (1.6, "L40S ~1.6x V100 (TF32; estimate)")}


def _throughput_table() -> tuple[Throughput, ...]:
    rows = []
    for (backbone, dcn), (ms, src) in _V100_INFERENCE_MS.items():
        for gpu, (speedup, gpu_src) in _GPU_SPEEDUP.items():
            ips = 1000.0 / (ms * _TRAIN_OVER_INFERENCE) * speedup
            rows.append(Throughput(backbone, dcn, gpu, round(ips, 2),
                                   f"{src}; training = 3 x inference (estimate); {gpu_src}", estimate=True))
    return tuple(rows)


THROUGHPUT: tuple[Throughput, ...] = _throughput_table()


def throughput_for(backbone: str, dcn: bool, accelerator: Optional[str],
                   table: Sequence[Throughput] = THROUGHPUT) -> Throughput:
    for row in table:
        if row.backbone == backbone and row.dcn == dcn and row.accelerator == accelerator:
            return row
    known = sorted({r.accelerator for r in table})
    raise ValueError(f"no throughput figure for {backbone}{' DCN' if dcn else ''} on {accelerator or 'an unnamed GPU'} "
                     f"(known GPU types: {', '.join(known)}); give the node type an accelerator_type:<GPU> resource")


@dataclass(frozen=True)
class PlannedTrial:
    """One trial of a sweep as the node plan needs it."""

    name: str
    resources: TrialResources
    iterations: int


@dataclass
class NodePlan:
    """Peak nodes per node type, node-hours, GPU-hours and cost of a whole sweep."""

    source: str
    rows: list[dict]                      # one per trial: trial, node_type, hours, gpu_hours, cost, figure
    peak_nodes: dict[str, int]
    node_hours: dict[str, float]
    gpu_hours: float
    cost: Optional[float]                 # None when a node type has no price
    wall_hours: float
    missing_prices: list[str] = field(default_factory=list)
    idle_hours: float = 0.0

    def render(self) -> str:
        lines = [f"node plan on {self.source}:"]
        for r in self.rows:
            cost = f"${r['cost']:,.0f}" if r["cost"] is not None else "no price"
            lines.append(f"  {r['trial']}: {r['node_type']} x1, {r['iterations']} it at "
                         f"{r['images_per_s']:.1f} img/s/GPU{' (estimate)' if r['estimate'] else ''} -> "
                         f"{r['hours']:.1f} h, {r['gpu_hours']:.0f} GPU-h, {cost}")
        lines.append("  peak nodes: " + ", ".join(f"{k} {v}" for k, v in self.peak_nodes.items() if v))
        lines.append(f"  total: {sum(self.node_hours.values()):.1f} node-h (incl. {self.idle_hours:.2f} h idle "
                     f"before scale-down), {self.gpu_hours:,.0f} GPU-h, wall {self.wall_hours:.1f} h, cost "
                     + (f"${self.cost:,.0f}" if self.cost is not None else
                        f"unknown (no price for {', '.join(self.missing_prices)}: set "
                        f"metadata.atss.price_per_node_hour in the config or --node-price TYPE=USD)"))
        sources = sorted({r["source"] for r in self.rows})
        lines.append("  throughput sources:")
        lines.extend(f"    - {s}" for s in sources)
        return "\n".join(lines)


def node_plan(trials: Sequence[PlannedTrial], spec: ClusterSpec, max_concurrent: Optional[int] = None,
              table: Sequence[Throughput] = THROUGHPUT) -> NodePlan:
    """Simulate the autoscaler over a sweep: trials start in order (at most ``max_concurrent`` at a
    time), each on a node of its preferred type with room left (``max_workers`` per type and in
    total), a node is reused by the next trial of its type, and each node idles for the type's
    idle timeout before it goes. Durations come from the throughput table."""
    chosen = check_trials({t.name: t.resources for t in trials}, spec)
    rows, durations = [], []
    for t in trials:
        node = chosen[t.name]
        res = t.resources
        fig = throughput_for(res.backbone, res.dcn, node.accelerator, table)
        gpus = res.num_workers * res.gpus_per_worker
        hours = t.iterations * res.global_batch / (fig.images_per_s_per_gpu * gpus) / 3600.0
        rows.append({"trial": t.name, "node_type": node.name, "iterations": t.iterations,
                     "images_per_s": fig.images_per_s_per_gpu, "estimate": fig.estimate, "source": fig.source,
                     "hours": hours, "gpu_hours": hours * node.gpus,
                     "cost": None if node.price_per_hour is None else hours * node.price_per_hour})
        durations.append(hours)

    # Event simulation: (finish time, node type) of running trials; free nodes per type.
    limit = max_concurrent or len(trials)
    running: list[tuple[float, str]] = []
    free: dict[str, int] = {}
    launched: dict[str, int] = {n: 0 for n in spec.workers}
    now = 0.0
    pending = list(range(len(trials)))
    while pending:
        started = False
        for i in list(pending):
            if len(running) >= limit:
                break
            options = spec.types_for(trials[i].resources)
            pick = next((o for o in options if free.get(o.name, 0) > 0), None)
            if pick is None:
                pick = next((o for o in options if launched.get(o.name, 0) < o.max_workers
                             and sum(launched.values()) < spec.max_workers), None)
                if pick is None:
                    continue
                launched[pick.name] = launched.get(pick.name, 0) + 1
            else:
                free[pick.name] -= 1
            rows[i]["node_type"] = pick.name
            running.append((now + durations[i], pick.name))
            pending.remove(i)
            started = True
        if pending and not started:
            if not running:  # nothing can ever start (max_workers 0 everywhere)
                raise InfeasibleTrialError(f"trial {trials[pending[0]].name}: its node types allow no workers")
            running.sort()
            now, name = running.pop(0)
            free[name] = free.get(name, 0) + 1
    wall = max([f for f, _ in running] + [now])
    # Node-hours: per type, what its trials ran plus one idle timeout per node before scale-down.
    node_hours: dict[str, float] = {n: 0.0 for n in spec.workers}
    for r in rows:
        node_hours[r["node_type"]] = node_hours.get(r["node_type"], 0.0) + r["hours"]
    idle = 0.0
    for name, count in launched.items():
        t = spec.workers.get(name)
        timeout_h = ((t.idle_timeout_s if t and t.idle_timeout_s is not None else spec.idle_timeout_minutes * 60)
                     / 3600.0)
        node_hours[name] = node_hours.get(name, 0.0) + count * timeout_h
        idle += count * timeout_h
    for r in rows:  # per-trial cost with the node type actually picked
        node = spec.workers.get(r["node_type"], spec.head)
        r["gpu_hours"] = r["hours"] * node.gpus
        r["cost"] = None if node.price_per_hour is None else r["hours"] * node.price_per_hour
    gpu_hours = sum(h * spec.workers[n].gpus for n, h in node_hours.items() if n in spec.workers)
    missing = sorted(n for n, h in node_hours.items() if h > 0 and spec.workers[n].price_per_hour is None)
    cost = None if missing else sum(h * spec.workers[n].price_per_hour for n, h in node_hours.items() if h > 0)
    return NodePlan(source=spec.source, rows=rows, peak_nodes={n: c for n, c in launched.items()},
                    node_hours=node_hours, gpu_hours=gpu_hours, cost=cost, wall_hours=wall,
                    missing_prices=missing, idle_hours=idle)


def sweep_node_plan(trials: Iterable[Any], spec: ClusterSpec, max_concurrent: Optional[int] = None) -> NodePlan:
    """:func:`node_plan` of a sweep's trials (``pipeline.ablation.TrialConfig``: ``name``,
    ``resources``, ``train.max_iter``); raises :class:`InfeasibleTrialError` first if one cannot run."""
    return node_plan([PlannedTrial(t.name, t.resources, t.train.max_iter) for t in trials], spec, max_concurrent)


def parse_node_prices(items: Iterable[str]) -> dict[str, float]:
    """``["gpu8_spot=12.5", ...]`` (a CLI flag) -> ``{"gpu8_spot": 12.5}``."""
    prices = {}
    for item in items:
        name, sep, value = item.partition("=")
        try:
            price = float(value)
        except ValueError:
            price = -1.0
        if not sep or not name or price < 0:
            raise ClusterConfigError(f"--node-price {item!r}: expected NODE_TYPE=USD_PER_HOUR, e.g. gpu8_spot=12.5")
        prices[name] = price
    return prices


# ----------------------------------------------------------------------------------------------
# the local rehearsal cluster
# ----------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Rehearsal:
    """A rehearsal cluster derived from a cloud config."""

    config: dict                 # the autoscaling config for `ray start --head --autoscaling-config`
    cpu_scale: float             # node CPUs and trial CPUs are multiplied by this
    head_cpus: int
    env: dict                    # what the head (and so every node, job and worker) must export

    def summary(self) -> str:
        lines = [f"rehearsal of {self.config['cluster_name']}: CPUs x {self.cpu_scale:.4g}, idle timeout "
                 f"{self.config['idle_timeout_minutes'] * 60:g} s, compute on CPU (gloo), GPUs simulated"]
        for name, t in self.config["available_node_types"].items():
            if name == FAKE_HEAD_NODE_TYPE:
                continue
            res = {k: v for k, v in t["resources"].items() if k != "object_store_memory"}
            lines.append(f"  {name}: {_fmt(res)}; max_workers {t['max_workers']}, priority {t.get('priority', '-')}")
        return "\n".join(lines)


def resolve_like(like: str, cluster_dir: str | Path) -> Path:
    """``aws``/``gcp`` -> ``cluster/<name>.yaml``; a path to a ``.yaml`` file is taken as it is."""
    if like in LIKE_NAMES:
        return Path(cluster_dir) / f"{like}.yaml"
    if like.endswith((".yaml", ".yml")):
        if not Path(like).is_file():
            raise ClusterConfigError(f"--like {like}: no such file")
        return Path(like)
    raise ClusterConfigError(f"--like {like!r}: unknown; use one of {', '.join(LIKE_NAMES)} or a path to a "
                             f"cluster config (.yaml)")


def rehearsal_config(spec: ClusterSpec, *, gcs_address: str, cores: int = 2, idle_timeout_s: float = 20,
                     object_store_mb: int = 100, plans: Optional[Mapping[str, TrialResources]] = None) -> Rehearsal:
    """The autoscaling config of a local cluster shaped like ``spec``.

    Kept: node type names, GPU counts, node-class tokens (``gpu_1x``/``gpu_8x``), ``accelerator_type:*``,
    other custom resources, ``min_workers``/``max_workers``, priorities, the cluster's ``max_workers``
    and ``upscaling_speed``. Changed: CPUs times ``cores / (largest worker CPUs)``, rounded up to whole
    CPUs (Ray's config wants integers; rounding up never makes a fitting trial stop fitting);
    idle timeouts shortened to ``idle_timeout_s`` (per-type timeouts keep their ratio to the global
    one); a small object store per node. Checks first that the config serves GPU sweeps
    (:func:`check_gpu_node_types`) and that every plan, CPUs scaled, fits its node class's types.
    """
    plans = all_gpu_plans() if plans is None else plans
    check_gpu_node_types(spec, plans)
    if cores < 1:
        raise ClusterConfigError(f"cores must be >= 1, got {cores}")
    if idle_timeout_s <= 0:
        raise ClusterConfigError(f"idle timeout must be > 0 s, got {idle_timeout_s}")
    biggest_cpus = max(t.cpus for t in spec.workers.values())
    scale = min(1.0, cores / biggest_cpus) if biggest_cpus else 1.0
    global_s = spec.idle_timeout_minutes * 60

    def scaled(res: Mapping[str, float]) -> dict:
        out = {k: v for k, v in res.items() if k != "CPU" and not (k == "GPU" and v == 0)}
        out["CPU"] = max(1, math.ceil(res.get("CPU", 0) * scale - 1e-9))
        return out

    types: dict[str, dict] = {FAKE_HEAD_NODE_TYPE: {"resources": scaled(spec.head.resources), "node_config": {},
                                                    "max_workers": 0}}
    for name, t in spec.workers.items():
        entry = {"resources": {**scaled(t.resources), "object_store_memory": object_store_mb * 1024 * 1024},
                 "node_config": {}, "min_workers": t.min_workers, "max_workers": t.max_workers}
        if t.priority is not None:
            entry["priority"] = t.priority
        if t.idle_timeout_s is not None and global_s:
            entry["idle_timeout_s"] = max(1, round(idle_timeout_s * t.idle_timeout_s / global_s))
        types[name] = entry
    local = ClusterSpec(source=f"the rehearsal of {spec.source}", provider="fake_multinode",
                        head=_node_type(FAKE_HEAD_NODE_TYPE, types[FAKE_HEAD_NODE_TYPE], "rehearsal", None),
                        workers={n: _node_type(n, e, "rehearsal", None) for n, e in types.items()
                                 if n != FAKE_HEAD_NODE_TYPE},
                        max_workers=spec.max_workers, idle_timeout_minutes=idle_timeout_s / 60)
    scaled_plans = {k: p.scale_cpus(scale) for k, p in plans.items()}
    check_gpu_node_types(local, scaled_plans)
    check_trials(scaled_plans, local)
    config = {
        "cluster_name": f"rehearsal-{Path(spec.source).stem}",
        "max_workers": spec.max_workers,
        "upscaling_speed": spec.upscaling_speed,
        "idle_timeout_minutes": idle_timeout_s / 60,
        "provider": {"type": "external", "module": FAKE_PROVIDER_MODULE, "gcs_address": gcs_address,
                     "head_node_id": FAKE_HEAD_NODE_ID, "launch_multiple": True,
                     "disable_launch_config_check": True, "disable_node_updaters": True},
        "auth": {"ssh_user": "ubuntu"},
        "available_node_types": types,
        "head_node_type": FAKE_HEAD_NODE_TYPE,
        "file_mounts": {}, "cluster_synced_files": [], "file_mounts_sync_continuously": False,
        "initialization_commands": [], "setup_commands": [], "head_setup_commands": [],
        "worker_setup_commands": [], "head_start_ray_commands": [], "worker_start_ray_commands": [],
    }
    env = {DEVICE_ENV: "gpu", COMPUTE_ENV: "cpu", CPU_SCALE_ENV: repr(scale)}
    return Rehearsal(config=config, cpu_scale=scale, head_cpus=types[FAKE_HEAD_NODE_TYPE]["resources"]["CPU"],
                     env=env)


def main(argv: Optional[Sequence[str]] = None) -> int:
    """``python -m pipeline.cluster rehearsal --like aws --gcs-address IP:PORT --out cfg.yaml``
    (used by cluster/local.sh): writes the config, prints ``KEY=VALUE`` lines for the head's
    environment, then the summary as ``# `` comments. Bad input: exit 2."""
    import argparse
    import sys

    p = argparse.ArgumentParser(prog="python -m pipeline.cluster")
    sub = p.add_subparsers(dest="command", required=True)
    r = sub.add_parser("rehearsal", help="write the rehearsal cluster's autoscaling config")
    r.add_argument("--like", required=True, help=f"{' | '.join(LIKE_NAMES)} | path/to/cluster.yaml")
    r.add_argument("--cluster-dir", default=str(Path(__file__).resolve().parents[1] / "cluster"))
    r.add_argument("--gcs-address", required=True)
    r.add_argument("--cores", type=int, default=2)
    r.add_argument("--idle-timeout-s", type=float, default=20)
    r.add_argument("--object-store-mb", type=int, default=100)
    r.add_argument("--out", required=True)
    args = p.parse_args(argv)
    try:
        spec = ClusterSpec.from_yaml(resolve_like(args.like, args.cluster_dir))
        rehearsal = rehearsal_config(spec, gcs_address=args.gcs_address, cores=args.cores,
                                     idle_timeout_s=args.idle_timeout_s, object_store_mb=args.object_store_mb)
    except (ClusterConfigError, InfeasibleTrialError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    Path(args.out).write_text(yaml.safe_dump(rehearsal.config, sort_keys=False))
    for k, v in rehearsal.env.items():
        print(f"{k}={v}")
    print(f"HEAD_CPUS={rehearsal.head_cpus}")
    print("\n".join(f"# {line}" for line in rehearsal.summary().splitlines()))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
