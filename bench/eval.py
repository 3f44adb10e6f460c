"""COCO box evaluation time: pycocotools vs faster-coco-eval on the same detections.

Two inputs: the real reference detections on the shared 12-image val slice (when present; repeated
so the time is measurable) and a synthetic COCO-sized set (random GT over 80 categories and all
three area ranges, 100 detections per image: jittered true boxes plus clutter). Both backends run
through ``pipeline.evaluation.evaluate_coco``, so the times include loading the results and building
the COCO index, as a real evaluation does. Prints a markdown table of times, their ratio, both
metric sets and whether they agree to 3 decimals (and the largest difference).

    python bench/eval.py              # 1000 synthetic images (~2 min on 2 cores)
    python bench/eval.py --full       # 5000 images, the size of val2017
    python bench/eval.py --json       # also print the figures as one JSON object on the last line
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from pipeline.evaluation import METRIC_KEYS, evaluate_coco  # noqa: E402

SHARED = REPO.parent / "shared" / "data" / "coco_testdev_sample"


def synthetic_coco(num_images: int, dets_per_image: int = 100, num_classes: int = 80,
                   seed: int = 0) -> tuple[dict, list[dict]]:
    """Random ground truth (1..15 boxes per image, sides log-uniform 8..400 px so small, medium
    and large all occur, 1% crowd) and detections: 1-3 jittered copies of each GT box with random
    scores (some with a wrong class), then random clutter up to ``dets_per_image``."""
    rng = np.random.default_rng(seed)
    cat_ids = np.arange(1, num_classes + 1) + (np.arange(num_classes) // 10)  # COCO-like gaps
    images, anns, dets = [], [], []
    aid = 1
    for i in range(num_images):
        img_id = 1000 + i
        w_img, h_img = 640, int(rng.integers(360, 641))
        images.append({"id": img_id, "width": w_img, "height": h_img, "file_name": f"{img_id}.jpg"})
        n = int(rng.integers(1, 16))
        side = np.exp(rng.uniform(np.log(8), np.log(400), size=(n, 2)))
        wh = np.minimum(side, [w_img - 1, h_img - 1])
        xy = rng.uniform(0, 1, size=(n, 2)) * ([w_img, h_img] - wh)
        cats = rng.choice(cat_ids, size=n)
        img_dets = []
        for (x, y), (w, h), c in zip(xy, wh, cats):
            anns.append({"id": aid, "image_id": img_id, "category_id": int(c),
                         "bbox": [float(x), float(y), float(w), float(h)], "area": float(w * h),
                         "iscrowd": int(rng.random() < 0.01)})
            aid += 1
            for _ in range(int(rng.integers(1, 4))):
                jit = rng.normal(0, 0.1, size=4) * [w, h, w, h]
                bw, bh = max(w + jit[2], 1.0), max(h + jit[3], 1.0)
                cat = int(c) if rng.random() < 0.9 else int(rng.choice(cat_ids))
                img_dets.append((x + jit[0], y + jit[1], bw, bh, float(rng.uniform(0.05, 1)), cat))
        clutter = max(dets_per_image - len(img_dets), 0)
        cwh = np.exp(rng.uniform(np.log(4), np.log(300), size=(clutter, 2)))
        cxy = rng.uniform(0, 1, size=(clutter, 2)) * ([w_img, h_img] - np.minimum(cwh, [w_img, h_img]))
        for (x, y), (w, h), s, c in zip(cxy, cwh, rng.uniform(0.05, 0.6, clutter),
                                        rng.choice(cat_ids, clutter)):
            img_dets.append((x, y, w, h, float(s), int(c)))
        img_dets.sort(key=lambda d: -d[4])
        for x, y, w, h, s, c in img_dets[:dets_per_image]:
            # inside the image, as a detector's clipped boxes are (evaluate_coco refuses others)
            x1, y1 = min(max(x, 0.0), w_img - 1.0), min(max(y, 0.0), h_img - 1.0)
            x2, y2 = min(max(x + w, x1 + 1.0), w_img), min(max(y + h, y1 + 1.0), h_img)
            dets.append({"image_id": img_id, "category_id": c,
                         "bbox": [float(x1), float(y1), float(x2 - x1), float(y2 - y1)], "score": s})
    cats = [{"id": int(c), "name": f"class_{int(c)}"} for c in cat_ids]
    return {"images": images, "annotations": anns, "categories": cats}, dets


def time_backends(gt, dets, repeat: int) -> dict:
    out = {}
    for backend in ("pycocotools", "faster"):
        evaluate_coco(gt, dets[:50], backend=backend)  # warm imports
        t0 = time.perf_counter()
        for _ in range(repeat):
            metrics = evaluate_coco(gt, dets, backend=backend)
        out[backend] = {"seconds": (time.perf_counter() - t0) / repeat, "metrics": metrics}
    a, b = out["pycocotools"]["metrics"], out["faster"]["metrics"]
    diffs = [abs(a[k] - b[k]) for k in METRIC_KEYS]
    cat_diffs = [abs(a["per_category"][c] - b["per_category"].get(c, float("inf")))
                 for c in a["per_category"]]
    out["max_abs_diff"] = max(diffs)
    out["max_abs_diff_per_category"] = max(cat_diffs, default=0.0)
    out["identical_3dp"] = (all(round(a[k], 3) == round(b[k], 3) for k in METRIC_KEYS)
                            and a["per_category"].keys() == b["per_category"].keys()
                            and all(round(a["per_category"][c], 3) == round(b["per_category"][c], 3)
                                    for c in a["per_category"]))
    out["speedup"] = out["pycocotools"]["seconds"] / out["faster"]["seconds"]
    return out


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--full", action="store_true", help="5000 synthetic images (val2017 size)")
    ap.add_argument("--images", type=int, default=None, help="synthetic image count (default 1000)")
    ap.add_argument("--repeat-reference", type=int, default=20)
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args(argv)
    n = args.images or (5000 if args.full else 1000)

    runs = {}
    if (SHARED / "annotations/instances_val2017.json").is_file():
        gt = json.loads((SHARED / "annotations/instances_val2017.json").read_text())
        dets = json.loads((SHARED / "reference_results/mask_rcnn_r50_fpn_1x_val_bbox.json").read_text())
        runs[f"reference (12 img, {len(dets)} dets, x{args.repeat_reference})"] = \
            time_backends(gt, dets, args.repeat_reference)
    t0 = time.perf_counter()
    gt, dets = synthetic_coco(n)
    print(f"synthetic set: {n} images, {len(gt['annotations'])} GT, {len(dets)} detections "
          f"(built in {time.perf_counter() - t0:.1f} s)", flush=True)
    runs[f"synthetic ({n} img, {len(dets)} dets)"] = time_backends(gt, dets, 1)

    print("\n| input | pycocotools s | faster s | speedup | identical to 3 dp | max abs diff |")
    print("|---|---|---|---|---|---|")
    for name, r in runs.items():
        print(f"| {name} | {r['pycocotools']['seconds']:.3f} | {r['faster']['seconds']:.3f} | "
              f"{r['speedup']:.1f}x | {'yes' if r['identical_3dp'] else 'NO'} | "
              f"{max(r['max_abs_diff'], r['max_abs_diff_per_category']):.2e} |")
    print("\n| input | backend | " + " | ".join(METRIC_KEYS) + " |")
    print("|---|---|" + "---|" * len(METRIC_KEYS))
    for name, r in runs.items():
        for backend in ("pycocotools", "faster"):
            m = r[backend]["metrics"]
            print(f"| {name} | {backend} | " + " | ".join(f"{m[k]:.3f}" for k in METRIC_KEYS) + " |")
    summary = {name: {"pycocotools_s": r["pycocotools"]["seconds"], "faster_s": r["faster"]["seconds"],
                      "speedup": r["speedup"], "identical_3dp": r["identical_3dp"],
                      "max_abs_diff": max(r["max_abs_diff"], r["max_abs_diff_per_category"]),
                      "metrics": {b: {k: r[b]["metrics"][k] for k in METRIC_KEYS}
                                  for b in ("pycocotools", "faster")}}
               for name, r in runs.items()}
    if args.json:
        print(json.dumps(summary))
    return summary


if __name__ == "__main__":
    main()
