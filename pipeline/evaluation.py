"""COCO box evaluation: load ground truth, validate a results list, score it. Scoring only:
running a model is :mod:`pipeline.inference`.

Box formats: COCO results use ``[x, y, w, h]`` in absolute pixels of the original image, with the
original COCO category ids (:func:`pipeline.inference.to_coco_results` makes them).

Metrics follow COCO's conventions and 0..1 scale: ``AP`` (IoU .50:.95), ``AP50``, ``AP75``,
``APs``/``APm``/``APl`` (area < 32^2, 32^2..96^2, > 96^2), all at 100 detections per image.
A metric whose area range holds no ground truth is ``-1.0`` (COCO's "undefined"); an empty
results list scores 0 on every defined metric. Ground truth without any (non-crowd) annotation
is refused: every metric would be undefined.

A results list is held to one set of rules (:func:`results_problems`) whether it is scored here
or validated for a test-dev submission (:mod:`pipeline.submission`).

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
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from pipeline.data.index import INDEX_SUFFIXES, read_index

METRIC_KEYS = ("AP", "AP50", "AP75", "APs", "APm", "APl")
BACKENDS = ("pycocotools", "faster")
# bench/eval.py: identical metrics (max difference ~1e-16) and 6-7x faster on 100k detections.
DEFAULT_BACKEND = "faster"
RESULT_KEYS = ("image_id", "category_id", "bbox", "score")
BOX_TOLERANCE = 0.01  # px a box may pass the image border by (float32 rounding of clipped boxes)


class ResultsError(ValueError):
    """A results list that breaks the rules of :func:`results_problems`; ``problems`` lists every
    finding, each naming the detection index, its image and the field."""

    def __init__(self, problems: Sequence[str], source: str = "results"):
        self.problems = list(problems)
        shown = "\n  ".join(self.problems[:20])
        more = f"\n  ... and {len(self.problems) - 20} more" if len(self.problems) > 20 else ""
        super().__init__(f"{source}: {len(self.problems)} problem(s):\n  {shown}{more}")


# ----------------------------------------------------------------------------------------------
# loading ground truth and results
# ----------------------------------------------------------------------------------------------
def load_json(path: str | os.PathLike, what: str = "file") -> Any:
    """Read a JSON file; a missing file, invalid JSON or non-UTF-8 bytes raise an error naming
    the path."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{what} not found: {path}")
    try:
        with open(path, "rb") as f:
            return json.load(f)
    except json.JSONDecodeError as e:
        raise ValueError(f"{what} {path} is not valid JSON: {e}") from None
    except UnicodeDecodeError as e:
        raise ValueError(f"{what} {path} is not valid JSON: not UTF-8 text ({e.reason} at byte "
                         f"{e.start})") from None


def load_ground_truth(gt) -> dict:
    """The raw COCO dict of ``gt``: an instances json, a ``.parquet``/``.arrow`` annotation index,
    a dict, or a pycocotools/faster-coco-eval ``COCO``. Errors name the file: not COCO, an
    image-info file (no annotations), or no annotation to score against."""
    if isinstance(gt, (str, os.PathLike)):
        source = str(gt)
        if Path(gt).suffix in INDEX_SUFFIXES:
            data = read_index(gt).to_coco_dict()
        else:
            data = load_json(gt, "annotation file")
    elif isinstance(gt, Mapping):
        data, source = gt, "annotation dict"
    elif hasattr(gt, "dataset") and isinstance(gt.dataset, Mapping):
        data, source = gt.dataset, "COCO object"
    else:
        raise TypeError(f"gt must be a path, a dict or a COCO object, got {type(gt).__name__}")
    if not isinstance(data, Mapping):
        raise ValueError(f"{source}: expected a JSON object with 'images', got {type(data).__name__}")
    for key in ("images", "categories"):
        if not isinstance(data.get(key), list):
            raise ValueError(f"{source}: missing the '{key}' list of a COCO annotation file")
    if "annotations" not in data:
        raise ValueError(f"{source}: has no 'annotations' (an image-info file such as test-dev "
                         "cannot be scored locally)")
    anns = data["annotations"]
    if not isinstance(anns, list) or not any(isinstance(a, Mapping) and not a.get("iscrowd", 0)
                                             for a in anns):
        raise ValueError(f"{source}: no (non-crowd) annotation to score against: every COCO metric "
                         "would be undefined (-1); is this the right ground-truth file?")
    return data


def _is_int(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _is_number(v: Any) -> bool:
    """A JSON number: int or float, not a bool and not a string holding digits."""
    return isinstance(v, (int, float)) and not isinstance(v, bool)


def results_problems(results: Any, images: Mapping[int, Mapping], category_ids: set,
                     reference: str = "ground truth") -> list[str]:
    """Every rule a detection breaks, one line each naming its index, image and field.

    Each detection is an object with exactly ``image_id``, ``category_id``, ``bbox``, ``score``;
    ``image_id`` an integer id of ``images`` (``{id: image record}``) and ``category_id`` one of
    ``category_ids`` (JSON integers, not strings or booleans); ``score`` a finite number in
    [0, 1]; ``bbox`` four finite numbers ``[x, y, w, h]`` with positive width and height, inside
    the image (``BOX_TOLERANCE`` px of slack) when the image record gives its size. ``reference``
    names the file the ids come from in the messages.
    """
    if not isinstance(results, list):
        return [f"results must be a JSON list of detections, got {type(results).__name__}"]
    problems: list[str] = []
    for i, det in enumerate(results):
        if not isinstance(det, Mapping):
            problems.append(f"detection {i}: is a {type(det).__name__}, not an object")
            continue
        image_id = det.get("image_id")
        where = f"detection {i} (image {image_id})"
        missing = [k for k in RESULT_KEYS if k not in det]
        extra = sorted(map(str, set(det) - set(RESULT_KEYS)))
        if missing:
            problems.append(f"{where}: missing field(s) {', '.join(missing)}")
        if extra:
            problems.append(f"{where}: unexpected field(s) {', '.join(extra)}")
        img = None
        if "image_id" in det:
            if not _is_int(image_id):
                problems.append(f"{where}: image_id {image_id!r} is not an integer")
            elif image_id not in images:
                problems.append(f"{where}: image_id {image_id} is not in the {reference}")
            else:
                img = images[image_id]
        if "category_id" in det:
            cat = det["category_id"]
            if not _is_int(cat):
                problems.append(f"{where}: category_id {cat!r} is not an integer")
            elif cat not in category_ids:
                problems.append(f"{where}: category_id {cat} is not a category of the {reference}")
        if "score" in det:
            s = det["score"]
            if not _is_number(s) or not math.isfinite(s) or not 0.0 <= s <= 1.0:
                problems.append(f"{where}: score {s!r} is not a finite number in [0, 1]")
        if "bbox" in det:
            problems.extend(_bbox_problems(det["bbox"], img, where))
    return problems


def _bbox_problems(bbox: Any, img: Mapping | None, where: str) -> list[str]:
    if not isinstance(bbox, (list, tuple)) or len(bbox) != 4:
        return [f"{where}: bbox must be [x, y, w, h], got {bbox!r}"]
    if not all(_is_number(v) and math.isfinite(v) for v in bbox):
        return [f"{where}: bbox {list(bbox)!r} holds a non-finite or non-numeric value"]
    x, y, w, h = bbox
    out = []
    if w <= 0 or h <= 0:
        out.append(f"{where}: bbox {list(bbox)} has non-positive width or height")
    if img is not None and _is_number(img.get("width")) and _is_number(img.get("height")):
        W, H = float(img["width"]), float(img["height"])
        t = BOX_TOLERANCE
        if x < -t or y < -t or x + w > W + t or y + h > H + t:
            out.append(f"{where}: bbox {list(bbox)} leaves the {int(W)}x{int(H)} image")
    return out


def load_results(results, gt: Mapping, source: str | None = None) -> list[dict]:
    """Results (a file path or a list) checked by :func:`results_problems` against ``gt`` (a COCO
    dict), as a fresh list of dicts (the COCO APIs add keys to the dicts they load). Raises
    :class:`ResultsError` naming every bad detection."""
    if isinstance(results, (str, os.PathLike)):
        source = source or str(results)
        results = load_json(results, "results file")
    source = source or "results"
    images = {img["id"]: img for img in gt["images"] if isinstance(img, Mapping) and "id" in img}
    cat_ids = {c["id"] for c in gt["categories"] if isinstance(c, Mapping) and "id" in c}
    problems = results_problems(results, images, cat_ids)
    if problems:
        raise ResultsError(problems, source)
    return [{"image_id": d["image_id"], "category_id": d["category_id"],
             "bbox": [float(v) for v in d["bbox"]], "score": float(d["score"])} for d in results]


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
    gt_data = load_ground_truth(gt)
    dets = load_results(results, gt_data)

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


