"""bench/footprint.py: process titles, and a real run whose memory and CPU are known.

The probe command holds ~200 MiB of touched memory and spends ~1 s of CPU itself, and starts a
daemon (double fork: it re-parents away from the command) that spends ~1 s more under a Ray-style
process title, on Ray's bundled jemalloc (as Ray's workers run with ``RAY_LD_PRELOAD_ON_WORKERS=1``);
the footprint must find both, and which allocator each runs on.
"""
from __future__ import annotations

import importlib.util
import json
import subprocess
import sys
from pathlib import Path

BENCH = Path(__file__).resolve().parents[1] / "bench"
sys.path.insert(0, str(BENCH))

import footprint  # noqa: E402

# Ray's wheel ships jemalloc (ray/core/libjemalloc.so); found without importing Ray.
JEMALLOC = str(Path(importlib.util.find_spec("ray").origin).parent / "core" / "libjemalloc.so")

PROBE = r"""
import os, sys, time
JEMALLOC = sys.argv[1]
BURN = "import time\nt = time.process_time()\nwhile time.process_time() - t < {}: pass\n"
if os.fork() == 0:
    if os.fork() == 0:
        # what Ray's setproctitle does to a worker: its command line becomes the title
        os.execve(sys.executable, ["ray::RayTrainWorker.train_fn", "-c", BURN.format(1.0)],
                  {**os.environ, "LD_PRELOAD": JEMALLOC})
    os._exit(0)
buf = bytearray(200 * 2**20)
for i in range(0, len(buf), 4096):
    buf[i] = 1
exec(BURN.format(1.0))
time.sleep(1.0)
"""


def test_titles_follow_ray_and_python_command_lines():
    assert footprint.title_of("ray::RayTrainWorker.train_fn()") == "ray::RayTrainWorker"
    assert footprint.title_of("ray::_Inner.train") == "ray::_Inner"
    assert footprint.title_of("ray::IDLE") == "ray::IDLE"
    assert footprint.title_of("ray-dashboard-JobHead-0 (/x/bin/python -c ...)") == "ray-dashboard-JobHead"
    assert footprint.title_of("/x/bin/python3.11 -u /x/ray/dashboard/agent.py --a=1") == "python dashboard/agent.py"
    assert footprint.title_of("/x/bin/python -m pytest -q") == "python -m pytest"
    assert footprint.title_of("/x/ray/core/src/ray/raylet/raylet --node=1") == "raylet"


def test_a_run_is_measured_with_its_detached_daemons(tmp_path):
    out = tmp_path / "fp.json"
    proc = subprocess.run([sys.executable, str(BENCH / "footprint.py"), "--interval", "0.2", "--json", str(out),
                           "--", sys.executable, "-c", PROBE, JEMALLOC], capture_output=True, text=True,
                          timeout=120)
    assert proc.returncode == 0, proc.stderr
    s = json.loads(out.read_text())
    assert s["returncode"] == 0 and s["partial"] is False
    assert 0.19 <= s["pss_peak_gb"] < 1.0
    by = {g["title"]: g for g in s["by_title"]}
    assert by["ray::RayTrainWorker"]["cpu_s"] >= 1.0  # the daemon, found although it left the command's tree
    assert s["worker_cpu_s"] == by["ray::RayTrainWorker"]["cpu_s"]
    assert 0.0 < s["worker_cpu_share"] < 1.0
    assert s["cpu_s"] >= 2.0
    assert by["ray::RayTrainWorker"]["allocator"] == "jemalloc" and by["python -c ..."]["allocator"] == "glibc"
    assert "peak PSS" in proc.stdout and "| ray::RayTrainWorker |" in proc.stdout


def test_the_command_exit_code_is_passed_on():
    proc = subprocess.run([sys.executable, str(BENCH / "footprint.py"), "--", sys.executable, "-c",
                           "raise SystemExit(3)"], capture_output=True, text=True, timeout=60)
    assert proc.returncode == 3
    assert "exit 3" in proc.stdout


def test_the_demo_starts_its_own_cluster_with_trials_on_jemalloc(tmp_path):
    """`python jobs/ablation.py` without RAY_ADDRESS starts a local cluster whose trials run on Ray's
    jemalloc (RAY_LD_PRELOAD_ON_WORKERS=1, MALLOC_CONF=thp:always in the workers only) and without
    Ray's prestarted idle workers; the driver stays on glibc and torch-free (docs/ablation.md,
    "Footprint"). Measured by the footprint bench, as the demo's figures are."""
    import os

    env = {k: v for k, v in os.environ.items() if k not in ("RAY_ADDRESS", "MALLOC_CONF", "LD_PRELOAD",
                                                             "RAY_LD_PRELOAD_ON_WORKERS")}
    out = tmp_path / "fp.json"
    proc = subprocess.run([sys.executable, str(BENCH / "footprint.py"), "--json", str(out), "--",
                           sys.executable, str(BENCH.parent / "jobs" / "ablation.py"), "--smoke", "--values", "5",
                           "--storage-path", str(tmp_path / "rr"), "--mlflow-uri", f"sqlite:///{tmp_path / 'm.db'}",
                           "--quiet"], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=400)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    by = {g["title"]: g for g in json.loads(out.read_text())["by_title"]}
    assert by["ray::ImplicitFunc"]["allocator"] == "jemalloc"  # the trial
    assert by["python jobs/ablation.py"]["allocator"] == "glibc"
    assert "ray::IDLE" not in by
