"""Running a trained detector: prediction, the TTA loop, sharded prediction, loading a model.

Box formats: the model and :func:`predict` use ``xyxy`` in absolute pixels of the *original* image
(no "+1"); :func:`to_coco_results` turns them into COCO results (``[x, y, w, h]`` in the same
pixels, original COCO category ids), which :mod:`pipeline.evaluation` scores.

Precision: prediction and post-processing always run in fp32, whatever training used (the paper
and the official code test in fp32): :func:`predict` and :func:`predict_tta` switch off any
autocast region they are called from, so their outputs are float32 computed in float32.

Depends on :mod:`pipeline.tta` (settings and merges) and :mod:`pipeline.checkpoint`; neither
imports this module.
"""
from __future__ import annotations

import contextlib
import os
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass

import torch
from torch.utils.data import DataLoader

from detector import build_detector
from pipeline import checkpoint as ckpt
from pipeline.data import (CategoryMap, CocoDetection, DetectionTransform, InferenceBatchSampler, collate,
                           get_resize_size, hflip_boxes)
from pipeline.tta import OriginalImage, TTAConfig, TTAPass, area_filter, collate_original, merge_passes

__all__ = ["predict", "predict_tta", "tta_detect", "to_coco_results", "label_lookup", "to_category_ids",
           "fp32", "InferenceSpec", "load_model_state", "model_category_map", "predict_shard",
           "predict_sharded"]


@contextlib.contextmanager
def fp32(device: torch.device) -> Iterator[None]:
    """Switch autocast off (CPU and ``device``) for the block, so a model called from inside a
    training step's autocast region still computes in float32."""
    with contextlib.ExitStack() as stack:
        for kind in {"cpu", device.type}:
            stack.enter_context(torch.autocast(kind, enabled=False))
        yield


# ----------------------------------------------------------------------------------------------
# labels -> COCO category ids
# ----------------------------------------------------------------------------------------------
def label_lookup(category_map) -> torch.Tensor:
    """LongTensor ``lookup`` with ``lookup[label] = COCO category id`` (index 0, background, = -1).

    Accepts a :class:`pipeline.data.CategoryMap`, a ``{label: coco_id}`` mapping, or the COCO ids
    in label order (label ``i`` -> ``ids[i - 1]``).
    """
    if isinstance(category_map, CategoryMap):
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


def to_category_ids(labels: torch.Tensor, lookup: torch.Tensor) -> torch.Tensor:
    """Labels ``1..C`` -> COCO ids through a :func:`label_lookup` table; unknown labels raise."""
    labels = labels.long().cpu()
    bad = (labels < 1) | (labels >= len(lookup))
    if bool(bad.any()):
        raise ValueError(f"label(s) {sorted(set(labels[bad].tolist()))} outside 1..{len(lookup) - 1} "
                         "of the category map")
    ids = lookup[labels]
    if bool((ids < 0).any()):
        raise ValueError(f"label(s) {sorted(set(labels[ids < 0].tolist()))} have no COCO category id")
    return ids


# ----------------------------------------------------------------------------------------------
# single-scale prediction
# ----------------------------------------------------------------------------------------------
@torch.inference_mode()
def predict(model: torch.nn.Module, loader: Iterable, device: torch.device | str = "cpu",
            category_map=None) -> list[dict]:
    """Run ``model`` in eval mode, in fp32, over ``loader`` and return its detections per image.

    ``loader`` yields ``(images Tensor[B,3,H,W], targets)`` as ``pipeline.data.collate`` makes them;
    each target carries ``image_id``, ``orig_size`` ``(h0, w0)`` and ``image_size`` ``(h, w)``.
    The model rescales its boxes to ``orig_size`` itself.

    Returns one dict per image, in loader order: ``image_id`` (int), ``boxes`` float32[D, 4] xyxy
    in original pixels, ``scores`` float32[D], ``labels`` int64[D] (1..C), all on the CPU; with
    ``category_map`` also ``category_ids`` int64[D] (original COCO ids).
    """
    device = torch.device(device)

    def detect(images: torch.Tensor, targets: Sequence[dict]) -> list[dict]:
        return model(images.to(device, non_blocking=True),
                     image_sizes=[tuple(int(v) for v in t["image_size"]) for t in targets],
                     original_sizes=[tuple(int(v) for v in t["orig_size"]) for t in targets])

    return _per_image(model, loader, device, detect, category_map)


def _per_image(model: torch.nn.Module, loader: Iterable, device: torch.device, detect, category_map) -> list[dict]:
    """The loop of :func:`predict` and :func:`predict_tta`: ``detect(images, targets)`` per batch
    with the model in eval mode and fp32, one CPU dict per image, the model's mode restored."""
    was_training = model.training
    model.eval()
    lookup = label_lookup(category_map) if category_map is not None else None
    outputs: list[dict] = []
    try:
        with fp32(device):
            for images, targets in loader:
                for det, t in zip(detect(images, targets), targets):
                    item = {"image_id": int(t["image_id"]),
                            "boxes": det["boxes"].float().cpu(),
                            "scores": det["scores"].float().cpu(),
                            "labels": det["labels"].long().cpu()}
                    if lookup is not None:
                        item["category_ids"] = to_category_ids(item["labels"], lookup)
                    outputs.append(item)
    finally:
        model.train(was_training)
    return outputs


def to_coco_results(outputs: Sequence[dict], targets: Sequence[dict] | None = None,
                    category_map=None) -> list[dict]:
    """Per-image detections -> COCO results dicts.

    Args:
        outputs: per-image dicts with ``boxes`` [D, 4] xyxy in original pixels, ``scores`` [D],
            ``labels`` [D] (1..C); ``image_id`` either in each dict (as :func:`predict` gives) or
            in the matching ``targets``.
        targets: optional per-image targets (``image_id``) in the order of ``outputs``.
        category_map: label -> COCO id (see :func:`label_lookup`); required.

    Returns: ``{"image_id", "category_id", "bbox": [x, y, w, h], "score"}`` dicts, in original
    pixels and COCO ids. Boxes without positive width and height are dropped: they cannot match
    any ground truth and the evaluation server rejects them.
    """
    if category_map is None:
        raise ValueError("to_coco_results needs the category_map (label -> COCO category id)")
    if targets is not None and len(targets) != len(outputs):
        raise ValueError(f"{len(outputs)} outputs but {len(targets)} targets")
    lookup = label_lookup(category_map)
    results: list[dict] = []
    for i, out in enumerate(outputs):
        image_id = int(targets[i]["image_id"] if targets is not None else out["image_id"])
        boxes = torch.as_tensor(out["boxes"]).detach().float().cpu().reshape(-1, 4)
        scores = torch.as_tensor(out["scores"]).detach().float().cpu().reshape(-1)
        cats = to_category_ids(torch.as_tensor(out["labels"]), lookup)
        xywh = torch.cat([boxes[:, :2], boxes[:, 2:] - boxes[:, :2]], dim=1)
        keep = (xywh[:, 2] > 0) & (xywh[:, 3] > 0)
        for box, score, cat in zip(xywh[keep].tolist(), scores[keep].tolist(), cats[keep].tolist()):
            results.append({"image_id": image_id, "category_id": int(cat), "bbox": box,
                            "score": score})
    return results


# ----------------------------------------------------------------------------------------------
# test-time augmentation (settings and merges: pipeline.tta)
# ----------------------------------------------------------------------------------------------
def _resize_uint8(image: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """uint8 ``[3, h0, w0]`` -> uint8 ``[3, h, w]``, the same antialiased bilinear resize as the data
    pipeline; the detector normalises uint8 input on its device."""
    from torchvision.transforms.v2 import functional as TF

    if tuple(image.shape[-2:]) != tuple(size):
        image = TF.resize(image, list(size), antialias=True)
    return image


@torch.inference_mode()
def tta_detect(model: torch.nn.Module, images: Sequence[torch.Tensor], cfg: TTAConfig,
               passes: Sequence[TTAPass] | None = None, return_passes: bool = False):
    """TTA detections for a batch of original images, in fp32.

    Args:
        model: detector in eval mode; ``model(list of [3, h, w], image_sizes, original_sizes)``
            returns per-image ``{"boxes" xyxy in original pixels, "scores", "labels"}``.
        images: uint8 RGB ``[3, h0, w0]`` tensors at original resolution (any device; the model's
            device is used for the passes).
        cfg: the TTA settings; ``passes`` overrides ``cfg.passes()``.
        return_passes: also return, per image, the filtered output of every pass (for tests and
            diagnostics).

    Returns:
        per image ``{"boxes" float32[D, 4] xyxy original pixels, "scores" [D], "labels" [D]}`` on
        the CPU (``D <= cfg.max_per_image`` up to ties), and with ``return_passes`` a second list:
        per image, ``[(TTAPass, (h, w) pass size, {"boxes", "scores", "labels"}) ...]``.
    """
    passes = list(passes) if passes is not None else cfg.passes()
    device = next(model.parameters()).device
    originals = [img.to(device) for img in images]
    orig_sizes = [tuple(int(v) for v in img.shape[-2:]) for img in originals]
    collected: list[list] = [[] for _ in originals]
    # A pass and its mirror share one resize; run them as one batch.
    groups: dict[tuple[int, int], list[TTAPass]] = {}
    for p in passes:
        groups.setdefault((p.min_size, p.max_size), []).append(p)
    for (min_size, max_size), group in groups.items():
        sizes = [get_resize_size(h0, w0, min_size, max_size)[:2] for h0, w0 in orig_sizes]
        resized = [_resize_uint8(img, s) for img, s in zip(originals, sizes)]
        batch, meta = [], []
        for p in group:
            for i, x in enumerate(resized):
                batch.append(x.flip(-1) if p.hflip else x)
                meta.append((p, i))
        with fp32(device):
            dets = model(batch, image_sizes=[sizes[i] for _, i in meta],
                         original_sizes=[orig_sizes[i] for _, i in meta])
        for det, (p, i) in zip(dets, meta):
            h0, w0 = orig_sizes[i]
            h, w = sizes[i]
            boxes = det["boxes"].float().cpu()
            if p.hflip:
                boxes = hflip_boxes(boxes, w0)
            keep = area_filter(boxes, p.area_range, (w / w0, h / h0))
            collected[i].append((p, (h, w), {"boxes": boxes[keep],
                                             "scores": det["scores"].float().cpu()[keep],
                                             "labels": det["labels"].long().cpu()[keep]}))
    merged = [merge_passes([out for _, _, out in per_image], cfg) for per_image in collected]
    return (merged, collected) if return_passes else merged


def predict_tta(model: torch.nn.Module, loader: Iterable, device: torch.device | str,
                cfg: TTAConfig, category_map=None) -> list[dict]:
    """:func:`predict` with TTA: same per-image output format.

    ``loader`` yields ``(images, targets)`` with ``images`` a list of uint8 ``[3, h0, w0]``
    originals (a dataset with :class:`pipeline.tta.OriginalImage` as transform and
    :func:`pipeline.tta.collate_original`).
    """
    device = torch.device(device)
    return _per_image(model, loader, device,
                      lambda images, targets: tta_detect(model, [img.to(device) for img in images], cfg),
                      category_map)


# ----------------------------------------------------------------------------------------------
# inference over a whole split, sharded over Ray tasks (jobs/evaluate.py, jobs/testdev.py)
# ----------------------------------------------------------------------------------------------
@dataclass
class InferenceSpec:
    """What every shard needs besides the weights; plain values, so it pickles to Ray workers.

    ``ann_file`` is an instances or image-info json (or Parquet index) and ``image_dir`` its images.
    Images are resized to ``test_min_size`` / ``max_size`` as in training; with ``tta`` (a
    ``TTAConfig.to_dict()``) the original images go through :func:`predict_tta` instead.
    """

    ann_file: str
    image_dir: str
    test_min_size: int = 800
    max_size: int = 1333
    batch_size: int = 2
    device: str = "cpu"
    tta: dict | None = None
    loader_workers: int = 0
    max_bad_fraction: float = 0.0  # a submission must cover every image: fail on unreadable ones


def load_model_state(source: str | os.PathLike, tracking_uri: str | None = None) -> dict:
    """Weights + detector config + categories (+ train config, extra) of a checkpoint directory,
    ``state.pt`` or MLflow model URI (resolved in ``tracking_uri``, default MLflow's current
    store), without optimizer state: small enough for the object store. The weights are checked
    against the config here, so a bad checkpoint fails before any worker starts."""
    source = str(source)
    full = ckpt.read_checkpoint(source, tracking_uri)
    ckpt.detector_from_state(full, source=source)
    state = {k: full[k] for k in ("model", "detector_config", "data", "train_config", "extra") if k in full}
    state["source"] = source
    return state


def model_category_map(state: dict, fallback: CategoryMap | None = None) -> CategoryMap:
    """The checkpoint's label -> COCO id map; ``fallback`` when it stores none."""
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
    device = torch.device(spec.device)
    model, det_cfg = ckpt.detector_from_state(state, device, source=state.get("source", "checkpoint"))
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
        outputs = predict_tta(model, loader, device, TTAConfig.from_dict(spec.tta))
    else:
        outputs = predict(model, loader, device)
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
