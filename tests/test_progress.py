"""pipeline.progress: bars with rate and ETA on a terminal's stderr, none in logs or when quiet."""
from __future__ import annotations

import io
import subprocess
import sys

import pytest

from pipeline.progress import QUIET_ENV, is_quiet, progress, set_quiet


class Terminal(io.StringIO):
    def isatty(self) -> bool:
        return True


@pytest.fixture(autouse=True)
def _not_quiet(monkeypatch):
    monkeypatch.delenv(QUIET_ENV, raising=False)


def test_a_terminal_gets_count_rate_and_eta():
    term = Terminal()
    items = list(progress(range(5), desc="val inference", unit="img", file=term, mininterval=0))
    assert items == [0, 1, 2, 3, 4]
    out = term.getvalue()
    assert "val inference" in out and "5/5" in out and "img/s" in out
    assert "<" in out  # elapsed<remaining: the ETA


def test_manual_bar_with_total():
    term = Terminal()
    with progress(total=10, desc="test-dev", unit="img", file=term, mininterval=0) as bar:
        bar.update(4)
        bar.update(6)
    assert "10/10" in term.getvalue()


def test_no_bar_when_not_a_terminal_or_quiet():
    log = io.StringIO()  # a file, a pipe, a Ray worker's captured stderr
    assert list(progress(range(3), desc="x", file=log)) == [0, 1, 2]
    assert log.getvalue() == ""
    term = Terminal()
    assert list(progress(range(3), desc="x", file=term, quiet=True)) == [0, 1, 2]
    assert term.getvalue() == ""


def test_set_quiet_reaches_processes_started_later():
    set_quiet()
    try:
        assert is_quiet()
        term = Terminal()
        with progress(total=2, desc="x", file=term) as bar:
            bar.update(2)
        assert term.getvalue() == ""
        child = subprocess.run([sys.executable, "-c", "from pipeline.progress import is_quiet; print(is_quiet())"],
                               capture_output=True, text=True, check=True)
        assert child.stdout.strip() == "True"
    finally:
        set_quiet(False)
    assert not is_quiet()
