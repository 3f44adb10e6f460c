"""Generate the synthetic COCO-format shapes dataset (JPEGs + instances json).

    python jobs/make_synthetic.py --out data/synthetic --train-images 300 --val-images 50 \
        --min-size 160 --max-size 256 --num-classes 5 --seed 0 --workers 2

Writes ``OUT/annotations/instances_{train,val}2017.json`` and ``OUT/{train,val}2017/*.jpg``,
the layout ``DataConfig(source="coco:OUT")`` reads. Same seed and sizes give identical files.
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from multiprocessing import get_context  # noqa: E402

from pipeline.synthetic import CATEGORIES, SyntheticSpec, generate_split  # noqa: E402


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--out", required=True, help="output COCO root directory")
    p.add_argument("--train-images", type=int, default=300)
    p.add_argument("--val-images", type=int, default=50)
    p.add_argument("--min-size", type=int, default=160, help="smallest image side (px)")
    p.add_argument("--max-size", type=int, default=256, help="largest image side (px)")
    p.add_argument("--num-classes", type=int, default=5, help=f"1..{len(CATEGORIES)}")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--workers", type=int, default=1, help="processes (output does not depend on it)")
    p.add_argument("--force", action="store_true", help="overwrite an existing dataset in --out")
    a = p.parse_args(argv)
    try:
        spec = SyntheticSpec(num_train=a.train_images, num_val=a.val_images,
                             image_size=(a.min_size, a.max_size), num_classes=a.num_classes, seed=a.seed)
    except ValueError as e:
        p.error(str(e))
    out = Path(a.out)
    existing = [out / "annotations" / f"instances_{s}2017.json" for s in ("train", "val")]
    if any(f.exists() for f in existing) and not a.force:
        p.error(f"{out} already holds a dataset ({', '.join(str(f) for f in existing if f.exists())}); "
                f"pass --force to overwrite")
    summary = {"out": str(out), "spec": spec.__dict__ | {"image_size": list(spec.image_size)}}
    pool = get_context("spawn").Pool(a.workers) if a.workers > 1 else None
    try:
        for split in ("train", "val"):
            t0 = time.perf_counter()
            data = generate_split(spec, split, out, pool=pool)
            dt = time.perf_counter() - t0
            summary[split] = _split_summary(data, dt)
    finally:
        if pool is not None:
            pool.close()
            pool.join()
    print(json.dumps(summary, indent=2))
    return 0


def _split_summary(data: dict, dt: float) -> dict:
    anns = data["annotations"]
    return {"images": len(data["images"]), "boxes": len(anns), "crowd": sum(x["iscrowd"] for x in anns),
            "seconds": round(dt, 2), "images_per_s": round(len(data["images"]) / dt, 1) if dt > 0 else None}


if __name__ == "__main__":
    sys.exit(main())
