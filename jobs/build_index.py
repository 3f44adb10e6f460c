"""Convert a COCO instances (or image-info) json to a Parquet annotation index, once.

    python jobs/build_index.py /data/coco/annotations/instances_train2017.json \
        [--out /data/coco/annotations/instances_train2017.parquet]

Training workers then read the index memory-mapped instead of each parsing the json:
``DataConfig(source="files", train_ann=".../instances_train2017.parquet", train_images=...)``.
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from pipeline.data.annotations import AnnotationError  # noqa: E402
from pipeline.data.index import build_index  # noqa: E402


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("ann_file", help="COCO instances json")
    p.add_argument("--out", help="output .parquet (default: beside the json, same stem)")
    a = p.parse_args(argv)
    src = Path(a.ann_file)
    out = Path(a.out) if a.out else src.with_suffix(".parquet")
    t0 = time.perf_counter()
    try:
        table = build_index(src, out)
    except (OSError, AnnotationError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(json.dumps({
        "source": str(src), "index": str(out), "images": table.num_images, "boxes": table.num_boxes,
        "crowd": int(table.iscrowd.sum()), "categories": len(table.categories),
        "index_bytes": out.stat().st_size, "seconds": round(time.perf_counter() - t0, 2),
    }, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
