"""bench/allocator.py: each variant really runs on its allocator, and the allocator leaves the
training's numbers unchanged (the sweep's local cluster runs its trials on jemalloc)."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

BENCH = Path(__file__).resolve().parents[1] / "bench"


@pytest.mark.timeout(300)
def test_jemalloc_trains_the_demo_step_to_the_same_loss_as_glibc(tmp_path):
    out = tmp_path / "alloc.json"
    proc = subprocess.run([sys.executable, str(BENCH / "allocator.py"), "--iterations", "2", "--repeats", "1",
                           "--variants", "glibc,jemalloc_thp", "--json", str(out)],
                          capture_output=True, text=True, timeout=280)
    assert proc.returncode == 0, proc.stderr[-3000:]
    s = json.loads(out.read_text())
    glibc, jemalloc = s["runs"]["glibc"][0], s["runs"]["jemalloc_thp"][0]
    assert (glibc["allocator"], jemalloc["allocator"]) == ("glibc", "jemalloc")
    assert s["same_loss"] and glibc["loss"] == jemalloc["loss"]
    assert glibc["anon_mb"] > 100 and jemalloc["anon_mb"] > 100 and glibc["cpu_s"] > 0
    assert "| jemalloc_thp |" in proc.stdout and "losses identical" in proc.stdout
