"""What a run's numbers depend on, recorded with every run: MLflow params and tags, and the footer
of a results table.

The same seed gives the same weights on one machine whatever its load, but not on another CPU
type: torch, oneDNN and MKL pick their kernels by the instruction set they find (torch's "CPU
capability": AVX2, AVX512, ...), and kernels of different vector widths sum in different orders.
Threads per worker change reduction orders too, and the data changes everything. An
:class:`Environment` names all of these, so two tables that differ can be told apart:

* the CPU (model, family/model numbers, its SIMD flags, the capability torch uses) and the GPU;
* torch / torchvision / CUDA / cuDNN versions and Python;
* threads per worker, deterministic-algorithm settings, and the environment variables that force
  kernels or thread counts (``ATEN_CPU_CAPABILITY``, ``ONEDNN_MAX_CPU_ISA``, ``MKL_CBWR``, ...);
* the data's :class:`DataFingerprint`: the synthetic generator's version, spec and seed, or a
  hash of the annotation files.

:func:`collect_environment` runs where the numbers are made (the training worker), since threads,
device and CPU are those of that process. The class itself and its ``from_tags`` /
:func:`environment_footer` need neither torch nor the data, so a driver can read recorded
environments back cheaply.
"""
from __future__ import annotations

import functools
import hashlib
import json
import os
import platform
from collections.abc import Iterable, Mapping
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Optional

from .data.config import DataConfig
from .data.sources import resolve_split, synthetic_spec
from .synthetic import GENERATOR_VERSION, SyntheticSpec

__all__ = ["DataFingerprint", "Environment", "collect_environment", "cpu_description", "data_fingerprint",
           "environment_footer", "SIMD_FLAGS", "KERNEL_ENV_VARS"]

# The /proc/cpuinfo flags that decide which vector kernels exist (x86, then Arm).
SIMD_FLAGS = ("sse4_2", "avx", "avx2", "fma", "f16c", "avx_vnni", "avx512f", "avx512bw", "avx512vl",
              "avx512_vnni", "avx512_bf16", "avx512_fp16", "amx_tile", "amx_bf16", "amx_int8",
              "asimd", "asimdhp", "sve", "sve2", "bf16", "i8mm")
# Environment variables that force kernels, their numerics or thread counts.
KERNEL_ENV_VARS = ("ATEN_CPU_CAPABILITY", "ONEDNN_MAX_CPU_ISA", "DNNL_MAX_CPU_ISA", "MKL_CBWR",
                   "MKL_ENABLE_INSTRUCTIONS", "OMP_NUM_THREADS", "MKL_NUM_THREADS", "CUBLAS_WORKSPACE_CONFIG")
PREFIX = "env."
_HASH_CHUNK = 1 << 20


@dataclass(frozen=True)
class DataFingerprint:
    """What the data was: ``kind`` ("synthetic" or "files"), a 16-hex ``digest`` that changes when
    the data does, and a readable ``detail`` (generator version, spec and seed; or file names and hashes)."""

    kind: str
    digest: str
    detail: str

    def __post_init__(self) -> None:
        if self.kind not in ("synthetic", "files"):
            raise ValueError(f"DataFingerprint.kind must be 'synthetic' or 'files', got {self.kind!r}")

    @classmethod
    def of_synthetic(cls, spec: SyntheticSpec) -> "DataFingerprint":
        """The generator's version and every spec field (seed included) define the images byte for byte."""
        return cls("synthetic", spec.key(),
                   f"synthetic generator v{GENERATOR_VERSION}, seed {spec.seed}, {spec.num_train} train / "
                   f"{spec.num_val} val images, {spec.num_classes} classes, spec {spec.key()}")

    @classmethod
    def of_files(cls, files: Mapping[str, str | os.PathLike]) -> "DataFingerprint":
        """SHA-256 of each annotation file (``{"train": path, "val": path}``); images are named by them."""
        if not files:
            raise ValueError("DataFingerprint.of_files needs at least one annotation file")
        parts = []
        for split, path in sorted(files.items()):
            p = Path(path)
            try:
                st = p.stat()
            except OSError as e:
                raise FileNotFoundError(f"annotation file of split {split!r} not found: {p} ({e})") from e
            parts.append((split, p.name, _file_sha256(str(p.resolve()), st.st_size, st.st_mtime_ns)))
        digest = hashlib.sha256("\n".join(":".join(x) for x in parts).encode()).hexdigest()[:16]
        return cls("files", digest, ", ".join(f"{s} {name} sha256:{h[:12]}" for s, name, h in parts))


@functools.lru_cache(maxsize=32)
def _file_sha256(path: str, size: int, mtime_ns: int) -> str:
    # size and mtime are part of the cache key: a rewritten file is hashed again.
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(_HASH_CHUNK):
            h.update(chunk)
    return h.hexdigest()


def data_fingerprint(cfg: DataConfig) -> DataFingerprint:
    """The fingerprint of a :class:`~pipeline.data.DataConfig`'s train and val data (test has no labels).

    Synthetic data is not generated for this: its spec defines it. For files, the splits the
    config names are hashed (a ``files`` source may name only some).
    """
    if cfg.source == "synthetic":
        return DataFingerprint.of_synthetic(synthetic_spec(cfg))
    files = {}
    for split in ("train", "val"):
        if cfg.source == "files" and not getattr(cfg, f"{split}_ann"):
            continue
        files[split] = resolve_split(cfg, split)[0]
    return DataFingerprint.of_files(files)


def _cpuinfo() -> dict[str, str]:
    """The first processor's fields of /proc/cpuinfo (empty where there is none)."""
    info: dict[str, str] = {}
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return info
    for line in text.splitlines():
        if not line.strip():
            if info:
                break
            continue
        key, _, value = line.partition(":")
        info.setdefault(key.strip(), value.strip())
    return info


def cpu_description(info: Optional[Mapping[str, str]] = None) -> tuple[str, tuple[str, ...]]:
    """(CPU model with vendor family/model/stepping, its :data:`SIMD_FLAGS`) of this machine.

    Cloud VMs often show a bare "AMD EPYC": the family and model numbers still tell generations apart.
    """
    info = _cpuinfo() if info is None else info
    name = info.get("model name") or info.get("Model name") or platform.processor() or platform.machine()
    ids = [f"{k} {info[k]}" for k in ("cpu family", "model", "stepping") if k in info]
    if "CPU part" in info:  # Arm
        ids = [f"implementer {info.get('CPU implementer', '?')}", f"part {info['CPU part']}"]
    model = f"{name} ({', '.join(ids)})" if ids else name
    present = set((info.get("flags") or info.get("Features") or "").split())
    return model, tuple(f for f in SIMD_FLAGS if f in present)


@dataclass(frozen=True)
class Environment:
    """Everything besides the config and seed that a run's numbers depend on.

    ``cpu_capability`` is the kernel set torch dispatches to (``torch.backends.cpu.get_cpu_capability()``);
    ``threads`` / ``interop_threads`` are the worker's torch thread counts; ``gpu`` is None on CPU runs;
    ``cuda`` / ``cudnn`` are the versions torch was built with; ``kernel_env`` holds those
    :data:`KERNEL_ENV_VARS` that were set.
    """

    cpu: str
    cpu_flags: tuple[str, ...]
    cpu_capability: str
    cpus: int
    gpu: Optional[str]
    torch: str
    torchvision: str
    cuda: Optional[str]
    cudnn: Optional[str]
    python: str
    threads: int
    interop_threads: int
    deterministic: bool
    cudnn_deterministic: bool
    cudnn_benchmark: bool
    kernel_env: Mapping[str, str] = field(default_factory=dict)
    data: Optional[DataFingerprint] = None

    def key(self) -> str:
        """16 hex digits over every field: equal keys, same numbers for the same config and seed."""
        return hashlib.sha256(json.dumps(self.to_dict(), sort_keys=True).encode()).hexdigest()[:16]

    def to_dict(self) -> dict:
        d = asdict(self)
        d["cpu_flags"] = list(self.cpu_flags)
        d["kernel_env"] = dict(self.kernel_env)
        return d

    @classmethod
    def from_dict(cls, d: Mapping) -> "Environment":
        d = dict(d)
        d["cpu_flags"] = tuple(d["cpu_flags"])
        d["data"] = DataFingerprint(**d["data"]) if d.get("data") else None
        return cls(**d)

    def to_params(self) -> dict[str, str]:
        """The few MLflow params that tell runs' numbers apart (columns of the runs table)."""
        return {PREFIX + k: v for k, v in {
            "key": self.key(), "cpu": self.cpu, "cpu_capability": self.cpu_capability, "gpu": self.gpu or "none",
            "torch": self.torch, "threads": str(self.threads), "deterministic": str(self.deterministic).lower(),
            "data": self.data.digest if self.data else "unknown"}.items()}

    def to_tags(self) -> dict[str, str]:
        """All of it as MLflow tags (``env.json`` holds the whole object for :meth:`from_tags`)."""
        tags = {PREFIX + "json": json.dumps(self.to_dict(), sort_keys=True), PREFIX + "footer": self.footer(),
                PREFIX + "cpu_flags": " ".join(self.cpu_flags) or "none",
                PREFIX + "torchvision": self.torchvision, PREFIX + "cuda": self.cuda or "none",
                PREFIX + "python": self.python}
        if self.data:
            tags[PREFIX + "data_detail"] = self.data.detail
        return tags

    @classmethod
    def from_tags(cls, tags: Mapping[str, str]) -> "Environment":
        """Back from a run's tags (as written by :meth:`to_tags`)."""
        try:
            return cls.from_dict(json.loads(tags[PREFIX + "json"]))
        except KeyError:
            raise KeyError(f"no {PREFIX}json tag: the run did not record its environment") from None

    def footer(self) -> str:
        """One line for under a results table."""
        device = f"GPU {self.gpu}" if self.gpu else "no GPU"
        cuda = f", CUDA {self.cuda}" if self.gpu and self.cuda else ""
        forced = "".join(f", {k}={v}" for k, v in sorted(self.kernel_env.items()))
        det = "deterministic algorithms" if self.deterministic else "non-deterministic algorithms allowed"
        data = self.data.detail if self.data else "data not fingerprinted"
        return (f"Environment {self.key()}: {self.cpu} with {self.cpu_capability} kernels, {device}; "
                f"torch {self.torch}, torchvision {self.torchvision}{cuda}; {self.threads} thread"
                f"{'s' if self.threads != 1 else ''} per worker{forced}; {det}; data: {data}")


def environment_footer(environments: Iterable[Environment]) -> str:
    """The footer of a table whose rows come from these runs: one line if they agree, else one per kind.

    Rows made in different environments can differ for that reason alone; the footer says so.
    """
    unique: dict[str, Environment] = {}
    for env in environments:
        unique.setdefault(env.key(), env)
    if not unique:
        return "Environment: not recorded"
    if len(unique) == 1:
        return next(iter(unique.values())).footer()
    return "\n".join([f"Rows come from {len(unique)} different environments (differences between them may "
                      f"come from that alone):"] + [f"- {env.footer()}" for env in unique.values()])


def collect_environment(device: str = "cpu", data: "DataConfig | DataFingerprint | None" = None) -> Environment:
    """The environment of this process as it runs on ``device`` ("cpu", "cuda", "cuda:1").

    Call it where the numbers are made, after the thread count is set (a training worker).
    ``data``: a DataConfig to fingerprint, or a fingerprint already made.
    """
    import torch  # where the numbers are made torch is loaded anyway
    import torchvision

    dev = torch.device(device)
    gpu = torch.cuda.get_device_name(dev) if dev.type == "cuda" else None
    cpu, flags = cpu_description()
    cudnn = torch.backends.cudnn.version() if torch.backends.cudnn.is_available() else None
    if data is not None and not isinstance(data, DataFingerprint):
        data = data_fingerprint(data)
    try:
        cpus = len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        cpus = os.cpu_count() or 1
    return Environment(
        cpu=cpu, cpu_flags=flags, cpu_capability=torch.backends.cpu.get_cpu_capability(), cpus=cpus,
        gpu=gpu, torch=torch.__version__, torchvision=torchvision.__version__, cuda=torch.version.cuda,
        cudnn=str(cudnn) if cudnn else None, python=platform.python_version(),
        threads=torch.get_num_threads(), interop_threads=torch.get_num_interop_threads(),
        deterministic=torch.are_deterministic_algorithms_enabled(),
        cudnn_deterministic=bool(torch.backends.cudnn.deterministic),
        cudnn_benchmark=bool(torch.backends.cudnn.benchmark),
        kernel_env={k: os.environ[k] for k in KERNEL_ENV_VARS if k in os.environ}, data=data)
