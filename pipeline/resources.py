"""What one training trial needs from the cluster, per backbone (the paper's Table 8 models).

The cluster configs (``cluster/aws.yaml``, ``cluster/gcp.yaml``, ``cluster/kuberay/``) offer two
GPU node classes. Each advertises a custom Ray resource, one unit per GPU, that no other node has:

==========  =====================  ==========================================================
class       custom resource        node
==========  =====================  ==========================================================
``gpu1``    ``gpu_1x``: 1          one GPU with >= 48 GB (AWS g6e: L40S; GCP a2-ultragpu-1g)
``gpu8``    ``gpu_8x``: 8          eight 40 GB A100s (AWS p4d.24xlarge; GCP a2-highgpu-8g)
==========  =====================  ==========================================================

Every Ray Train worker of a trial asks for one GPU *and* one unit of its class's resource, so a
ResNeXt-101 or DCN trial can only be placed on an 8-GPU node, and while it is pending the
autoscaler launches exactly that node type; an R-50 k-sweep trial only fits a 1-GPU node and
never occupies (or holds back) a slot of an 8-GPU node.

The paper trains with 16 images per iteration in total (ATSS.md 5.1: 2 per GPU on 8 GPUs). The
8-GPU plans keep that split; the 1-GPU plans put all 16 images on one GPU, which is why that class
needs a 48 GB card (mmdetection measured 3.7 GB for R-50 and 5.6 GB for R-101 at 2 images per GPU,
ATSS.md 6.2, so 16 images of R-101 at 800x1333 need roughly 40 GB).

The trial itself (the Tune function that builds the ``TorchTrainer``) is pinned to the head node
with a token request, so a preempted spot GPU node never takes a trial's driver down with it; Tune
does not reserve the Train workers' resources (Ray Train V2 creates its own placement group).

Usage in a sweep::

    plan = plan_for("resnext101_64x4d", dcn=True)          # or plan_for("X-64x4d-DCN")
    trainable = tune.with_resources(trial_fn, plan.trial_resources())
    ...inside trial_fn: TorchTrainer(loop, scaling_config=ScalingConfig(**plan.scaling_config_kwargs()))

On a CPU-only machine (tests, the local cluster) use :func:`cpu_plan`; :func:`resolve_device`
picks between the two from the cluster's declaration (``ATSS_TRIAL_DEVICE``, set by the cluster
configs) or the GPUs Ray currently sees.

The local rehearsal cluster (``cluster/local.sh start --like aws``, :mod:`pipeline.cluster`) runs
GPU plans on simulated GPUs. Its head declares two more things, and only these differ from a
real cluster:

* ``ATSS_COMPUTE_DEVICE=cpu``: tensors stay on the CPU and DDP uses gloo although each worker
  holds a (simulated) GPU. :func:`compute_device` is the one place that decides; without the
  declaration a GPU worker that finds no CUDA is an error, never a silent CPU fallback.
* ``ATSS_CPU_SCALE``: node types advertise their CPUs times this factor (2 cores cannot hold a
  96-CPU node), so trial plans scale their CPUs by the same factor (:meth:`TrialResources.scale_cpus`),
  which keeps every trial's share of its node, and so what fits where, unchanged.
"""
from __future__ import annotations

import dataclasses
import math
import os
import re
from dataclasses import dataclass
from typing import Any, ClassVar, Mapping

from detector.config import BACKBONES
from detector.fields import Rule, check_fields

# Ray's built-in resource that only the head node has (Ray Train pins its own state actor with it).
HEAD_NODE_RESOURCE = "node:__internal_head__"
# Environment variable the cluster configs set on the head node: "gpu" or "cpu".
DEVICE_ENV = "ATSS_TRIAL_DEVICE"
# Where a worker computes ("cuda" or "cpu"), declared by the rehearsal cluster (CPU on simulated GPUs).
COMPUTE_ENV = "ATSS_COMPUTE_DEVICE"
# Factor the rehearsal cluster applied to every node type's CPUs (trials scale theirs alike).
CPU_SCALE_ENV = "ATSS_CPU_SCALE"
# Ray accounts resources in units of 1e-4.
_RESOURCE_QUANTUM = 10_000


@dataclass(frozen=True)
class NodeClass:
    """One GPU node class of the cluster configs.

    ``custom_resource`` is advertised with ``gpus_per_node`` units (one per GPU) by every node type
    of this class and by no other node type.
    """

    name: str
    custom_resource: str
    gpus_per_node: int
    cpus_per_node: int
    min_gpu_memory_gb: int
    # accelerator_type the AWS/GCP node types of this class advertise (Ray's
    # "accelerator_type:<name>" resource); None where the class allows several GPU models.
    accelerator_type: str | None


NODE_CLASSES: dict[str, NodeClass] = {
    "gpu1": NodeClass("gpu1", "gpu_1x", gpus_per_node=1, cpus_per_node=8,
                      min_gpu_memory_gb=48, accelerator_type=None),
    "gpu8": NodeClass("gpu8", "gpu_8x", gpus_per_node=8, cpus_per_node=96,
                      min_gpu_memory_gb=40, accelerator_type="A100"),
}


@dataclass(frozen=True)
class TrialResources:
    """Resources of one training trial: ``num_workers`` Ray Train workers, one GPU each on GPU plans.

    ``batch_per_worker`` is images per worker per iteration (per GPU on GPU plans); the paper's
    global batch is ``num_workers * batch_per_worker`` = 16. ``node_class`` is ``None`` for CPU plans.
    """

    backbone: str
    dcn: bool
    num_workers: int
    cpus_per_worker: float
    gpus_per_worker: int
    batch_per_worker: int
    node_class: str | None = None

    # What each field allows beyond its annotated type (detector.fields checks both).
    RULES: ClassVar[Mapping[str, Rule]] = {
        "backbone": Rule(choices=BACKBONES),
        "num_workers": Rule(ge=1),
        "cpus_per_worker": Rule(gt=0),
        "gpus_per_worker": Rule(ge=0),
        "batch_per_worker": Rule(ge=1),
    }

    def __post_init__(self):
        check_fields(self)
        if self.node_class is None:
            if self.gpus_per_worker != 0:
                raise ValueError("a CPU plan (node_class=None) cannot ask for GPUs")
            return
        if self.node_class not in NODE_CLASSES:
            raise ValueError(f"unknown node_class {self.node_class!r}; known: {sorted(NODE_CLASSES)}")
        node = NODE_CLASSES[self.node_class]
        if self.gpus_per_worker != 1:
            raise ValueError(f"GPU plans use one GPU per worker, got gpus_per_worker={self.gpus_per_worker}")
        if self.num_workers > node.gpus_per_node:
            raise ValueError(
                f"{self.num_workers} workers do not fit one {node.name} node "
                f"({node.gpus_per_node} GPUs); trials never span nodes")
        if self.num_workers * self.cpus_per_worker > node.cpus_per_node:
            raise ValueError(
                f"{self.num_workers} x {self.cpus_per_worker} CPUs exceed a {node.name} node's "
                f"{node.cpus_per_node} CPUs")

    @property
    def use_gpu(self) -> bool:
        return self.gpus_per_worker > 0

    @property
    def global_batch(self) -> int:
        return self.num_workers * self.batch_per_worker

    @property
    def accelerator_type(self) -> str | None:
        return NODE_CLASSES[self.node_class].accelerator_type if self.node_class else None

    @property
    def min_gpu_memory_gb(self) -> int | None:
        return NODE_CLASSES[self.node_class].min_gpu_memory_gb if self.node_class else None

    def resources_per_worker(self) -> dict[str, float]:
        """The Ray resource bundle of one Train worker (the node class's token included)."""
        res: dict[str, float] = {"CPU": self.cpus_per_worker}
        if self.node_class is not None:
            res["GPU"] = self.gpus_per_worker
            res[NODE_CLASSES[self.node_class].custom_resource] = self.gpus_per_worker
        return res

    def scaling_config_kwargs(self) -> dict[str, Any]:
        """Keyword arguments for ``ray.train.ScalingConfig``.

        Multi-worker GPU plans use ``STRICT_PACK`` so all workers share one node (NVLink, one
        placement-group demand the autoscaler turns into one node of the class).
        """
        return {
            "num_workers": self.num_workers,
            "use_gpu": self.use_gpu,
            "resources_per_worker": self.resources_per_worker(),
            "placement_strategy": "STRICT_PACK" if self.use_gpu and self.num_workers > 1 else "PACK",
        }

    def scaling_config(self):
        """A ``ray.train.ScalingConfig`` for this plan (imports Ray Train)."""
        from ray.train import ScalingConfig

        return ScalingConfig(**self.scaling_config_kwargs())

    def trial_resources(self) -> dict[str, float]:
        """The request for ``tune.with_resources`` of the trial function (the Train driver).

        Only a token share of the head node: the driver waits on ``fit()``, and the workers'
        bundles are reserved by Ray Train itself, never by Tune (reserving them twice deadlocks).
        """
        return {HEAD_NODE_RESOURCE: 0.001}

    def total_resources(self) -> dict[str, float]:
        """Everything the trial holds while training (driver and all workers)."""
        total: dict[str, float] = dict(self.trial_resources())
        for key, value in self.resources_per_worker().items():
            total[key] = total.get(key, 0) + value * self.num_workers
        return total

    def node_demand(self) -> list[dict[str, float]]:
        """The bundles that must each land on one node, as the autoscaler sees them.

        ``STRICT_PACK`` (multi-worker GPU plans) is one bundle: the sum over workers. Otherwise one
        bundle per worker. The node class's ``accelerator_type`` is part of each bundle (Ray Train
        asks for a sliver of ``accelerator_type:<name>`` when ``accelerator_type`` is set).
        """
        per_worker = dict(self.resources_per_worker())
        if self.accelerator_type:
            per_worker[f"accelerator_type:{self.accelerator_type}"] = 0.001
        if self.scaling_config_kwargs()["placement_strategy"] == "STRICT_PACK":
            return [{k: v * self.num_workers for k, v in per_worker.items()}]
        return [dict(per_worker) for _ in range(self.num_workers)]

    def scale_cpus(self, factor: float) -> "TrialResources":
        """A copy whose workers ask for ``cpus_per_worker * factor`` CPUs (rounded up to Ray's 1e-4 unit).

        The rehearsal cluster scales its node types' CPUs by the same factor, so a trial keeps its
        share of a node. ``factor`` 1 returns the plan unchanged.
        """
        if not (isinstance(factor, (int, float)) and 0 < factor <= 1):
            raise ValueError(f"CPU scale must be in (0, 1], got {factor!r}")
        if factor == 1:
            return self
        cpus = math.ceil(self.cpus_per_worker * factor * _RESOURCE_QUANTUM - 1e-6) / _RESOURCE_QUANTUM
        return self.replace(cpus_per_worker=cpus)

    def replace(self, **changes) -> "TrialResources":
        """A copy with fields changed (validated like the constructor)."""
        return dataclasses.replace(self, **changes)

    def to_dict(self) -> dict[str, Any]:
        """Flat description for logging (e.g. as MLflow params)."""
        out = dataclasses.asdict(self)
        out.update(global_batch=self.global_batch, accelerator_type=self.accelerator_type,
                   min_gpu_memory_gb=self.min_gpu_memory_gb)
        return out


# Which node class trains which backbone, and how the 16 images are split.
# ResNeXt-101 and DCN R-50/101 are the paper's Table 8 "8 GPUs for days" models.
_ONE_GPU = dict(node_class="gpu1", num_workers=1, cpus_per_worker=6, batch_per_worker=16)
_EIGHT_GPU = dict(node_class="gpu8", num_workers=8, cpus_per_worker=10, batch_per_worker=2)
_GPU_TABLE: dict[tuple[str, bool], dict] = {
    ("resnet18", False): _ONE_GPU, ("resnet18", True): _ONE_GPU,
    ("resnet34", False): _ONE_GPU, ("resnet34", True): _ONE_GPU,
    ("resnet50", False): _ONE_GPU, ("resnet50", True): _EIGHT_GPU,
    ("resnet101", False): _ONE_GPU, ("resnet101", True): _EIGHT_GPU,
    ("resnext101_32x8d", False): _EIGHT_GPU, ("resnext101_32x8d", True): _EIGHT_GPU,
    ("resnext101_64x4d", False): _EIGHT_GPU, ("resnext101_64x4d", True): _EIGHT_GPU,
}

# The paper's names (Table 8 rows, model zoo) -> (torchvision backbone name, dcn).
_PAPER_NAMES = {
    "r-18": "resnet18", "r-34": "resnet34", "r-50": "resnet50", "r-101": "resnet101",
    "x-101-32x8d": "resnext101_32x8d", "x-101-64x4d": "resnext101_64x4d",
    "x-32x8d": "resnext101_32x8d", "x-64x4d": "resnext101_64x4d",
}


def parse_backbone(name: str, dcn: bool = False) -> tuple[str, bool]:
    """Normalise a backbone name to ``(torchvision name, dcn)``.

    Accepts torchvision names (``resnext101_64x4d``) and the paper's (``R-101``, ``X-101-64x4d``,
    ``R-101-DCN``, ``X-64x4d-DCN``, ``dcnv2_R_101``); a ``DCN`` marker in the name sets ``dcn``.
    """
    if not isinstance(name, str) or not name.strip():
        raise ValueError(f"backbone name must be a non-empty string, got {name!r}")
    key = name.strip().lower().replace("_", "-")
    if re.search(r"(^|-)dcn(v2)?(-|$)", key):
        dcn = True
        key = re.sub(r"(^|-)dcn(v2)?(?=-|$)", "", key).strip("-")
    if key in _PAPER_NAMES:
        return _PAPER_NAMES[key], dcn
    torchvision_name = key.replace("-", "_")
    if torchvision_name in BACKBONES:
        return torchvision_name, dcn
    raise ValueError(
        f"unknown backbone {name!r}; known: {', '.join(BACKBONES)} "
        f"or the paper's names ({', '.join(sorted(_PAPER_NAMES))}, with -DCN)")


def plan_for(backbone: str, dcn: bool = False, **overrides) -> TrialResources:
    """The GPU plan for one trial of ``backbone`` (paper name or torchvision name).

    ``overrides`` replace fields of the plan (e.g. ``batch_per_worker=8``) and are validated.
    """
    name, dcn = parse_backbone(backbone, dcn)
    fields = dict(_GPU_TABLE[(name, dcn)], gpus_per_worker=1)
    fields.update(overrides)
    return TrialResources(backbone=name, dcn=dcn, **fields)


def cpu_plan(backbone: str = "resnet18", dcn: bool = False, *, num_workers: int = 1,
             cpus_per_worker: float = 1, batch_per_worker: int = 2) -> TrialResources:
    """A CPU plan (no GPU, no node-class token): tests, smoke sweeps and the local cluster."""
    name, dcn = parse_backbone(backbone, dcn)
    return TrialResources(backbone=name, dcn=dcn, num_workers=num_workers,
                          cpus_per_worker=cpus_per_worker, gpus_per_worker=0,
                          batch_per_worker=batch_per_worker, node_class=None)


def resolve_device(device: str = "auto", cluster_resources: Mapping[str, float] | None = None) -> str:
    """``"gpu"`` or ``"cpu"``: which kind of plan trials on this cluster should use.

    ``"auto"`` takes the cluster's declaration (``ATSS_TRIAL_DEVICE`` in the environment, set on the
    head node by the cluster configs, so an autoscaling cluster that starts with zero GPU nodes
    still counts as a GPU cluster), else ``"gpu"`` when ``cluster_resources`` (default: Ray's, if
    Ray is initialised) contains a GPU, else ``"cpu"``.
    """
    if device in ("gpu", "cpu"):
        return device
    if device != "auto":
        raise ValueError(f"device must be 'auto', 'gpu' or 'cpu', got {device!r}")
    declared = os.environ.get(DEVICE_ENV, "").strip().lower()
    if declared:
        if declared not in ("gpu", "cpu"):
            raise ValueError(f"{DEVICE_ENV} must be 'gpu' or 'cpu', got {declared!r}")
        return declared
    if cluster_resources is None:
        import ray

        cluster_resources = ray.cluster_resources() if ray.is_initialized() else {}
    return "gpu" if cluster_resources.get("GPU", 0) > 0 else "cpu"


def local_gpu_count(env: Mapping[str, str] | None = None, driver_dir: str = "/proc/driver/nvidia/gpus") -> int:
    """The GPUs a Ray cluster started on this machine registers, without loading torch or CUDA:
    the devices ``CUDA_VISIBLE_DEVICES`` names when it is set (as Ray and torch read it), else the
    NVIDIA driver's device list (none without the driver)."""
    env = os.environ if env is None else env
    visible = env.get("CUDA_VISIBLE_DEVICES")
    if visible is not None:
        return len([d for d in visible.split(",") if d.strip() and d.strip() != "-1"])
    try:
        return len(os.listdir(driver_dir))
    except OSError:
        return 0


def declared_cpu_scale(env: Mapping[str, str] | None = None) -> float:
    """The CPU scale the cluster declares (``ATSS_CPU_SCALE``; 1 when unset, i.e. a real cluster)."""
    raw = (os.environ if env is None else env).get(CPU_SCALE_ENV, "").strip()
    if not raw:
        return 1.0
    try:
        value = float(raw)
    except ValueError:
        value = float("nan")
    if not 0 < value <= 1:
        raise ValueError(f"{CPU_SCALE_ENV} must be a number in (0, 1], got {raw!r}")
    return value


def declared_compute_device(env: Mapping[str, str] | None = None) -> str | None:
    """``"cpu"`` or ``"cuda"`` when the cluster declares where workers compute (``ATSS_COMPUTE_DEVICE``), else None."""
    raw = (os.environ if env is None else env).get(COMPUTE_ENV, "").strip().lower()
    if not raw:
        return None
    if raw not in ("cpu", "cuda"):
        raise ValueError(f"{COMPUTE_ENV} must be 'cpu' or 'cuda', got {raw!r}")
    return raw


def compute_device(use_gpu: bool, cuda_available: bool, env: Mapping[str, str] | None = None) -> str:
    """Where a training worker computes: ``"cuda"`` or ``"cpu"``.

    A worker that holds GPUs (``use_gpu``) computes on CUDA unless the cluster declares
    ``ATSS_COMPUTE_DEVICE=cpu`` (the rehearsal cluster: GPU-shaped trials on simulated GPUs, gloo
    instead of NCCL). A GPU worker without CUDA and without that declaration is an error: a
    silent fallback would run a real sweep on CPUs for days.
    """
    declared = declared_compute_device(env)
    if declared == "cpu":
        return "cpu"
    if declared == "cuda" or use_gpu:
        if not cuda_available:
            raise RuntimeError(
                f"this worker {'holds GPUs' if use_gpu else 'was told to use CUDA'} but torch finds no CUDA "
                f"device (CUDA_VISIBLE_DEVICES={os.environ.get('CUDA_VISIBLE_DEVICES')!r}); to run "
                f"GPU-shaped trials on CPU on purpose (the local rehearsal cluster), set {COMPUTE_ENV}=cpu")
        return "cuda"
    return "cpu"


def torch_backend(use_gpu: bool, env: Mapping[str, str] | None = None) -> str:
    """The ``torch.distributed`` backend for a trial's workers: NCCL on CUDA, gloo on CPU."""
    return "nccl" if use_gpu and declared_compute_device(env) != "cpu" else "gloo"


def placement_tags(env: Mapping[str, str] | None = None) -> dict[str, str]:
    """Where this Ray worker runs, for its MLflow run: node id, node type and compute device.

    The node type is the autoscaler's name for it (``RAY_NODE_TYPE_NAME``, which the cluster
    launcher and the rehearsal's node provider set on every node they start); empty elsewhere.
    """
    import ray

    env = os.environ if env is None else env
    return {"ray.node_id": ray.get_runtime_context().get_node_id(),
            "ray.node_type": env.get("RAY_NODE_TYPE_NAME", ""),
            "atss.compute_device": declared_compute_device(env) or ("cuda" if ray.get_gpu_ids() else "cpu")}


def all_gpu_plans() -> dict[str, TrialResources]:
    """The GPU plan of every backbone, with and without DCN, keyed by a readable label."""
    return {f"{name}{'-dcn' if dcn else ''}": plan_for(name, dcn) for name, dcn in _GPU_TABLE}


def table8_plans() -> dict[str, TrialResources]:
    """The plan of every ATSS row of the paper's Table 8, keyed by the row's name."""
    rows = ("R-101", "X-101-32x8d", "X-101-64x4d", "R-101-DCN", "X-32x8d-DCN", "X-64x4d-DCN")
    return {row: plan_for(row) for row in rows}
