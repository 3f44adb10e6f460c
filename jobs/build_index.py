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
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from pipeline.cli import UsageError, add_exit_codes, bad_input, run_main  # noqa: E402
from pipeline.data.annotations import AnnotationError  # noqa: E402
from pipeline.data.index import INDEX_SUFFIXES, build_index  # noqa: E402

BAD_INPUT = """bad input (exit 2): an annotation file that is missing, not JSON or not COCO (names the file and
  the record), an --out that does not end in .parquet/.arrow or cannot be written"""


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("ann_file", help="COCO instances json")
    p.add_argument("--out", help=f"output index, {' or '.join(INDEX_SUFFIXES)} (default: beside the json, "
                                 "same stem, .parquet)")
    return add_exit_codes(p, BAD_INPUT)


def check_paths(src: Path, out: Path) -> None:
    """Before parsing anything: the json exists and the index can be written where asked."""
    if not src.is_file():
        raise UsageError(f"ann_file {src}: " + ("is a directory" if src.is_dir() else "no such file"))
    if out.suffix not in INDEX_SUFFIXES:
        raise UsageError(f"--out {out}: the index file name must end in {' or '.join(INDEX_SUFFIXES)}")
    try:
        with tempfile.TemporaryFile(dir=out.parent):
            pass
    except OSError as e:
        raise UsageError(f"--out {out}: cannot write in {out.parent} ({e.strerror or e})") from None


def main(argv=None) -> int:
    a = build_parser().parse_args(argv)
    src = Path(a.ann_file)
    out = Path(a.out) if a.out else src.with_suffix(".parquet")
    check_paths(src, out)
    t0 = time.perf_counter()
    with bad_input(ValueError, OSError):  # the json's content (decode errors included) is the user's input
        table = build_index(src, out)
    print(json.dumps({
        "source": str(src), "index": str(out), "images": table.num_images, "boxes": table.num_boxes,
        "crowd": int(table.iscrowd.sum()), "categories": len(table.categories),
        "index_bytes": out.stat().st_size, "seconds": round(time.perf_counter() - t0, 2),
    }, indent=2))
    return 0


if __name__ == "__main__":
    run_main(main, errors=(AnnotationError,))
