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
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from multiprocessing import get_context  # noqa: E402

from detector.fields import FieldError  # noqa: E402
from pipeline.cli import UsageError, add_exit_codes, run_main  # noqa: E402
from pipeline.synthetic import CATEGORIES, SyntheticSpec, generate_split  # noqa: E402

# SyntheticSpec field -> the option that sets it (errors name the option the user typed).
OPTIONS = {"num_train": "--train-images", "num_val": "--val-images", "image_size": "--min-size/--max-size",
           "num_classes": "--num-classes", "seed": "--seed"}
BAD_INPUT = """bad input (exit 2): an option of the wrong type or out of range (fewer than 1 image per split,
  --workers < 1, --num-classes outside 1..8, --min-size > --max-size), an --out that cannot be written,
  a dataset already in --out without --force"""


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--out", required=True, help="output COCO root directory")
    p.add_argument("--train-images", type=int, default=300, help=">= 1")
    p.add_argument("--val-images", type=int, default=50, help=">= 1")
    p.add_argument("--min-size", type=int, default=160, help="smallest image side (px, >= 32)")
    p.add_argument("--max-size", type=int, default=256, help="largest image side (px)")
    p.add_argument("--num-classes", type=int, default=5, help=f"1..{len(CATEGORIES)}")
    p.add_argument("--seed", type=int, default=0, help=">= 0")
    p.add_argument("--workers", type=int, default=1, help="processes, >= 1 (output does not depend on it)")
    p.add_argument("--force", action="store_true", help="overwrite an existing dataset in --out")
    return add_exit_codes(p, BAD_INPUT)


def spec_from_args(a: argparse.Namespace) -> SyntheticSpec:
    """The spec the options describe; a bad value raises ``UsageError`` naming its option."""
    for option, value in (("--train-images", a.train_images), ("--val-images", a.val_images)):
        if value < 1:
            raise UsageError(f"{option} {value}: expected an int >= 1 (a split of 0 images is an empty dataset)")
    if a.workers < 1:
        raise UsageError(f"--workers {a.workers}: expected an int >= 1")
    try:
        return SyntheticSpec(num_train=a.train_images, num_val=a.val_images, image_size=(a.min_size, a.max_size),
                             num_classes=a.num_classes, seed=a.seed)
    except FieldError as e:
        raise UsageError(f"{OPTIONS.get(e.field, e.field)} {e.value}: expected {e.allowed}") from None


def check_output(out: Path, force: bool) -> None:
    """``out`` can be written and holds no dataset unless ``force``: checked before any image is drawn."""
    existing = [out / "annotations" / f"instances_{s}2017.json" for s in ("train", "val")]
    if any(f.exists() for f in existing) and not force:
        raise UsageError(f"--out {out} already holds a dataset ({', '.join(str(f) for f in existing if f.exists())}); "
                         f"pass --force to overwrite")
    try:
        out.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryFile(dir=out):
            pass
    except OSError as e:
        raise UsageError(f"--out {out}: cannot write there ({e.strerror or e})") from None


def main(argv=None) -> int:
    a = build_parser().parse_args(argv)
    spec = spec_from_args(a)
    out = Path(a.out)
    check_output(out, a.force)
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
    run_main(main)
