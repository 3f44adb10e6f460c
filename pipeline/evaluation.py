"""COCO box evaluation: run a detector over a loader, convert to COCO results, score them.

Box formats: the model and :func:`predict` use ``xyxy`` in absolute pixels of the *original* image
(no "+1"); COCO results use ``[x, y, w, h]`` in the same pixels, with the original COCO category ids.

Metrics follow COCO's conventions and 0..1 scale: ``AP`` (IoU .50:.95), ``AP50``, ``AP75``,
``APs``/``APm``/``APl`` (area < 32^2, 32^2..96^2, > 96^2), all at 100 detections per image.
A metric whose area range holds no ground truth is ``-1.0`` (COCO's "undefined"); an empty
results list scores 0 on every defined metric.

Two interchangeable backends score the same detections: ``"pycocotools"`` (the reference
implementation) and ``"faster"`` (faster-coco-eval, C++, the default); ``bench/eval.py`` shows
they give identical metrics, the faster one in about 1/6 of the time.
"""
from __future__ import annotations

import contextlib
import copy
import io
import json
import math
import os
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

METRIC_KEYS = ("AP", "AP50", "AP75", "APs", "APm", "APl")
BACKENDS = ("pycocotools", "faster")
# bench/eval.py: identical metrics (max difference ~1e-16) and 6-7x faster on 100k detections.
DEFAULT_BACKEND = "faster"
_RESULT_KEYS = ("image_id", "category_id", "bbox", "score")


# ----------------------------------------------------------------------------------------------
# loading ground truth and results
# ----------------------------------------------------------------------------------------------
def load_json(path: str | os.PathLike, what: str = "file") -> Any:
    """Read a JSON file; a missing file or invalid JSON raises an error naming the path."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{what} not found: {path}")
    try:
        with open(path) as f:
            return json.load(f)
    except json.JSONDecodeError as e:
        raise ValueError(f"{what} {path} is not valid JSON: {e}") from None


def _gt_dataset(gt) -> dict:
    """The raw COCO dict of ``gt`` (a path, a dict, or a pycocotools/faster-coco-eval ``COCO``)."""
    if isinstance(gt, (str, os.PathLike)):
        data = load_json(gt, "annotation file")
        source = str(gt)
    elif isinstance(gt, Mapping):
        data, source = gt, "annotation dict"
    elif hasattr(gt, "dataset") and isinstance(gt.dataset, Mapping):
        data, source = gt.dataset, "COCO object"
    else:
        raise TypeError(f"gt must be a path, a dict or a COCO object, got {type(gt).__name__}")
    if not isinstance(data, Mapping):
        raise ValueError(f"{source}: expected a JSON object with 'images', got {type(data).__name__}")
    for key in ("images", "categories"):
        if key not in data:
            raise ValueError(f"{source}: missing the '{key}' list of a COCO annotation file")
    if "annotations" not in data:
        raise ValueError(f"{source}: has no 'annotations' (an image-info file such as test-dev "
                         "cannot be scored locally)")
    return data


def _load_results(results) -> list[dict]:
    """Results as a fresh list of dicts (the COCO APIs add keys to the dicts they load)."""
    if isinstance(results, (str, os.PathLike)):
        data = load_json(results, "results file")
        source = str(results)
    else:
        data, source = results, "results"
    if not isinstance(data, list):
        raise ValueError(f"{source}: COCO results must be a JSON list of detections, "
                         f"got {type(data).__name__}")
    out = []
    for i, det in enumerate(data):
        if not isinstance(det, Mapping):
            raise ValueError(f"{source}: detection {i} is a {type(det).__name__}, not an object")
        missing = [k for k in _RESULT_KEYS if k not in det]
        if missing:
            raise ValueError(f"{source}: detection {i} (image_id={det.get('image_id')}) "
                             f"lacks {', '.join(missing)}")
        bbox = det["bbox"]
        if not isinstance(bbox, (list, tuple)) or len(bbox) != 4:
            raise ValueError(f"{source}: detection {i} (image_id={det['image_id']}) bbox must be "
                             f"[x, y, w, h], got {bbox!r}")
        try:
            values = [float(v) for v in (*bbox, det["score"])]
        except (TypeError, ValueError):
            values = [math.nan]
        if not all(math.isfinite(v) for v in values):
            raise ValueError(f"{source}: detection {i} (image_id={det['image_id']}) has a "
                             f"non-finite or non-numeric bbox/score: {list(bbox)}, {det['score']!r}")
        out.append({"image_id": det["image_id"], "category_id": det["category_id"],
                    "bbox": values[:4], "score": values[4]})
    return out


def _check_ids(results: list[dict], gt: dict) -> None:
    img_ids = {img["id"] for img in gt["images"]}
    cat_ids = {cat["id"] for cat in gt["categories"]}
    bad_img = sorted({d["image_id"] for d in results} - img_ids, key=str)
    if bad_img:
        raise ValueError(f"{len(bad_img)} image id(s) of the results are not in the ground truth: "
                         f"{_head(bad_img)}")
    bad_cat = sorted({d["category_id"] for d in results} - cat_ids, key=str)
    if bad_cat:
        raise ValueError(f"{len(bad_cat)} category id(s) of the results are not in the ground "
                         f"truth: {_head(bad_cat)}")


def _head(items: Sequence, n: int = 10) -> str:
    s = ", ".join(str(x) for x in items[:n])
    return s + (f", ... ({len(items) - n} more)" if len(items) > n else "")


# ----------------------------------------------------------------------------------------------
# scoring
# ----------------------------------------------------------------------------------------------
def evaluate_coco(gt, results, backend: str | None = None, iou_type: str = "bbox",
                  verbose: bool = False) -> dict:
    """Score COCO results against ground truth.

    Args:
        gt: annotation file path, COCO dict, or a pycocotools / faster-coco-eval ``COCO``.
        results: results file path or list of ``{"image_id", "category_id", "bbox": [x, y, w, h],
            "score"}`` (original COCO ids, original pixels).
        backend: ``"pycocotools"`` or ``"faster"`` (default :data:`DEFAULT_BACKEND`).
        iou_type: only ``"bbox"`` (the detector predicts no masks).
        verbose: print COCO's 12-line summary.

    Returns:
        ``{"AP", "AP50", "AP75", "APs", "APm", "APl"}`` floats on COCO's 0..1 scale, plus
        ``per_category``: ``{category name: AP}`` for every category that has ground truth.
    """
    backend = backend or DEFAULT_BACKEND
    if backend not in BACKENDS:
        raise ValueError(f"unknown backend {backend!r}; choose one of {BACKENDS}")
    if iou_type != "bbox":
        raise ValueError(f"iou_type {iou_type!r} is not supported: the detector predicts boxes only")
    gt_data = _gt_dataset(gt)
    dets = _load_results(results)
    _check_ids(dets, gt_data)

    out = io.StringIO()
    with contextlib.redirect_stdout(out):  # both COCO APIs print progress lines
        if backend == "pycocotools":
            from pycocotools.coco import COCO
            from pycocotools.cocoeval import COCOeval as Eval
        else:
            from faster_coco_eval import COCO
            from faster_coco_eval import COCOeval_faster as Eval
        coco_gt = COCO()
        # The APIs only read the dict, but shallow-copy so their added index never leaks back.
        coco_gt.dataset = dict(gt_data)
        coco_gt.createIndex()
        coco_dt = _load_res(coco_gt, dets)
        # faster-coco-eval logs its summary at INFO through its own logger, which a Ray worker's
        # logging config shows; print() goes to the buffer above like pycocotools' output.
        kwargs = {} if backend == "pycocotools" else {"print_function": print}
        ev = Eval(coco_gt, coco_dt, iou_type, **kwargs)
        ev.evaluate()
        ev.accumulate()
        ev.summarize()
    if verbose:
        print("\n".join(line for line in out.getvalue().splitlines()
                        if line.lstrip().startswith("Average")))
    stats = [float(s) for s in ev.stats[: len(METRIC_KEYS)]]
    metrics: dict[str, Any] = dict(zip(METRIC_KEYS, stats))
    metrics["per_category"] = _per_category_ap(ev, coco_gt)
    return metrics


def _load_res(coco_gt, dets: list[dict]):
    """``coco_gt.loadRes(dets)`` that also accepts an empty list (pycocotools indexes ``anns[0]``)."""
    if dets:
        return coco_gt.loadRes(dets)
    res = type(coco_gt)()
    res.dataset = {"images": list(coco_gt.dataset["images"]), "annotations": [],
                   "categories": copy.deepcopy(coco_gt.dataset["categories"])}
    res.createIndex()
    return res


def _per_category_ap(ev, coco_gt) -> dict[str, float]:
    # precision: [IoU thresholds, recall thresholds, categories, area ranges, max dets]; -1 = no GT
    precision = np.asarray(ev.eval["precision"])[:, :, :, 0, -1]
    out = {}
    for k, cat_id in enumerate(ev.params.catIds):
        p = precision[:, :, k]
        p = p[p > -1]
        if p.size:
            out[coco_gt.cats[cat_id]["name"]] = float(p.mean())
    return out


# ----------------------------------------------------------------------------------------------
# running the model
# ----------------------------------------------------------------------------------------------
@torch.inference_mode()
def predict(model: torch.nn.Module, loader: Iterable, device: torch.device | str = "cpu",
            category_map=None, amp: bool = False) -> list[dict]:
    """Run ``model`` in eval mode over ``loader`` and return its detections per image.

    ``loader`` yields ``(images Tensor[B,3,H,W], targets)`` as ``pipeline.data.collate`` makes them;
    each target carries ``image_id``, ``orig_size`` ``(h0, w0)`` and ``image_size`` ``(h, w)``.
    The model rescales its boxes to ``orig_size`` itself.

    Returns one dict per image, in loader order: ``image_id`` (int), ``boxes`` float32[D, 4] xyxy
    in original pixels, ``scores`` float32[D], ``labels`` int64[D] (1..C), all on the CPU; with
    ``category_map`` also ``category_ids`` int64[D] (original COCO ids).
    ``amp``: bf16 autocast, only on CUDA (CPU autocast is slower than fp32 here).
    """
    device = torch.device(device)
    was_training = model.training
    model.eval()
    use_amp = amp and device.type == "cuda"
    lookup = _label_lookup(category_map) if category_map is not None else None
    outputs: list[dict] = []
    try:
        for images, targets in loader:
            images = images.to(device, non_blocking=True)
            image_sizes = [tuple(int(v) for v in t["image_size"]) for t in targets]
            original_sizes = [tuple(int(v) for v in t["orig_size"]) for t in targets]
            with torch.autocast(device.type, dtype=torch.bfloat16, enabled=use_amp):
                dets = model(images, image_sizes=image_sizes, original_sizes=original_sizes)
            for det, t in zip(dets, targets):
                item = {"image_id": int(t["image_id"]),
                        "boxes": det["boxes"].float().cpu(),
                        "scores": det["scores"].float().cpu(),
                        "labels": det["labels"].long().cpu()}
                if lookup is not None:
                    item["category_ids"] = _to_category_ids(item["labels"], lookup)
                outputs.append(item)
    finally:
        model.train(was_training)
    return outputs


def _label_lookup(category_map) -> torch.Tensor:
    """LongTensor ``lookup`` with ``lookup[label] = COCO category id`` (index 0, background, = -1).

    Accepts a ``pipeline.data.CategoryMap``, a ``{label: coco_id}`` mapping, or the COCO ids in
    label order (label ``i`` -> ``ids[i - 1]``).
    """
    if hasattr(category_map, "to_coco_ids") and hasattr(category_map, "ids"):  # CategoryMap
        ids = list(category_map.ids)
    elif isinstance(category_map, Mapping):
        n = max(category_map) if category_map else 0
        ids = [-1] * n
        for label, cat in category_map.items():
            ids[int(label) - 1] = int(cat)
    elif isinstance(category_map, Sequence):
        ids = [int(c) for c in category_map]
    else:
        raise TypeError(f"category_map must be a CategoryMap, a mapping or a sequence, "
                        f"got {type(category_map).__name__}")
    return torch.tensor([-1] + [int(c) for c in ids], dtype=torch.long)


def _to_category_ids(labels: torch.Tensor, lookup: torch.Tensor) -> torch.Tensor:
    labels = labels.long().cpu()
    bad = (labels < 1) | (labels >= len(lookup))
    if bool(bad.any()):
        raise ValueError(f"label(s) {sorted(set(labels[bad].tolist()))} outside 1..{len(lookup) - 1} "
                         "of the category map")
    ids = lookup[labels]
    if bool((ids < 0).any()):
        raise ValueError(f"label(s) {sorted(set(labels[ids < 0].tolist()))} have no COCO category id")
    return ids


def to_coco_results(outputs: Sequence[dict], targets: Sequence[dict] | None = None,
                    category_map=None) -> list[dict]:
    """Per-image detections -> COCO results dicts.

    Args:
        outputs: per-image dicts with ``boxes`` [D, 4] xyxy in original pixels, ``scores`` [D],
            ``labels`` [D] (1..C); ``image_id`` either in each dict (as :func:`predict` gives) or
            in the matching ``targets``.
        targets: optional per-image targets (``image_id``) in the order of ``outputs``.
        category_map: label -> COCO id (see :func:`_label_lookup`); required.

    Returns: ``{"image_id", "category_id", "bbox": [x, y, w, h], "score"}`` dicts, in original
    pixels and COCO ids. Boxes without positive width and height are dropped: they cannot match
    any ground truth and the evaluation server rejects them.
    """
    if category_map is None:
        raise ValueError("to_coco_results needs the category_map (label -> COCO category id)")
    if targets is not None and len(targets) != len(outputs):
        raise ValueError(f"{len(outputs)} outputs but {len(targets)} targets")
    lookup = _label_lookup(category_map)
    results: list[dict] = []
    for i, out in enumerate(outputs):
        image_id = int(targets[i]["image_id"] if targets is not None else out["image_id"])
        boxes = torch.as_tensor(out["boxes"]).detach().float().cpu().reshape(-1, 4)
        scores = torch.as_tensor(out["scores"]).detach().float().cpu().reshape(-1)
        cats = _to_category_ids(torch.as_tensor(out["labels"]), lookup)
        xywh = torch.cat([boxes[:, :2], boxes[:, 2:] - boxes[:, :2]], dim=1)
        keep = (xywh[:, 2] > 0) & (xywh[:, 3] > 0)
        for box, score, cat in zip(xywh[keep].tolist(), scores[keep].tolist(), cats[keep].tolist()):
            results.append({"image_id": image_id, "category_id": int(cat), "bbox": box,
                            "score": score})
    return results


# ----------------------------------------------------------------------------------------------
# distributed evaluation and output
# ----------------------------------------------------------------------------------------------
def gather_across_workers(items: list, dedupe_key: str | None = None) -> list:
    """Concatenate every rank's ``items`` (rank order) when ``torch.distributed`` is initialised.

    Each Ray Train worker predicts its shard of the loader; after this call every rank holds all
    items, and rank 0 scores them. ``DistributedSampler`` pads the last shard by repeating images,
    so per-image items should pass ``dedupe_key="image_id"`` (keeps the first item per key).
    Without a process group this returns ``items`` unchanged (deduplicated if asked).
    """
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        gathered: list = [None] * dist.get_world_size()
        dist.all_gather_object(gathered, list(items))
        items = [x for part in gathered for x in part]
    if dedupe_key is None:
        return list(items)
    seen, out = set(), []
    for x in items:
        key = x[dedupe_key]
        if key not in seen:
            seen.add(key)
            out.append(x)
    return out


def evaluate_model(model: torch.nn.Module, loader: Iterable, gt, category_map,
                   device: torch.device | str = "cpu", backend: str | None = None,
                   amp: bool = False) -> dict | None:
    """predict -> gather over workers -> score on rank 0 (returns ``None`` on other ranks)."""
    import torch.distributed as dist

    outputs = predict(model, loader, device, amp=amp)
    outputs = gather_across_workers(outputs, dedupe_key="image_id")
    if dist.is_available() and dist.is_initialized() and dist.get_rank() != 0:
        return None
    return evaluate_coco(gt, to_coco_results(outputs, category_map=category_map), backend=backend)


def write_results_json(results: Sequence[dict], path: str | os.PathLike) -> Path:
    """Write COCO results atomically (temp file + rename), so a crash never leaves half a file."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "w") as f:
        json.dump([_plain(d) for d in results], f)
    os.replace(tmp, path)
    return path


def _plain(det: Mapping) -> dict:
    return {"image_id": int(det["image_id"]), "category_id": int(det["category_id"]),
            "bbox": [float(v) for v in det["bbox"]], "score": float(det["score"])}


# ----------------------------------------------------------------------------------------------
# inference over a whole split, sharded over Ray tasks (jobs/evaluate.py, jobs/testdev.py)
# ----------------------------------------------------------------------------------------------
@dataclass
class InferenceSpec:
    """What every shard needs besides the weights; plain values, so it pickles to Ray workers.

    ``ann_file`` is an instances or image-info json (or Parquet index) and ``image_dir`` its images.
    Images are resized to ``test_min_size`` / ``max_size`` as in training; with ``tta`` (a
    ``TTAConfig.to_dict()``) the original images go through :mod:`pipeline.tta` instead.
    """

    ann_file: str
    image_dir: str
    test_min_size: int = 800
    max_size: int = 1333
    batch_size: int = 2
    device: str = "cpu"
    amp: bool = False
    tta: dict | None = None
    loader_workers: int = 0
    max_bad_fraction: float = 0.0  # a submission must cover every image: fail on unreadable ones


def load_model_state(source: str | os.PathLike) -> dict:
    """Weights + detector config + categories (+ train config, extra) of a checkpoint directory,
    ``state.pt`` or MLflow model URI, without optimizer state: small enough for the object store.
    The weights are checked against the config here, so a bad checkpoint fails before any worker
    starts."""
    from pipeline import checkpoint as ckpt

    source = str(source)
    if ckpt.is_mlflow_uri(source):
        model, cfg, meta = ckpt.load_detector(source)
        state = {"model": model.state_dict(), "detector_config": cfg.to_dict(),
                 "data": {"categories": meta.get("categories", [])},
                 "train_config": meta.get("train_config", {}), "extra": dict(meta.get("extra", {}))}
    else:
        full = ckpt.load_state(source)
        ckpt.detector_from_state(full)
        state = {k: full[k] for k in ("model", "detector_config", "data", "train_config", "extra")
                 if k in full}
    state["source"] = source
    return state


def model_category_map(state: dict, fallback=None):
    """The checkpoint's label -> COCO id map (``CategoryMap``); ``fallback`` when it has none."""
    from pipeline.data import CategoryMap

    cats = state.get("data", {}).get("categories") or []
    if cats:
        return CategoryMap.from_list(cats)
    if fallback is None:
        raise ValueError(f"checkpoint {state.get('source', '')} stores no categories and no "
                         "dataset category map was given")
    return fallback


def predict_shard(state: dict, spec: InferenceSpec, shard: int = 0, num_shards: int = 1) -> list[dict]:
    """COCO results of shard ``shard`` of ``num_shards`` (contiguous blocks of images, together
    covering every image exactly once). Runs in-process or as a Ray task."""
    from torch.utils.data import DataLoader

    from detector import build_detector
    from detector.config import DetectorConfig
    from pipeline.data import CocoDetection, DetectionTransform, InferenceBatchSampler, collate
    from pipeline.tta import OriginalImage, TTAConfig, collate_original, predict_tta

    device = torch.device(spec.device)
    det_cfg = DetectorConfig.from_dict(state["detector_config"])
    model = build_detector(det_cfg)
    model.load_state_dict(state["model"])
    model.to(device).eval()
    transform = OriginalImage() if spec.tta else DetectionTransform(spec.test_min_size, spec.max_size, 0.0)
    ds = CocoDetection(spec.ann_file, spec.image_dir, train=False, transform=transform,
                       max_bad_fraction=spec.max_bad_fraction)
    cmap = model_category_map(state, ds.category_map)
    if cmap.num_classes != det_cfg.num_classes:
        raise ValueError(f"checkpoint has {det_cfg.num_classes} classes but {cmap.num_classes} categories")
    unknown = sorted(set(cmap.ids) - set(ds.category_map.ids))
    if unknown:
        raise ValueError(f"the model's COCO category id(s) {unknown} are not categories of {spec.ann_file}")
    sampler = InferenceBatchSampler(len(ds), spec.batch_size, num_replicas=num_shards, rank=shard)
    loader = DataLoader(ds, batch_sampler=sampler, num_workers=spec.loader_workers,
                        collate_fn=collate_original if spec.tta else collate)
    if spec.tta:
        outputs = predict_tta(model, loader, device, TTAConfig.from_dict(spec.tta), amp=spec.amp)
    else:
        outputs = predict(model, loader, device, amp=spec.amp)
    return to_coco_results(outputs, category_map=cmap)


def predict_sharded(state: dict, spec: InferenceSpec, workers: int = 0) -> list[dict]:
    """COCO results for every image of ``spec.ann_file``.

    ``workers=0`` runs in this process (GPU machines without Ray); ``workers=N`` runs N Ray tasks
    (one CPU each, plus one GPU each when ``spec.device`` is CUDA), attaching to the running Ray
    cluster or starting a local one. The weights travel once through the object store.
    """
    if workers < 0:
        raise ValueError(f"workers must be >= 0, got {workers}")
    if workers == 0:
        return predict_shard(state, spec)
    import ray

    if not ray.is_initialized():
        ray.init()
    gpus = 1 if torch.device(spec.device).type == "cuda" else 0
    task = ray.remote(num_cpus=1, num_gpus=gpus, max_retries=0)(predict_shard)
    state_ref = ray.put(state)
    futures = [task.remote(state_ref, spec, shard, workers) for shard in range(workers)]
    try:
        shards = ray.get(futures)
    except ray.exceptions.RayTaskError as e:
        for f in futures:
            with contextlib.suppress(Exception):  # finished tasks cannot be cancelled
                ray.cancel(f, force=True)
        raise e.as_instanceof_cause() from None
    return [det for shard in shards for det in shard]
