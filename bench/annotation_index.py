"""Annotation loading: COCO json (pycocotools / our json path) vs the memory-mapped index.

Generates an instances json the size of COCO train2017 (118,287 images, ~860k boxes, with
polygon segmentations so the file is ~450 MB like the real one; no JPEGs), converts it once to
the Parquet index (and the Arrow IPC variant), then loads each in a fresh subprocess and reports
wall time, peak RSS while loading, the heap the loaded annotations keep (what each additional
training worker costs) and the file-backed pages (shared page cache). Ratios are against
pycocotools' ``COCO(json)``.

    python bench/annotation_index.py                 # COCO train size (a few minutes on 2 cores)
    python bench/annotation_index.py --images 20000  # smaller
    python bench/annotation_index.py --full          # same as the default: COCO train is the full size

The generated json is cached in --workdir and reused by later runs.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
COCO_TRAIN_IMAGES = 118_287
BOXES_PER_IMAGE = 860_001 / 118_287  # COCO train2017: 860,001 boxes
# COCO's 80 category ids (1..90 with gaps).
COCO_IDS = [i for i in range(1, 91) if i not in (12, 26, 29, 30, 45, 66, 68, 69, 71, 83)]


def generate_instances_json(path: Path, num_images: int, seed: int = 0) -> dict:
    """Write a COCO-train-like instances json (random but well-formed); returns counts."""
    rng = np.random.default_rng(seed)
    heights = rng.choice([480, 427, 640, 375, 500, 612], size=num_images)
    widths = rng.choice([640, 640, 480, 500, 612, 427], size=num_images)
    counts = np.minimum(rng.poisson(BOXES_PER_IMAGE - 1, size=num_images) + 1, 90)
    n_boxes = int(counts.sum())
    img_of = np.repeat(np.arange(num_images), counts)
    w_img, h_img = widths[img_of].astype(np.float64), heights[img_of].astype(np.float64)
    # Sizes spread like COCO: many small, some large.
    side = np.exp(rng.uniform(np.log(4), np.log(0.9 * np.minimum(w_img, h_img))))
    bw = np.minimum(side * np.exp(rng.normal(0, 0.4, n_boxes)), w_img)
    bh = np.minimum(side * np.exp(rng.normal(0, 0.4, n_boxes)), h_img)
    x = rng.uniform(0, w_img - bw)
    y = rng.uniform(0, h_img - bh)
    crowd = rng.random(n_boxes) < 0.01
    cats = rng.choice(COCO_IDS, size=n_boxes)
    n_pts = rng.integers(6, 42, size=n_boxes)  # polygon vertices: COCO averages ~24
    ids = 1 + np.arange(num_images) * 7 + rng.integers(0, 7, size=num_images)  # sparse, like COCO's
    with open(path, "w") as f:
        f.write('{"info": {"description": "synthetic COCO-train-sized annotations (bench)"}, "licenses": [], ')
        images = [{"license": 1, "file_name": f"{i:012d}.jpg", "coco_url": "", "height": int(h), "width": int(w),
                   "date_captured": "2013-11-14 11:18:45", "flickr_url": "", "id": int(i)}
                  for i, h, w in zip(ids, heights, widths)]
        f.write('"images": ' + json.dumps(images) + ', "annotations": [')
        chunk = 20_000
        for s in range(0, n_boxes, chunk):
            anns = []
            for j in range(s, min(s + chunk, n_boxes)):
                k = int(n_pts[j])
                if crowd[j]:
                    seg = {"counts": rng.integers(1, 400, size=4 * k).tolist(), "size": [int(h_img[j]), int(w_img[j])]}
                else:
                    t = np.linspace(0, 2 * np.pi, k, endpoint=False)
                    px = x[j] + bw[j] * (0.5 + 0.5 * np.cos(t))
                    py = y[j] + bh[j] * (0.5 + 0.5 * np.sin(t))
                    seg = [np.round(np.stack([px, py], 1).reshape(-1), 2).tolist()]
                anns.append({"segmentation": seg, "area": round(float(bw[j] * bh[j] * 0.6), 4),
                             "iscrowd": int(crowd[j]), "image_id": int(ids[img_of[j]]),
                             "bbox": [round(float(x[j]), 2), round(float(y[j]), 2), round(float(bw[j]), 2),
                                      round(float(bh[j]), 2)],
                             "category_id": int(cats[j]), "id": 900_000 + j})
            f.write(("," if s else "") + json.dumps(anns)[1:-1])
        categories = [{"supercategory": "thing", "id": c, "name": f"category_{c}"} for c in COCO_IDS]
        f.write('], "categories": ' + json.dumps(categories) + "}")
    return {"images": num_images, "boxes": n_boxes, "crowd": int(crowd.sum())}


# Runs in a fresh interpreter per measurement so peaks do not mix.
_CHILD = r"""
import json, os, sys, time
sys.path.insert(0, {repo!r})

def status():
    out = {{}}
    for line in open("/proc/self/status"):
        k, _, v = line.partition(":")
        if k in ("VmRSS", "VmHWM", "RssAnon", "RssFile"):
            out[k] = int(v.split()[0]) / 1024
    return out

mode, path, image_dir, warm_json, warm_parquet, warm_arrow = sys.argv[1:7]
import contextlib, gc, io
import numpy
from pycocotools.coco import COCO
from pipeline.data import CocoDetection

def load(p):
    if mode == "pycocotools":
        with contextlib.redirect_stdout(io.StringIO()):
            return COCO(p)
    return CocoDetection(p, image_dir, train=True)

# Warm up on a 10-image file first: library code, thread pools and allocator arenas are paid once
# per process whatever the data size, and are not what this compares.
load({{"parquet": warm_parquet, "arrow": warm_arrow}}.get(mode, warm_json))
gc.collect()
base = status()
t0 = time.perf_counter()
obj = load(path)
load_s = time.perf_counter() - t0
gc.collect()
st = status()
row = {{"mode": mode, "load_s": load_s, "base_mb": base["VmRSS"], "peak_mb": st["VmHWM"] - base["VmRSS"],
        "held_mb": st["VmRSS"] - base["VmRSS"], "anon_mb": st["RssAnon"] - base["RssAnon"],
        "file_mb": st["RssFile"] - base["RssFile"], "per_sample_us": None}}
if mode == "pycocotools":
    row["n"] = len(obj.imgs)
else:
    # Per-sample annotation decoding (clip, filter, label mapping) as __getitem__ does it.
    row["n"] = n = len(obj)
    rows = numpy.random.default_rng(0).choice(n, size=min(n, 20000), replace=False)
    t1 = time.perf_counter()
    for i in rows:
        obj.annotations(int(i))
    row["per_sample_us"] = (time.perf_counter() - t1) / len(rows) * 1e6
print(json.dumps(row))
"""


def measure(mode: str, path: Path, work: Path) -> dict:
    code = _CHILD.format(repo=str(REPO))
    env = dict(os.environ, OMP_NUM_THREADS="1")
    args = [mode, path, work / "images", work / "warmup.json", work / "warmup.parquet", work / "warmup.arrow"]
    r = subprocess.run([sys.executable, "-c", code, *map(str, args)],
                       capture_output=True, text=True, env=env)
    if r.returncode != 0:
        raise RuntimeError(f"{mode} measurement failed:\n{r.stderr[-3000:]}")
    return json.loads(r.stdout.strip().splitlines()[-1])


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--images", type=int, default=COCO_TRAIN_IMAGES, help="images in the generated json")
    p.add_argument("--full", action="store_true", help="COCO train2017 size (the default already)")
    p.add_argument("--workdir", default=os.path.join(tempfile.gettempdir(), "atss_bench_index"))
    p.add_argument("--repeat", type=int, default=1, help="load each path this many times, keep the fastest")
    p.add_argument("--json", action="store_true", help="print the results as json too")
    a = p.parse_args(argv)
    n = COCO_TRAIN_IMAGES if a.full else a.images
    work = Path(a.workdir)
    work.mkdir(parents=True, exist_ok=True)
    (work / "images").mkdir(exist_ok=True)
    ann = work / f"instances_{n}.json"
    meta = work / f"instances_{n}.counts.json"
    if not (ann.exists() and meta.exists()):
        t0 = time.perf_counter()
        counts = generate_instances_json(ann.with_suffix(".tmp"), n)
        os.replace(ann.with_suffix(".tmp"), ann)
        meta.write_text(json.dumps(counts))
        print(f"generated {ann} ({counts['images']} images, {counts['boxes']} boxes) "
              f"in {time.perf_counter() - t0:.0f}s", flush=True)
    counts = json.loads(meta.read_text())
    sys.path.insert(0, str(REPO))
    from pipeline.data.index import build_index, write_index

    if not (work / "warmup.json").exists():
        generate_instances_json(work / "warmup.json", 10, seed=1)
    build_index(work / "warmup.json", work / "warmup.parquet")
    build_index(work / "warmup.json", work / "warmup.arrow")
    idx = work / f"instances_{n}.parquet"
    t0 = time.perf_counter()
    table = build_index(ann, idx)
    build_s = time.perf_counter() - t0
    arrow_idx = work / f"instances_{n}.arrow"
    write_index(table, arrow_idx)
    del table

    rows = []
    for mode, path in (("pycocotools", ann), ("json", ann), ("parquet", idx), ("arrow", arrow_idx)):
        runs = [measure(mode, path, work) for _ in range(a.repeat)]
        rows.append(min(runs, key=lambda r: r["load_s"]))
    ref = rows[0]
    print(f"\nannotations: {counts['images']} images, {counts['boxes']} boxes, {counts['crowd']} crowd; "
          f"json {ann.stat().st_size / 2**20:.0f} MiB, Parquet index {idx.stat().st_size / 2**20:.1f} MiB "
          f"(built once in {build_s:.1f}s), Arrow IPC {arrow_idx.stat().st_size / 2**20:.1f} MiB")
    print("each path in a fresh process, after a warm-up load of a 10-image file; MiB above that baseline.\n"
          "peak = peak RSS while loading; anon = heap kept after loading (what each extra worker costs);\n"
          "file = file-backed pages kept (the memory-mapped index: page cache, shared by all workers);\n"
          "us/sample = decoding one sample's annotations (clip, filter, labels), as __getitem__ does\n")
    hdr = f"{'path':<30}{'load s':>8}{'peak':>8}{'anon':>8}{'file':>7}{'us/sample':>10}" \
          f"{'time x':>8}{'peak x':>8}{'anon x':>8}"
    print(hdr)
    print("-" * len(hdr))
    names = {"pycocotools": "pycocotools COCO(json)", "json": "CocoDetection(json)",
             "parquet": "CocoDetection(.parquet)", "arrow": "CocoDetection(.arrow, mmap)"}
    for r in rows:
        us = "" if r["per_sample_us"] is None else f"{r['per_sample_us']:.1f}"
        print(f"{names[r['mode']]:<30}{r['load_s']:>8.2f}{r['peak_mb']:>8.0f}{r['anon_mb']:>8.0f}"
              f"{r['file_mb']:>7.0f}{us:>10}{ref['load_s'] / r['load_s']:>8.1f}"
              f"{ref['peak_mb'] / max(r['peak_mb'], 1):>8.1f}{ref['anon_mb'] / max(r['anon_mb'], 1):>8.1f}")
    print("\nx columns: pycocotools value / this path's value (higher = the path is cheaper).")
    if a.json:
        print(json.dumps({"counts": counts, "build_s": build_s, "rows": rows}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
