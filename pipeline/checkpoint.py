"""Checkpoint format and loading a trained detector back (docs/architecture.md, "Checkpoint format").

A checkpoint is a directory holding ``state.pt``, a ``torch.save``'d dict of plain types and tensors
only, so it loads with ``torch.load(weights_only=True)`` (no pickled classes)::

    {"format": 1,
     "model": state_dict (unwrapped: no DDP "module." prefix),
     "detector_config": DetectorConfig.to_dict(),
     "data": {"categories": [{"id", "name"}, ...] in label order (label i = categories[i - 1])},
     "iteration": number of optimiser steps done (resume starts at this iteration),
     "optimizer", "scheduler": their state_dicts (absent in model-only files),
     "rng": {"per_rank": [per-rank RNG states]} (python, numpy, torch CPU and CUDA),
     "train_config": TrainConfig.to_dict(),
     "extra": {...}  (e.g. the MLflow run id)}

:func:`load_detector` accepts such a directory, the ``state.pt`` file itself, or an MLflow model URI
(``runs:/<id>/model``, ``models:/<name>/<version>``) of a model logged by :mod:`pipeline.train`
(``mlflow.pytorch`` with this ``state.pt`` as an extra file).
"""
from __future__ import annotations

import os
import random
import tempfile
from pathlib import Path
from typing import Any

import numpy as np
import torch

STATE_FILE = "state.pt"
FORMAT_VERSION = 1
_MLFLOW_SCHEMES = ("runs:/", "models:/", "mlflow-artifacts:/")


# ----------------------------------------------------------------------------------------------
# RNG state (plain types so weights_only loading accepts it)
# ----------------------------------------------------------------------------------------------
def get_rng_state() -> dict:
    """This process's python, numpy, torch CPU and CUDA RNG states as tensors/ints/tuples."""
    np_state = np.random.get_state()
    state = {
        "python": random.getstate(),
        "numpy": {"keys": torch.from_numpy(np_state[1].astype(np.int64)), "pos": int(np_state[2]),
                  "has_gauss": int(np_state[3]), "cached_gaussian": float(np_state[4])},
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict) -> None:
    """Inverse of :func:`get_rng_state` (CUDA states are restored only where a GPU is in use)."""
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))
    n = state["numpy"]
    np.random.set_state(("MT19937", n["keys"].numpy().astype(np.uint32), n["pos"], n["has_gauss"],
                         n["cached_gaussian"]))
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        cuda_states = state["cuda"][: torch.cuda.device_count()]
        for i, s in enumerate(cuda_states):
            torch.cuda.set_rng_state(s, i)


# ----------------------------------------------------------------------------------------------
# writing and reading
# ----------------------------------------------------------------------------------------------
def unwrap(model: torch.nn.Module) -> torch.nn.Module:
    """The module inside DistributedDataParallel (or the model itself)."""
    return getattr(model, "module", model)


def build_state(model: torch.nn.Module, detector_config, categories: list[dict], iteration: int,
                optimizer: torch.optim.Optimizer | None = None, scheduler=None,
                rng: dict | None = None, train_config: dict | None = None,
                extra: dict | None = None) -> dict:
    """The checkpoint dict. ``detector_config``: a ``DetectorConfig`` or its ``to_dict()``."""
    det_cfg = detector_config.to_dict() if hasattr(detector_config, "to_dict") else dict(detector_config)
    state: dict[str, Any] = {
        "format": FORMAT_VERSION,
        "model": {k: v.detach().cpu() for k, v in unwrap(model).state_dict().items()},
        "detector_config": det_cfg,
        "data": {"categories": [{"id": int(c["id"]), "name": str(c["name"])} for c in categories]},
        "iteration": int(iteration),
        "train_config": dict(train_config or {}),
        "extra": dict(extra or {}),
    }
    if optimizer is not None:
        state["optimizer"] = optimizer.state_dict()
    if scheduler is not None:
        state["scheduler"] = scheduler.state_dict()
    if rng is not None:
        state["rng"] = rng
    return state


def save_state(state: dict, directory: str | os.PathLike) -> Path:
    """Write ``state`` to ``directory/state.pt`` atomically (temp file + rename): a crash mid-write
    never replaces a good checkpoint with half a file."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    path = directory / STATE_FILE
    fd, tmp = tempfile.mkstemp(prefix=".state.", suffix=".tmp", dir=directory)
    os.close(fd)
    try:
        torch.save(state, tmp)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)
    return path


def resolve_state_file(path: str | os.PathLike) -> Path:
    """``state.pt`` inside a checkpoint directory, or the file itself; clear error when absent."""
    path = Path(path)
    if path.is_dir():
        path = path / STATE_FILE
    if not path.is_file():
        raise FileNotFoundError(f"no checkpoint at {path} (expected a checkpoint directory holding "
                                f"{STATE_FILE}, or the {STATE_FILE} file itself)")
    return path


def load_state(path: str | os.PathLike, map_location: str | torch.device = "cpu") -> dict:
    """Read a checkpoint (directory or ``state.pt``) with ``weights_only=True``."""
    file = resolve_state_file(path)
    try:
        state = torch.load(file, map_location=map_location, weights_only=True)
    except Exception as e:  # truncated file, not a torch file, or pickled classes
        raise ValueError(f"cannot read checkpoint {file}: {type(e).__name__}: {e}") from e
    if not isinstance(state, dict) or "model" not in state or "detector_config" not in state:
        raise ValueError(f"{file} is not an atss-ray checkpoint (needs 'model' and 'detector_config')")
    return state


# ----------------------------------------------------------------------------------------------
# the detector back from a checkpoint or an MLflow model
# ----------------------------------------------------------------------------------------------
def is_mlflow_uri(path: str | os.PathLike) -> bool:
    return isinstance(path, str) and path.startswith(_MLFLOW_SCHEMES)


def _state_from_mlflow(uri: str, tracking_uri: str | None = None) -> dict:
    import mlflow

    previous = mlflow.get_tracking_uri()
    if tracking_uri:  # runs:/ resolution of a logged model reads the *current* tracking URI
        mlflow.set_tracking_uri(tracking_uri)
    try:
        local = Path(mlflow.artifacts.download_artifacts(artifact_uri=uri, tracking_uri=tracking_uri))
    finally:
        if tracking_uri:
            mlflow.set_tracking_uri(previous)
    candidates = [local / "extra_files" / STATE_FILE, local / STATE_FILE]
    for c in candidates:
        if c.is_file():
            return load_state(c)
    raise FileNotFoundError(f"MLflow model {uri} holds no {STATE_FILE} (looked in extra_files/); "
                            "log models with pipeline.train so the detector config travels with them")


def detector_from_state(state: dict, device: str | torch.device = "cpu"):
    """Build the detector of ``state["detector_config"]`` and load its weights (strict)."""
    from detector import build_detector
    from detector.config import DetectorConfig

    cfg = DetectorConfig.from_dict(state["detector_config"])
    model = build_detector(cfg)
    missing, unexpected = model.load_state_dict(state["model"], strict=False)
    if missing or unexpected:
        raise ValueError(f"checkpoint weights do not match the detector config: "
                         f"missing {sorted(missing)[:5]}{'...' if len(missing) > 5 else ''}, "
                         f"unexpected {sorted(unexpected)[:5]}{'...' if len(unexpected) > 5 else ''}")
    return model.to(device).eval(), cfg


def load_detector(path_or_uri: str | os.PathLike, device: str | torch.device = "cpu",
                  tracking_uri: str | None = None):
    """Load a trained detector for inference.

    Args:
        path_or_uri: checkpoint directory, its ``state.pt``, or an MLflow model URI
            (``runs:/<run id>/model``, ``models:/<name>/<version>``).
        device: where to put the model.
        tracking_uri: the MLflow store of a ``runs:/`` / ``models:/`` URI (default: MLflow's current
            one, i.e. ``MLFLOW_TRACKING_URI`` or ``mlflow.set_tracking_uri``).

    Returns:
        ``(model in eval mode, DetectorConfig, meta)``; ``meta`` has ``categories`` (``[{"id", "name"}]``
        in label order), ``iteration``, ``train_config`` and ``source``.
    """
    source = str(path_or_uri)
    state = _state_from_mlflow(source, tracking_uri) if is_mlflow_uri(source) else load_state(path_or_uri)
    model, cfg = detector_from_state(state, device)
    meta = {"categories": list(state.get("data", {}).get("categories", [])),
            "iteration": int(state.get("iteration", 0)),
            "train_config": dict(state.get("train_config", {})),
            "source": source}
    return model, cfg, meta
