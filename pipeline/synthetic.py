"""Synthetic COCO-format detection data: the embedded default when no COCO is around.

Each image has a textured background (smooth colour field, stripes, muted clutter, sensor
noise) and objects of a few categories; every category is one shape in one distinct colour
with a dark outline, so a tiny detector learns it in a few hundred CPU iterations. To stay
realistic for ATSS, object sizes are log-uniform from ~8 px to most of the image (all FPN
levels), later objects partly occlude earlier ones, some images are crowded with many small
objects, and some hold an ``iscrowd=1`` region (a dense cluster of tiny objects annotated as one
box, as COCO does for crowds). Boxes are the tight extent of each object's *visible* pixels and
``area`` is its visible pixel count, like COCO's segmentation area.

Output is a COCO root (``annotations/instances_{train,val}2017.json``, ``train2017/``,
``val2017/``) that pycocotools loads. Every image is drawn from its own generator seeded by
``(seed, split, index)``, so output is identical for a seed whatever the worker count.
"""
from __future__ import annotations

import hashlib
import json
import logging
import math
import os
import shutil
import tempfile
import time
from dataclasses import asdict, dataclass
from multiprocessing import get_context
from pathlib import Path
from typing import ClassVar, Mapping

import numpy as np
from PIL import Image, ImageDraw

from detector.fields import FieldError, Rule, check_fields

from .progress import progress

__all__ = ["CATEGORIES", "SyntheticSpec", "render_image", "generate_split", "make_synthetic_coco",
           "ensure_synthetic", "GENERATOR_VERSION"]

log = logging.getLogger(__name__)

GENERATOR_VERSION = 2  # bump when output changes, so caches are rebuilt

# (COCO id, name, RGB). Ids have gaps on purpose, like COCO's 1..90 for 80 categories.
CATEGORIES: tuple[tuple[int, str, tuple[int, int, int]], ...] = (
    (1, "circle", (220, 40, 40)),
    (2, "square", (40, 180, 60)),
    (4, "triangle", (40, 80, 230)),
    (5, "cross", (240, 210, 40)),
    (8, "diamond", (200, 50, 200)),
    (11, "star", (40, 200, 210)),
    (13, "hexagon", (245, 140, 30)),
    (17, "bar", (245, 245, 245)),
)

_SPLITS = {"train": 0, "val": 1}
_ID_OFFSET = {"train": 0, "val": 10_000_000}


def _unit_polygon(name: str) -> np.ndarray:
    """Vertices of the category's shape in a unit box centred on 0 (``[-0.5, 0.5]^2``)."""
    if name == "circle":
        t = np.linspace(0, 2 * np.pi, 32, endpoint=False)
        return 0.5 * np.stack([np.cos(t), np.sin(t)], 1)
    if name == "square":
        return np.array([[-.5, -.5], [.5, -.5], [.5, .5], [-.5, .5]])
    if name == "triangle":
        return np.array([[0, -.5], [.5, .5], [-.5, .5]])
    if name == "cross":
        a = 0.17
        return np.array([[-a, -.5], [a, -.5], [a, -a], [.5, -a], [.5, a], [a, a], [a, .5], [-a, .5],
                         [-a, a], [-.5, a], [-.5, -a], [-a, -a]])
    if name == "diamond":
        return np.array([[0, -.5], [.5, 0], [0, .5], [-.5, 0]])
    if name == "star":
        t = np.linspace(-np.pi / 2, 1.5 * np.pi, 10, endpoint=False)
        r = np.where(np.arange(10) % 2 == 0, 0.5, 0.22)
        return np.stack([r * np.cos(t), r * np.sin(t)], 1)
    if name == "hexagon":
        t = np.linspace(0, 2 * np.pi, 6, endpoint=False)
        return 0.5 * np.stack([np.cos(t), np.sin(t)], 1)
    if name == "bar":
        return np.array([[-.5, -.15], [.5, -.15], [.5, .15], [-.5, .15]])
    raise ValueError(f"unknown shape {name!r}")


_POLYS = {name: _unit_polygon(name) for _, name, _ in CATEGORIES}


@dataclass(frozen=True)
class SyntheticSpec:
    """Generator parameters; two equal specs produce byte-identical datasets."""

    num_train: int = 300
    num_val: int = 50
    image_size: tuple[int, int] = (160, 256)  # each side drawn uniformly from this range
    num_classes: int = 5
    seed: int = 0
    min_object_size: float = 8.0
    max_object_fraction: float = 0.9  # largest object side, as a fraction of sqrt(image area)
    max_objects: int = 8  # per ordinary image
    dominant_fraction: float = 0.25  # images with one object filling most of the frame
    crowded_fraction: float = 0.15  # images with many small objects
    crowd_region_fraction: float = 0.1  # images with one iscrowd=1 cluster
    max_occlusion: float = 0.5  # a new object may hide at most this share of an earlier box
    jpeg_quality: int = 90

    # What each field allows beyond its annotated type (detector.fields checks both). A split of
    # 0 images is a spec for the other split only; generate_split refuses to write it.
    RULES: ClassVar[Mapping[str, Rule]] = {
        "num_train": Rule(ge=0),
        "num_val": Rule(ge=0),
        "image_size": Rule(ge=32),
        "num_classes": Rule(ge=1, le=len(CATEGORIES)),
        "seed": Rule(ge=0),
        "min_object_size": Rule(ge=1),
        "max_object_fraction": Rule(gt=0, le=1),
        "max_objects": Rule(ge=1),
        "dominant_fraction": Rule(ge=0, le=1),
        "crowded_fraction": Rule(ge=0, le=1),
        "crowd_region_fraction": Rule(ge=0, le=1),
        "max_occlusion": Rule(ge=0, le=1),
        "jpeg_quality": Rule(ge=1, le=95),
    }

    def __post_init__(self):
        check_fields(self)
        lo, hi = self.image_size
        if not lo <= hi:
            raise FieldError("SyntheticSpec", "image_size", self.image_size, "(lo, hi) with 32 <= lo <= hi")

    def categories(self) -> list[dict]:
        return [{"id": i, "name": n, "supercategory": "shape"} for i, n, _ in CATEGORIES[: self.num_classes]]

    def key(self) -> str:
        """Cache key: a hash of the parameters and the generator version."""
        blob = json.dumps({"v": GENERATOR_VERSION, **asdict(self)}, sort_keys=True)
        return hashlib.sha1(blob.encode()).hexdigest()[:16]


# -- drawing ------------------------------------------------------------------------------------
def _background(rng: np.random.Generator, h: int, w: int) -> np.ndarray:
    """Textured, low-saturation background, uint8 ``[h, w, 3]``."""
    gh, gw = rng.integers(2, 7, size=2)
    field = rng.uniform(50, 200, size=(gh, gw, 3)).astype(np.float32)
    field = 0.45 * field + 0.55 * field.mean(axis=2, keepdims=True)  # desaturate: objects pop out
    img = np.asarray(Image.fromarray(field.astype(np.uint8)).resize((w, h), Image.BICUBIC), np.int16)
    # Oriented stripes sin(u + v), u along x and v along y, as two outer products (cheap).
    theta, period = rng.uniform(0, np.pi), rng.uniform(4, 40)
    amp, phase = rng.uniform(0, 14), rng.uniform(0, 6.3)
    k = 2 * np.pi / period
    u = np.arange(w, dtype=np.float32) * np.float32(k * np.cos(theta)) + np.float32(phase)
    v = np.arange(h, dtype=np.float32) * np.float32(k * np.sin(theta))
    texture = np.cos(v)[:, None] * (amp * np.sin(u)) + np.sin(v)[:, None] * (amp * np.cos(u))
    texture = texture.astype(np.int16)
    # Sensor noise, uniform in -8..7 (random bytes are ~20x cheaper than Gaussian draws).
    texture += (np.frombuffer(rng.bytes(h * w), np.uint8).reshape(h, w) >> 4).astype(np.int16) - 8
    img += texture[..., None]
    return np.clip(img, 0, 255).astype(np.uint8)


def _clutter(draw: ImageDraw.ImageDraw, rng: np.random.Generator, h: int, w: int) -> None:
    """A few muted blobs and lines: background structure that is not an object."""
    for _ in range(int(rng.integers(0, 5))):
        g = int(rng.integers(60, 190))
        col = tuple(int(np.clip(g + d, 0, 255)) for d in rng.integers(-15, 16, size=3))
        x0, y0 = rng.uniform(0, w), rng.uniform(0, h)
        x1, y1 = x0 + rng.uniform(5, w / 2), y0 + rng.uniform(5, h / 2)
        if rng.random() < 0.5:
            draw.ellipse([x0, y0, x1, y1], fill=col)
        else:
            draw.line([x0, y0, x1, y1], fill=col, width=int(rng.integers(1, 4)))


def _inter(a: np.ndarray, b: np.ndarray) -> float:
    return max(0.0, min(a[2], b[2]) - max(a[0], b[0])) * max(0.0, min(a[3], b[3]) - max(a[1], b[1]))


def _place(rng, h, w, side, aspect, placed, max_occ, tries=20):
    """A box ``[x1, y1, x2, y2]`` of the given size that hides at most ``max_occ`` of every placed box."""
    bw, bh = side * math.sqrt(aspect), side / math.sqrt(aspect)
    bw, bh = min(bw, float(w)), min(bh, float(h))
    for _ in range(tries):
        # Up to 25% of an object may fall outside the image (truncation, as in real photos).
        x1 = rng.uniform(-0.25 * bw, w - 0.75 * bw)
        y1 = rng.uniform(-0.25 * bh, h - 0.75 * bh)
        box = np.array([x1, y1, x1 + bw, y1 + bh])
        if all(_inter(box, p) <= max_occ * (p[2] - p[0]) * (p[3] - p[1]) for p in placed):
            return box
    return None


def render_image(spec: SyntheticSpec, split: str, index: int):
    """Draw image ``index`` of ``split``. Returns ``(PIL RGB image, [annotation dict, ...])``.

    Annotation dicts carry ``bbox`` (COCO xywh of the visible pixels), ``area`` (visible pixel
    count), ``category_id``, ``iscrowd`` and a polygon ``segmentation``; ids are set by the caller.
    """
    rng = np.random.default_rng([spec.seed, _SPLITS[split], index])
    lo, hi = spec.image_size
    w, h = (int(v) for v in rng.integers(lo, hi + 1, size=2))
    canvas = Image.fromarray(_background(rng, h, w))
    draw = ImageDraw.Draw(canvas)
    _clutter(draw, rng, h, w)
    # Label map: which object owns each pixel (0 = background, 255 = crowd cluster).
    owner = Image.new("L", (w, h), 0)
    odraw = ImageDraw.Draw(owner)
    cats = CATEGORIES[: spec.num_classes]
    placed: list[np.ndarray] = []
    objects: list[tuple[int, np.ndarray]] = []  # (category index, polygon)
    anns: list[dict] = []

    if rng.random() < spec.crowd_region_fraction:
        c = int(rng.integers(len(cats)))
        side = rng.uniform(0.3, 0.5) * min(h, w)
        region = _place(rng, h, w, side, rng.uniform(0.6, 1.6), [], 0)
        rx1, ry1, rx2, ry2 = np.clip(region, 0, [w, h, w, h])
        for _ in range(int(rng.integers(25, 50))):
            s = rng.uniform(4, 9)
            cx, cy = rng.uniform(rx1 + s / 2, rx2 - s / 2), rng.uniform(ry1 + s / 2, ry2 - s / 2)
            poly = _POLYS[cats[c][1]] * s + [cx, cy]
            pts = [tuple(p) for p in poly.tolist()]
            draw.polygon(pts, fill=_jitter(rng, cats[c][2]))
            odraw.polygon(pts, fill=255)
        placed.append(np.array([rx1, ry1, rx2, ry2]))
        crowd_cat = cats[c][0]
    else:
        crowd_cat = None

    crowded = rng.random() < spec.crowded_fraction
    n = int(rng.integers(12, 31)) if crowded else int(rng.integers(1, spec.max_objects + 1))
    # Log-uniform sides: equal counts per octave, i.e. per FPN level. Crowded images hold small ones.
    top = math.sqrt(h * w) * (0.2 if crowded else spec.max_object_fraction)
    sides = np.exp(rng.uniform(math.log(spec.min_object_size), math.log(max(spec.min_object_size, top)), size=n))
    if not crowded and rng.random() < spec.dominant_fraction:
        # One object filling most of the frame (a close-up), so the coarsest level has work too.
        sides[0] = rng.uniform(0.9, 1.4) * math.sqrt(h * w)
    # Large first: later (smaller) objects then occlude parts of earlier ones, as in photos.
    for side in np.sort(sides)[::-1]:
        if len(objects) >= 254:
            break
        aspect = math.exp(rng.uniform(-0.5, 0.5))
        box = _place(rng, h, w, side, aspect, placed, spec.max_occlusion)
        if box is None:
            continue
        c = int(rng.integers(len(cats)))
        poly = _POLYS[cats[c][1]] * [box[2] - box[0], box[3] - box[1]] + (box[:2] + box[2:]) / 2
        pts = [tuple(p) for p in poly.tolist()]
        colour = _jitter(rng, cats[c][2])
        outline = tuple(int(v * 0.45) for v in colour)
        draw.polygon(pts, fill=colour, outline=outline, width=max(1, int(side / 28)))
        objects.append((c, poly))
        odraw.polygon(pts, fill=len(objects))
        placed.append(box)

    own = np.asarray(owner)
    counts = np.bincount(own.ravel(), minlength=256)
    for k, (c, poly) in enumerate(objects, start=1):
        x0, y0 = np.floor(np.clip(poly.min(0), 0, [w, h])).astype(int)
        x1, y1 = np.ceil(np.clip(poly.max(0), 0, [w, h])).astype(int)
        win = own[y0:y1 + 1, x0:x1 + 1] == k
        if counts[k] < 4 or not win.any():
            continue  # hidden (almost) completely: not annotated, like an invisible object
        ys, xs = np.nonzero(win.any(axis=1))[0], np.nonzero(win.any(axis=0))[0]
        bx1, by1, bx2, by2 = x0 + xs[0], y0 + ys[0], x0 + xs[-1] + 1, y0 + ys[-1] + 1
        clipped = np.clip(poly, 0, [w, h])
        anns.append({"category_id": cats[c][0], "iscrowd": 0, "area": float(counts[k]),
                     "bbox": [float(bx1), float(by1), float(bx2 - bx1), float(by2 - by1)],
                     "segmentation": [np.round(clipped, 2).reshape(-1).tolist()]})
    if crowd_cat is not None and counts[255] > 0:
        ys, xs = np.nonzero((own == 255).any(axis=1))[0], np.nonzero((own == 255).any(axis=0))[0]
        x1, y1, x2, y2 = float(xs[0]), float(ys[0]), float(xs[-1] + 1), float(ys[-1] + 1)
        anns.append({"category_id": crowd_cat, "iscrowd": 1,
                     "area": float(counts[255]), "bbox": [x1, y1, x2 - x1, y2 - y1],
                     "segmentation": [[x1, y1, x2, y1, x2, y2, x1, y2]]})
    return canvas, anns


def _jitter(rng: np.random.Generator, rgb) -> tuple[int, int, int]:
    return tuple(int(v) for v in np.clip(np.asarray(rgb) + rng.integers(-18, 19, size=3), 0, 255))


# -- writing ------------------------------------------------------------------------------------
def _render_and_save(args) -> tuple[dict, list[dict]]:
    spec, split, index, image_dir = args
    image, anns = render_image(spec, split, index)
    image_id = _ID_OFFSET[split] + index + 1
    file_name = f"{image_id:012d}.jpg"
    image.save(os.path.join(image_dir, file_name), quality=spec.jpeg_quality)
    info = {"id": image_id, "file_name": file_name, "height": image.height, "width": image.width}
    return info, anns


def generate_split(spec: SyntheticSpec, split: str, root: str | os.PathLike, workers: int = 1,
                   pool=None) -> dict:
    """Write ``root/{split}2017/*.jpg`` and ``root/annotations/instances_{split}2017.json``.

    Returns the COCO dict written. ``workers > 1`` (or a ``multiprocessing`` ``pool`` to reuse)
    renders in worker processes; the output is the same.
    """
    if split not in _SPLITS:
        raise ValueError(f"split must be one of {sorted(_SPLITS)}, got {split!r}")
    num = spec.num_train if split == "train" else spec.num_val
    if num < 1:
        field = "num_train" if split == "train" else "num_val"
        raise FieldError("SyntheticSpec", field, num, f"an int >= 1 to write the {split} split")
    root = Path(root)
    image_dir = root / f"{split}2017"
    image_dir.mkdir(parents=True, exist_ok=True)
    (root / "annotations").mkdir(parents=True, exist_ok=True)
    jobs = [(spec, split, i, str(image_dir)) for i in range(num)]
    bar = dict(total=num, desc=f"synthetic {split} images", unit="img")
    if pool is not None:
        results = list(progress(pool.imap(_render_and_save, jobs, chunksize=max(1, num // 32)), **bar))
    elif workers > 1 and num > 1:
        with get_context("spawn").Pool(workers) as own:
            results = list(progress(own.imap(_render_and_save, jobs, chunksize=max(1, num // (8 * workers))),
                                    **bar))
    else:
        results = [_render_and_save(j) for j in progress(jobs, **bar)]
    images, annotations = [], []
    next_ann = _ID_OFFSET[split] + 1
    for info, anns in results:
        images.append(info)
        for a in anns:
            annotations.append({"id": next_ann, "image_id": info["id"], **a})
            next_ann += 1
    data = {
        "info": {"description": "atss-ray synthetic shapes", "version": str(GENERATOR_VERSION),
                 "generator": asdict(spec)},
        "licenses": [],
        "images": images,
        "annotations": annotations,
        "categories": spec.categories(),
    }
    with open(root / "annotations" / f"instances_{split}2017.json", "w") as f:
        json.dump(data, f)
    return data


def make_synthetic_coco(root: str | os.PathLike, spec: SyntheticSpec = SyntheticSpec(),
                        workers: int = 1) -> Path:
    """Generate both splits of ``spec`` into ``root`` (a COCO-style root); returns ``root``."""
    root = Path(root)
    if workers > 1:
        with get_context("spawn").Pool(workers) as pool:
            for split in ("train", "val"):
                generate_split(spec, split, root, pool=pool)
    else:
        for split in ("train", "val"):
            generate_split(spec, split, root)
    return root


def default_cache_dir() -> Path:
    return Path(os.environ.get("ATSS_RAY_CACHE", Path.home() / ".cache" / "atss_ray")) / "synthetic"


def ensure_synthetic(spec: SyntheticSpec, cache_dir: str | os.PathLike | None = None) -> Path:
    """The cached COCO root for ``spec``, generating it first if needed.

    Safe when several processes (Ray Train workers, DataLoader workers, parallel tests) ask at
    once: each generates into its own temp dir and renames it into place; a loser of the race
    discards its copy and uses the winner's, which is identical.
    """
    cache = Path(cache_dir) if cache_dir else default_cache_dir()
    final = cache / spec.key()
    if (final / ".complete").exists():
        return final
    cache.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{spec.key()}-", dir=cache))
    try:
        t0 = time.perf_counter()
        make_synthetic_coco(tmp, spec)
        (tmp / ".complete").write_text(json.dumps(asdict(spec)))
        try:
            os.rename(tmp, final)
            log.info("generated synthetic COCO (%d train / %d val images) in %.1fs at %s",
                     spec.num_train, spec.num_val, time.perf_counter() - t0, final)
        except OSError as e:
            if not (final / ".complete").exists():
                raise OSError(f"cannot move the generated synthetic data into {final} ({e}); if that folder "
                              f"is a leftover without a .complete marker, delete it") from e
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    return final
