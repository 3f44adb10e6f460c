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
(``runs:/<id>/model``, ``models:/<name>/<version>``) of a model logged by :mod:`pipeline.training`
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
    """``state.pt`` of an MLflow model URI; ``runs:/`` and ``models:/`` resolve in ``tracking_uri``
    (tracking and registry store; default MLflow's current one)."""
    import mlflow
    from mlflow.exceptions import MlflowException

    previous = mlflow.get_tracking_uri(), mlflow.get_registry_uri()
    if tracking_uri:  # runs:/ and models:/ resolution reads the *current* tracking/registry URIs
        mlflow.set_tracking_uri(tracking_uri)
        mlflow.set_registry_uri(tracking_uri)
    store = tracking_uri or previous[0]
    try:
        local = Path(mlflow.artifacts.download_artifacts(artifact_uri=uri, tracking_uri=tracking_uri))
    except (MlflowException, OSError) as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise FileNotFoundError(f"MLflow model {uri} not found in the tracking store {store}: {first}") from None
    finally:
        if tracking_uri:
            mlflow.set_tracking_uri(previous[0])
            mlflow.set_registry_uri(previous[1])
    candidates = [local / "extra_files" / STATE_FILE, local / STATE_FILE]
    for c in candidates:
        if c.is_file():
            return load_state(c)
    raise FileNotFoundError(f"MLflow model {uri} holds no {STATE_FILE} (looked in extra_files/); "
                            "log models with pipeline.training so the detector config travels with them")


def read_checkpoint(source: str | os.PathLike, tracking_uri: str | None = None) -> dict:
    """The checkpoint dict of a directory, ``state.pt`` or MLflow model URI (see module doc)."""
    source = str(source)
    return _state_from_mlflow(source, tracking_uri) if is_mlflow_uri(source) else load_state(source)


def load_weights(model: torch.nn.Module, weights: dict, source: str = "checkpoint") -> None:
    """``model.load_state_dict(weights)``, strictly: every key present on both sides with the same
    shape. A mismatch (weights of another architecture, or a resume after changing the detector
    config) raises a ``ValueError`` naming ``source`` and the first differing keys."""
    expected = model.state_dict()
    missing = sorted(set(expected) - set(weights))
    unexpected = sorted(set(weights) - set(expected))
    shapes = sorted(k for k in set(expected) & set(weights)
                    if tuple(expected[k].shape) != tuple(weights[k].shape))
    if missing or unexpected or shapes:
        def head(keys, describe=str):
            return ", ".join(describe(k) for k in keys[:5]) + (f" ... ({len(keys)} in all)" if len(keys) > 5 else "")
        parts = []
        if missing:
            parts.append(f"missing {head(missing)}")
        if unexpected:
            parts.append(f"unexpected {head(unexpected)}")
        if shapes:
            parts.append("shape differs for " + head(
                shapes, lambda k: f"{k} (checkpoint {tuple(weights[k].shape)}, model {tuple(expected[k].shape)})"))
        raise ValueError(f"{source}: checkpoint weights do not match the detector config: " + "; ".join(parts))
    model.load_state_dict(weights, strict=True)


def detector_from_state(state: dict, device: str | torch.device = "cpu", source: str = "checkpoint"):
    """Build the detector of ``state["detector_config"]`` and load its weights (strict, see
    :func:`load_weights`). Returns ``(model in eval mode, DetectorConfig)``."""
    from detector import build_detector
    from detector.config import DetectorConfig

    try:
        cfg = DetectorConfig.from_dict(state["detector_config"])
    except (TypeError, ValueError) as e:
        raise ValueError(f"{source}: invalid detector_config: {e}") from None
    model = build_detector(cfg)
    load_weights(model, state["model"], source)
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
    state = read_checkpoint(source, tracking_uri)
    model, cfg = detector_from_state(state, device, source)
    meta = {"categories": list(state.get("data", {}).get("categories", [])),
            "iteration": int(state.get("iteration", 0)),
            "train_config": dict(state.get("train_config", {})),
            "source": source}
    return model, cfg, meta
