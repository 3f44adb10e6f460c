"""Progress bars (tqdm: count, rate and ETA) for the long loops a user waits on: evaluation and
test-dev inference, TTA, index building, synthetic data generation.

Bars go to stderr, so stdout stays the job's results. They are off when stderr is not a terminal
(Ray workers, CI logs, ``2> file``: no carriage-return litter in logs) and when the process is
quiet: a job's ``--quiet`` calls :func:`set_quiet`, which sets ``ATSS_QUIET=1`` so that processes
started afterwards (multiprocessing pools, subprocesses) stay quiet too.

    for batch in progress(loader, desc="val inference", unit="batch"):
        ...
    with progress(total=len(images), desc="test-dev", unit="img") as bar:
        ...; bar.update(len(batch))
"""
from __future__ import annotations

import os
import sys
from collections.abc import Iterable
from typing import Optional, TextIO, TypeVar

from tqdm import tqdm

__all__ = ["progress", "set_quiet", "is_quiet", "QUIET_ENV"]

QUIET_ENV = "ATSS_QUIET"
T = TypeVar("T")


def set_quiet(quiet: bool = True) -> None:
    """Turn progress bars off (or back on) in this process and the processes it starts from now on."""
    if quiet:
        os.environ[QUIET_ENV] = "1"
    else:
        os.environ.pop(QUIET_ENV, None)


def is_quiet() -> bool:
    return os.environ.get(QUIET_ENV, "").strip().lower() not in ("", "0", "false", "no")


def _shown_on(stream: TextIO) -> bool:
    try:
        return stream.isatty()
    except (AttributeError, ValueError):  # no isatty, or closed
        return False


def progress(iterable: Optional[Iterable[T]] = None, *, desc: str, total: Optional[float] = None,
             unit: str = "it", quiet: bool = False, file: Optional[TextIO] = None, **tqdm_kwargs) -> tqdm:
    """A tqdm bar over ``iterable`` (or a manual one: ``total`` and ``.update(n)``), shown on ``file``
    (default stderr) only if that is a terminal and neither ``quiet`` nor :func:`set_quiet` is in force.

    A disabled bar still iterates and takes ``update`` calls, so callers need no second code path.
    Extra keyword arguments go to ``tqdm`` (e.g. ``unit_scale=True``, ``leave=False``).
    """
    stream = file if file is not None else sys.stderr
    disable = quiet or is_quiet() or not _shown_on(stream)
    # Refresh at most twice a second: a bar must not cost the loop it reports on.
    options = dict(desc=desc, total=total, unit=unit, file=stream, disable=disable, mininterval=0.5,
                   dynamic_ncols=True, smoothing=0.1)
    options.update(tqdm_kwargs)
    return tqdm(iterable, **options)
