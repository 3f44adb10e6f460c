"""Annotation index: convert an instances json once, then memory-map it in every worker.

One row per image::

    image_id int64, file_name string, height int32, width int32,
    ann_ids list<int64>, boxes list<fixed_size_list<float32, 4>> (xyxy, original pixels, raw),
    category_ids list<int32> (COCO ids), areas list<float32>, iscrowd list<bool>

The COCO ``categories`` block, the source file name and the format version are in the schema
metadata. Two containers hold the same table:

- ``.parquet`` (default): compact and standard. Read with ``pq.read_table(memory_map=True)``;
  Parquet pages must be decoded, so each process holds the decoded columns (~40 MB for COCO
  train2017, against several GB for the parsed json).
- ``.arrow`` (Arrow IPC file, uncompressed): read zero-copy from ``pyarrow.memory_map``; the
  columns *are* the mapped file pages, shared through the page cache by every process on the
  machine, forked or not.

Either way the per-image columns are exposed as numpy views of flat Arrow buffers: a sample is
decoded only when asked for, and a forked DataLoader worker touches no Python object per box
(no copy-on-write churn from reference counts).
"""
from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from .annotations import AnnotationError, AnnotationTable, load_coco_json
from ..progress import progress

__all__ = ["build_index", "write_index", "read_index", "load_annotations", "INDEX_VERSION", "INDEX_SUFFIXES"]

INDEX_VERSION = "1"
_COLUMNS = ("image_id", "file_name", "height", "width", "ann_ids", "boxes", "category_ids", "areas", "iscrowd")
_META_PREFIX = b"atss_ray."


def _list_column(offsets: np.ndarray, values: pa.Array) -> pa.ListArray:
    return pa.ListArray.from_arrays(pa.array(offsets.astype(np.int32)), values)


INDEX_SUFFIXES = (".parquet", ".arrow")


def write_index(table: AnnotationTable, out: str | os.PathLike) -> Path:
    """Write ``table`` as an index at ``out`` (``.parquet`` or ``.arrow``), atomically."""
    out = Path(out)
    if out.suffix not in INDEX_SUFFIXES:
        raise ValueError(f"index file name must end in {' or '.join(INDEX_SUFFIXES)}: {out}")
    off = table.offsets
    boxes = pa.FixedSizeListArray.from_arrays(pa.array(table.boxes.reshape(-1), pa.float32()), 4)
    arrow = pa.table({
        "image_id": pa.array(table.image_ids, pa.int64()),
        "file_name": table.file_names,
        "height": pa.array(table.heights, pa.int32()),
        "width": pa.array(table.widths, pa.int32()),
        "ann_ids": _list_column(off, pa.array(table.ann_ids, pa.int64())),
        "boxes": _list_column(off, boxes),
        "category_ids": _list_column(off, pa.array(table.category_ids.astype(np.int32), pa.int32())),
        "areas": _list_column(off, pa.array(table.areas, pa.float32())),
        "iscrowd": _list_column(off, pa.array(table.iscrowd, pa.bool_())),
    })
    meta = {
        _META_PREFIX + b"version": INDEX_VERSION.encode(),
        _META_PREFIX + b"categories": json.dumps(table.categories).encode(),
        _META_PREFIX + b"source": os.path.basename(table.source).encode(),
        _META_PREFIX + b"has_annotations": b"1" if table.has_annotations else b"0",
    }
    arrow = arrow.replace_schema_metadata(meta)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(f".{out.name}.{os.getpid()}.tmp")
    try:
        if out.suffix == ".parquet":
            # Uncompressed pages: decoding is a copy of the mapped bytes, no decompression pass.
            pq.write_table(arrow, tmp, compression="none", row_group_size=1 << 20)
        else:
            with pa.OSFile(str(tmp), "wb") as sink, pa.ipc.new_file(sink, arrow.schema) as writer:
                writer.write_table(arrow, max_chunksize=1 << 30)  # one record batch: no concatenation on read
        os.replace(tmp, out)
    finally:
        if tmp.exists():
            tmp.unlink()
    return out


def build_index(ann_file: str | os.PathLike, out: str | os.PathLike) -> AnnotationTable:
    """Convert a COCO instances/image-info json to an index (``.parquet``/``.arrow``); returns the table."""
    # Two long steps without a loop to count: the bar names the step and the time spent.
    with progress(total=2, desc=f"index {Path(ann_file).name}", unit="step",
                  bar_format="{desc}: {postfix} (step {n_fmt}/{total_fmt}, {elapsed})") as bar:
        bar.set_postfix_str("parsing the json")
        table, _ = load_coco_json(ann_file)
        bar.update()
        bar.set_postfix_str(f"writing {Path(out).name}")
        write_index(table, out)
        bar.update()
    return table


def _single(col: pa.ChunkedArray | pa.Array) -> pa.Array:
    """One array for a column; a single chunk is used as is (``combine_chunks`` would copy it)."""
    if isinstance(col, pa.ChunkedArray):
        return col.chunk(0) if col.num_chunks == 1 else col.combine_chunks()
    return col


def _flat(col: pa.ChunkedArray | pa.Array, depth: int) -> tuple[np.ndarray, np.ndarray]:
    """(offsets int64[N+1], flat values numpy) of a list column, ``depth`` list levels deep."""
    arr = _single(col)
    offsets = arr.offsets.to_numpy().astype(np.int64)
    values = arr.values
    for _ in range(depth - 1):
        values = values.values  # fixed_size_list child: no offsets of its own
    if pa.types.is_boolean(values.type):
        return offsets, values.to_numpy(zero_copy_only=False)  # bit-packed: needs unpacking
    return offsets, values.to_numpy(zero_copy_only=True)


def read_index(path: str | os.PathLike) -> AnnotationTable:
    """Memory-map an index written by :func:`write_index` into an :class:`AnnotationTable`."""
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"annotation index not found: {path}")
    kind = "Arrow IPC" if path.suffix == ".arrow" else "Parquet"
    try:
        if path.suffix == ".arrow":
            arrow = pa.ipc.open_file(pa.memory_map(str(path), "r")).read_all()  # zero-copy
        else:
            arrow = pq.read_table(path, memory_map=True)
    except (pa.ArrowInvalid, OSError) as e:
        raise AnnotationError(f"{path} is not a readable {kind} annotation index: {e}") from e
    meta = arrow.schema.metadata or {}
    if _META_PREFIX + b"version" not in meta:
        raise AnnotationError(f"{path} is a {kind} file but not an atss-ray annotation index "
                              f"(no {(_META_PREFIX + b'version').decode()} metadata); build one with "
                              f"jobs/build_index.py")
    version = meta[_META_PREFIX + b"version"].decode()
    if version != INDEX_VERSION:
        raise AnnotationError(f"{path}: index version {version}, this code reads {INDEX_VERSION}; rebuild it")
    missing = [c for c in _COLUMNS if c not in arrow.column_names]
    if missing:
        raise AnnotationError(f"{path}: annotation index lacks column(s) {missing}; rebuild it with jobs/build_index.py")
    cols = {}
    for name, depth in (("ann_ids", 1), ("boxes", 2), ("category_ids", 1), ("areas", 1), ("iscrowd", 1)):
        cols[name] = _flat(arrow.column(name), depth)
    offsets = cols["ann_ids"][0]
    for name, (o, _) in cols.items():
        if not np.array_equal(o, offsets):
            raise AnnotationError(f"{path}: column {name!r} does not line up with 'ann_ids'")
    # Offsets index the full child arrays; rebase in case the column was a slice.
    first = int(offsets[0])
    flat = {name: v[first * (4 if name == "boxes" else 1):] for name, (_, v) in cols.items()}
    table = AnnotationTable(
        source=str(path),
        image_ids=_single(arrow.column("image_id")).to_numpy(),
        file_names=_single(arrow.column("file_name")),
        heights=_single(arrow.column("height")).to_numpy(),
        widths=_single(arrow.column("width")).to_numpy(),
        offsets=offsets - first,
        ann_ids=flat["ann_ids"],
        boxes=flat["boxes"].reshape(-1, 4),
        category_ids=flat["category_ids"],
        areas=flat["areas"],
        iscrowd=flat["iscrowd"],
        categories=json.loads(meta[_META_PREFIX + b"categories"]),
        has_annotations=meta.get(_META_PREFIX + b"has_annotations", b"1") == b"1",
    )
    table.validate_categories()
    return table


def load_annotations(path: str | os.PathLike, *, keep_coco: bool = False):
    """Load an instances/image-info json (via pycocotools) or a ``.parquet``/``.arrow`` index.

    Returns ``(table, coco)`` where ``coco`` is the pycocotools object for a json loaded
    with ``keep_coco=True`` and ``None`` otherwise.
    """
    path = Path(path)
    if path.suffix in INDEX_SUFFIXES:
        return read_index(path), None
    return load_coco_json(path, keep_coco=keep_coco)
