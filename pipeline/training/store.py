"""`Store`: one directory of small files, local or remote, through ``pyarrow.fs``.

A training run keeps its markers in ``Store(storage_path, run_name)`` (``atss/mlflow_run.json``,
``atss/nonfinite.json``, ...) beside Ray's ``checkpoint_*`` folders; a sweep keeps its plan, state
and results in ``Store(storage_path, sweep_name)``. ``storage_path`` is an absolute local path or a
URI (``s3://``, ``gs://``, ``file://``). Names may contain ``/`` (sub-folders are created).
Remote files are written from a local staging copy (:meth:`Store.staging` + :meth:`Store.publish`),
so a table or a plot can be built with ordinary file APIs and still outlive the driver's node.
"""
from __future__ import annotations

import json
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional

import pyarrow.fs

__all__ = ["Store", "Entry", "known_mlflow_run", "remember_mlflow_run"]

MLFLOW_MARKER = "atss/mlflow_run.json"  # the run directory remembers its MLflow run (same store only)


@dataclass(frozen=True)
class Entry:
    """One item of :meth:`Store.list`."""

    name: str
    is_dir: bool
    mtime_ns: int


class Store:
    """The directory ``<root>/<parts...>``; ``root`` is an absolute path or a URI."""

    def __init__(self, root: str, *parts: str):
        root = str(root).rstrip("/") or "/"
        self.root = root
        self.parts = tuple(p.strip("/") for p in parts if p.strip("/"))
        if "://" in root:
            self.fs, base = pyarrow.fs.FileSystem.from_uri(root)
        else:
            if not Path(root).is_absolute():
                raise ValueError(f"storage path must be absolute or a URI, got {root!r}")
            self.fs, base = pyarrow.fs.LocalFileSystem(), root
        self.base = "/".join([base.rstrip("/")] + list(self.parts))
        self.uri = "/".join([root] + list(self.parts))
        self.is_local = isinstance(self.fs, pyarrow.fs.LocalFileSystem)

    def __repr__(self) -> str:
        return f"Store({self.uri!r})"

    def child(self, *parts: str) -> "Store":
        return Store(self.root, *self.parts, *parts)

    # -- names ------------------------------------------------------------------------------------
    def path(self, name: str = "") -> str:
        """Path of ``name`` inside the filesystem (for ``self.fs``)."""
        return f"{self.base}/{name.strip('/')}" if name.strip("/") else self.base

    def location(self, name: str = "") -> str:
        """Where ``name`` is, for people: a local path, or the URI of a remote file."""
        return self.path(name) if self.is_local else (f"{self.uri}/{name.strip('/')}" if name else self.uri)

    def local_path(self, name: str = "") -> Optional[Path]:
        """``name`` as a local ``Path`` (None when the store is remote)."""
        return Path(self.path(name)) if self.is_local else None

    # -- reading and writing ----------------------------------------------------------------------
    def exists(self, name: str = "") -> bool:
        return self.fs.get_file_info(self.path(name)).type != pyarrow.fs.FileType.NotFound

    def read_bytes(self, name: str) -> Optional[bytes]:
        if self.fs.get_file_info(self.path(name)).type != pyarrow.fs.FileType.File:
            return None
        with self.fs.open_input_stream(self.path(name)) as f:
            return f.read()

    def read_text(self, name: str) -> Optional[str]:
        """The file's text, None when it does not exist."""
        data = self.read_bytes(name)
        return None if data is None else data.decode()

    def read_json(self, name: str) -> Any:
        """The parsed file, None when it does not exist."""
        text = self.read_text(name)
        return None if text is None else json.loads(text)

    def write_bytes(self, name: str, data: bytes) -> str:
        """Write ``name`` (parents created); returns :meth:`location`."""
        path = self.path(name)
        self.fs.create_dir(path.rsplit("/", 1)[0], recursive=True)
        with self.fs.open_output_stream(path) as f:
            f.write(data)
        return self.location(name)

    def write_text(self, name: str, text: str) -> str:
        return self.write_bytes(name, text.encode())

    def write_json(self, name: str, value: Any) -> str:
        return self.write_text(name, json.dumps(value, indent=1))

    def delete(self, name: str) -> None:
        if self.exists(name):
            self.fs.delete_file(self.path(name))

    def list(self, name: str = "") -> list[Entry]:
        """The entries directly inside ``name`` (empty when it does not exist)."""
        try:
            infos = self.fs.get_file_info(pyarrow.fs.FileSelector(self.path(name), allow_not_found=True))
        except OSError:
            return []
        return [Entry(i.base_name, i.type == pyarrow.fs.FileType.Directory, i.mtime_ns or 0) for i in infos]

    # -- files built locally ----------------------------------------------------------------------
    def staging(self, name: str) -> Path:
        """A local path to write ``name`` at: the file itself in a local store, else a temporary copy
        (under ``<tmp>/atss-store/``) that :meth:`publish` uploads."""
        path = self.local_path(name)
        if path is None:
            path = Path(tempfile.gettempdir(), "atss-store", *self.uri.split("://", 1)[1].split("/"), name)
        path.parent.mkdir(parents=True, exist_ok=True)
        return path

    def publish(self, name: str, local_file: Optional[str | Path] = None) -> str:
        """Put ``local_file`` (default: :meth:`staging` of ``name``) at ``name``; returns :meth:`location`."""
        src = Path(local_file) if local_file is not None else self.staging(name)
        if self.is_local and src.resolve() == Path(self.path(name)).resolve():
            return self.location(name)
        return self.write_bytes(name, src.read_bytes())


def known_mlflow_run(store: Store, uri: str) -> Optional[str]:
    """The MLflow run this run directory logged to before, if it was in the same store ``uri``."""
    known = store.read_json(MLFLOW_MARKER)
    return known.get("run_id") if known and known.get("tracking_uri") == uri else None


def remember_mlflow_run(store: Store, uri: str, run_id: str) -> None:
    store.write_json(MLFLOW_MARKER, {"tracking_uri": uri, "run_id": run_id})
