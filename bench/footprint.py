"""Footprint of a run and of the Ray cluster it starts: peak PSS and CPU time per process title.

Runs a command (default: the demo, ``python jobs/ablation.py``) and every ``--interval`` seconds
samples every process of that run: the command's process tree (this script makes itself the
child subreaper, so daemons that Ray detaches stay in the tree) plus, with ``--session``, every
process of an already running Ray cluster whose command line names that session (and their
children), e.g. for a ``ray job submit`` to a cluster started elsewhere.

* **Memory:** the sum of ``Pss`` from ``/proc/<pid>/smaps_rollup`` over those processes at each
  sample; the peak over the run is reported (proportional set size: a page shared by n
  processes counts 1/n in each, so the sum is the memory the run holds, shared libraries, torch
  and Ray's object store pages included, counted once).
* **CPU:** user + system time from ``/proc/<pid>/stat`` per process, from its start (or, for a
  process that existed before the command, from the first sample), grouped by process title.
  Ray sets the titles of its workers (``ray::RayTrainWorker``, ``ray::ImplicitFunc`` (Tune's
  function trainables), ``ray::TrainController``, ``ray::IDLE`` ...); a worker is counted under the
  last title it had that names an actor or task. A process that ends is read once more as a zombie before it is reaped where this script
  is its reaper (the subreaper case); otherwise up to one interval of its CPU time is lost.
* **Allocator:** the ``malloc`` a process runs on (``jemalloc``, ``tcmalloc`` or ``mimalloc`` when
  one is mapped, e.g. through ``LD_PRELOAD``, else ``glibc``), read from ``/proc/<pid>/maps``.
* **Share of CPU in the training workers:** CPU of the titles matching ``--worker-title``
  (default ``RayTrainWorker|ImplicitFunc``: Ray Train's workers and Tune's function trainables, where
  a sweep's 1-worker trials train) over all CPU of the run.

The measured command runs under this script; its own output passes through. Figures only mean
something for the same command on the same machine: compare a before and an after run.

    python bench/footprint.py                                   # the demo: python jobs/ablation.py
    python bench/footprint.py --json out.json -- python jobs/ablation.py --seeds 0,1
    python bench/footprint.py --session session_2026-12-01_10-00-00_1234 -- ray job submit ... -- python jobs/ablation.py
"""
from __future__ import annotations

import argparse
import ctypes
import json
import os
import re
import signal
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

CLK_TCK = os.sysconf("SC_CLK_TCK")
PR_SET_CHILD_SUBREAPER = 36
DEFAULT_COMMAND = [sys.executable, "jobs/ablation.py"]
# Titles a Ray worker has before it holds an actor or task: a later real title replaces them.
PLACEHOLDER_TITLES = ("python workers/default_worker.py", "ray::IDLE")


@dataclass
class Proc:
    """One process seen during the run (keyed by pid and start time, so a reused pid is a new Proc)."""

    pid: int
    start_ticks: int
    title: str = ""
    cpu_ticks_first: int = 0  # CPU already spent when first seen (kept only for processes older than the run)
    cpu_ticks_last: int = 0
    pss_kb_peak: int = 0
    alive: bool = True
    allocator: str = ""  # "" until read

    @property
    def cpu_s(self) -> float:
        return (self.cpu_ticks_last - self.cpu_ticks_first) / CLK_TCK


@dataclass
class Footprint:
    """What the sampler found: per-process records, per-title PSS peaks and the PSS time series."""

    procs: dict[tuple[int, int], Proc] = field(default_factory=dict)
    title_pss_peak_kb: dict[str, int] = field(default_factory=dict)
    pss_peak_kb: int = 0
    pss_peak_at_s: float = 0.0
    series: list[tuple[float, int, int]] = field(default_factory=list)  # (seconds, PSS kB, processes)
    samples: int = 0


def read_stat(pid: int) -> tuple[int, int, int, str, str] | None:
    """(ppid, CPU ticks user+system, start time in ticks since boot, state, comm) of a process, or None if gone."""
    try:
        raw = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    # comm may hold spaces and parentheses: the fields after the last ')' are fixed.
    rest = raw[raw.rindex(")") + 2:].split()
    state, ppid = rest[0], int(rest[1])
    utime, stime, start = int(rest[11]), int(rest[12]), int(rest[19])
    return ppid, utime + stime, start, state, raw[raw.index("(") + 1:raw.rindex(")")]


def read_cmdline(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace").strip()
    except OSError:
        return ""


def read_pss_kb(pid: int) -> int:
    try:
        for line in Path(f"/proc/{pid}/smaps_rollup").read_text().splitlines():
            if line.startswith("Pss:"):
                return int(line.split()[1])
    except (OSError, ValueError):
        pass
    return 0


ALLOCATORS = ("jemalloc", "tcmalloc", "mimalloc")


def read_allocator(pid: int) -> str:
    """``jemalloc`` / ``tcmalloc`` / ``mimalloc`` when the process maps one, else ``glibc``; ``""`` if unreadable."""
    try:
        maps = Path(f"/proc/{pid}/maps").read_text()
    except OSError:
        return ""
    return next((name for name in ALLOCATORS if f"lib{name}" in maps), "glibc")


def title_of(cmdline: str) -> str:
    """A short, stable name for a process from its (possibly Ray-rewritten) command line.

    ``ray::RayTrainWorker.train_fn()`` -> ``ray::RayTrainWorker``; ``ray-dashboard-JobHead-0 (...)``
    -> ``ray-dashboard-JobHead``; ``/x/bin/python -u /x/ray/dashboard/agent.py --a`` ->
    ``python dashboard/agent.py``; ``/x/ray/core/src/ray/raylet/raylet --a`` -> ``raylet``.
    """
    if not cmdline:
        return "?"
    first = cmdline.split()[0]
    if first.startswith("ray::"):
        name = first[len("ray::"):].split("(")[0]
        return "ray::" + (name.split(".")[0] if name else "?")
    if first.startswith("ray-dashboard-"):
        return re.sub(r"-\d+$", "", first)
    exe = os.path.basename(first)
    if re.fullmatch(r"python[\d.]*", exe):
        args = cmdline.split()[1:]
        while args and args[0].startswith("-"):
            if args[0] in ("-m", "-c"):
                return f"python {args[0]} {args[1] if len(args) > 1 and args[0] == '-m' else '...'}"
            args = args[1:]
        if args:
            parts = Path(args[0]).parts
            return "python " + "/".join(parts[-2:])
        return "python"
    return exe


def children_map() -> dict[int, list[int]]:
    kids: dict[int, list[int]] = {}
    for entry in os.scandir("/proc"):
        if entry.name.isdigit():
            st = read_stat(int(entry.name))
            if st:
                kids.setdefault(st[0], []).append(int(entry.name))
    return kids


class Sampler:
    """Tracks the processes of one run: descendants of ``root`` and of the processes naming ``session``."""

    def __init__(self, root: int, session: str | None, run_start_ticks: int):
        self.root = root
        self.session = session
        self.run_start_ticks = run_start_ticks
        self.fp = Footprint()
        self.t0 = time.monotonic()

    def _tracked_pids(self) -> set[int]:
        kids = children_map()
        seeds = [self.root] if Path(f"/proc/{self.root}").exists() else []
        # Orphans re-parent to this process (the subreaper): everything under it belongs to the run.
        seeds.append(os.getpid())
        if self.session:
            seeds += [p for ps in kids.values() for p in ps if self.session in read_cmdline(p)]
        seen, todo = set(), list(seeds)
        while todo:
            p = todo.pop()
            if p not in seen:
                seen.add(p)
                todo.extend(kids.get(p, ()))
        seen.discard(os.getpid())
        return seen

    def sample(self) -> None:
        fp = self.fp
        total_kb, by_title = 0, {}
        live = set()
        for pid in self._tracked_pids():
            st = read_stat(pid)
            if st is None:
                continue
            _, cpu, start, state, comm = st
            key = (pid, start)
            live.add(key)
            proc = fp.procs.get(key)
            if proc is None:
                proc = fp.procs[key] = Proc(pid, start)
                if start < self.run_start_ticks:  # older than the run: count only what it spends from now
                    proc.cpu_ticks_first = cpu
            proc.cpu_ticks_last = max(proc.cpu_ticks_last, cpu)
            if state == "Z":  # a zombie has no command line left: its kernel name (comm) is all there is
                proc.title = proc.title or f"({comm})"
            else:
                title = title_of(read_cmdline(pid))
                # "?": the command line was unreadable (the process is exiting): keep what we had
                if not proc.title or (title != "?" and (proc.title in PLACEHOLDER_TITLES
                                                         or title not in PLACEHOLDER_TITLES)):
                    if title != proc.title:
                        proc.allocator = ""  # an exec may have brought another program (and allocator)
                    proc.title = title
            if state == "Z":  # a zombie keeps its CPU times but no memory
                continue
            if not proc.allocator:
                proc.allocator = read_allocator(pid)
            kb = read_pss_kb(pid)
            proc.pss_kb_peak = max(proc.pss_kb_peak, kb)
            total_kb += kb
            name = proc.title or "?"
            by_title[name] = by_title.get(name, 0) + kb
        for key, proc in fp.procs.items():
            proc.alive = key in live
        for name, kb in by_title.items():
            fp.title_pss_peak_kb[name] = max(fp.title_pss_peak_kb.get(name, 0), kb)
        t = time.monotonic() - self.t0
        if total_kb > fp.pss_peak_kb:
            fp.pss_peak_kb, fp.pss_peak_at_s = total_kb, t
        fp.series.append((round(t, 1), total_kb, len(live)))
        fp.samples += 1


def boot_ticks_now() -> int:
    """Now, in clock ticks since boot (the unit of /proc/<pid>/stat's start time)."""
    return int(float(Path("/proc/uptime").read_text().split()[0]) * CLK_TCK)


def summarise(fp: Footprint, worker_title: str, wall_s: float, returncode: int, command: list[str]) -> dict:
    groups: dict[str, dict] = {}
    for proc in fp.procs.values():
        g = groups.setdefault(proc.title or "?", {"title": proc.title or "?", "processes": 0, "cpu_s": 0.0,
                                                  "allocators": set()})
        g["processes"] += 1
        g["cpu_s"] += proc.cpu_s
        if proc.allocator:
            g["allocators"].add(proc.allocator)
    for name, g in groups.items():
        g["pss_peak_gb"] = fp.title_pss_peak_kb.get(name, 0) / 2**20
        g["allocator"] = ", ".join(sorted(g.pop("allocators"))) or "?"
    rows = sorted(groups.values(), key=lambda g: -g["cpu_s"])
    total_cpu = sum(g["cpu_s"] for g in rows)
    pattern = re.compile(worker_title)
    worker_cpu = sum(g["cpu_s"] for g in rows if pattern.search(g["title"]))
    return {"command": command, "returncode": returncode, "wall_s": wall_s, "samples": fp.samples,
            "processes": len(fp.procs), "pss_peak_gb": fp.pss_peak_kb / 2**20, "pss_peak_at_s": fp.pss_peak_at_s,
            "cpu_s": total_cpu, "worker_title": worker_title, "worker_cpu_s": worker_cpu,
            "worker_cpu_share": worker_cpu / total_cpu if total_cpu else 0.0, "by_title": rows,
            "series": fp.series}


def format_report(s: dict) -> str:
    lines = [f"command: {' '.join(s['command'])} (exit {s['returncode']}, {s['wall_s']:.0f} s wall, "
             f"{s['samples']} samples, {s['processes']} processes)",
             f"peak PSS: {s['pss_peak_gb']:.2f} GB (at {s['pss_peak_at_s']:.0f} s); CPU: {s['cpu_s']:.0f} s, "
             f"of which {100 * s['worker_cpu_share']:.0f}% in training workers ({s['worker_cpu_s']:.0f} s, "
             f"titles matching {s['worker_title']!r})", "",
             "| process title | processes | CPU s | CPU share | peak PSS GB | allocator |",
             "|---|---|---|---|---|---|"]
    for g in s["by_title"]:
        share = g["cpu_s"] / s["cpu_s"] if s["cpu_s"] else 0.0
        lines.append(f"| {g['title']} | {g['processes']} | {g['cpu_s']:.1f} | {100 * share:.1f}% | "
                     f"{g['pss_peak_gb']:.2f} | {g.get('allocator', '?')} |")
    return "\n".join(lines)


def run(command: list[str], interval: float, session: str | None, worker_title: str,
        grace_s: float = 60.0, checkpoint: Optional[Path] = None, checkpoint_s: float = 60.0) -> dict:
    """Measure ``command``; with ``checkpoint``, the figures so far are written there every
    ``checkpoint_s`` seconds (``"partial": true``), so a long run that is cut off still leaves them."""
    libc = ctypes.CDLL(None, use_errno=True)
    if libc.prctl(PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0) != 0:
        print("[footprint] could not become child subreaper: detached daemons may be missed", file=sys.stderr)
    start_ticks = boot_ticks_now()
    t0 = time.monotonic()
    child = subprocess.Popen(command)
    sampler = Sampler(child.pid, session, start_ticks - CLK_TCK)  # 1 s slack: the tick clock is coarse
    returncode = None

    def forward(signum, _frame):  # a kill of this script reaches the measured run, which ends; we report
        try:
            os.kill(child.pid, signum)
        except ProcessLookupError:
            pass

    # Ctrl-C already reaches the whole foreground group (a second SIGINT would make Ray force-quit).
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, forward)
    done_at = None
    saved_at = time.monotonic()
    while True:
        sampler.sample()
        if checkpoint is not None and time.monotonic() - saved_at >= checkpoint_s:
            partial = summarise(sampler.fp, worker_title, time.monotonic() - t0, None, command)
            checkpoint.write_text(json.dumps({**partial, "partial": True}, indent=1))
            saved_at = time.monotonic()
        # Reap after sampling, so every ended child of ours is read once more as a zombie (its final CPU time).
        while True:
            try:
                pid, status = os.waitpid(-1, os.WNOHANG)
            except ChildProcessError:
                pid = 0
            if pid == 0:
                break
            if pid == child.pid:
                returncode = child.returncode = os.waitstatus_to_exitcode(status)
        if returncode is not None:
            # Ray's daemons shut down within seconds of the driver; keep measuring them until they are gone.
            done_at = done_at or time.monotonic()
            left = [p for p in sampler.fp.procs.values() if p.alive and p.pid != child.pid]
            if not left:
                break
            if time.monotonic() - done_at > grace_s:
                names = ", ".join(sorted({p.title for p in left}))
                print(f"[footprint] command exited {returncode}; {len(left)} processes still alive after "
                      f"{grace_s:.0f} s ({names}): not waiting for them", file=sys.stderr)
                break
        time.sleep(interval)
    wall = time.monotonic() - t0
    return summarise(sampler.fp, worker_title, wall, returncode, command)


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--interval", type=float, default=1.0, help="seconds between samples (default 1)")
    p.add_argument("--session", help="also every process whose command line contains this text (a Ray "
                                     "session name or directory), and its children")
    p.add_argument("--worker-title", default="RayTrainWorker|ImplicitFunc",
                   help="regular expression of the training processes' titles (default: Ray Train's workers "
                        "and Tune's function trainables, where the sweep's 1-worker trials train)")
    p.add_argument("--json", metavar="PATH", help="write all figures (per title, PSS time series) as JSON here; "
                                                  "rewritten every minute while the command runs (\"partial\": true)")
    p.add_argument("command", nargs=argparse.REMAINDER,
                   help="the command after --, default: python jobs/ablation.py")
    args = p.parse_args(argv)
    if args.command and args.command[0] == "--":
        args.command = args.command[1:]
    args.command = args.command or DEFAULT_COMMAND
    if args.interval <= 0:
        p.error(f"--interval must be > 0 seconds, got {args.interval}")
    try:
        re.compile(args.worker_title)
    except re.error as e:
        p.error(f"--worker-title {args.worker_title!r} is not a regular expression: {e}")
    return args


def main(argv=None) -> dict:
    args = parse_args(argv)
    out = Path(args.json) if args.json else None
    summary = run(args.command, args.interval, args.session, args.worker_title, checkpoint=out)
    print("\n[footprint]\n" + format_report(summary), flush=True)
    if out:
        out.write_text(json.dumps({**summary, "partial": False}, indent=1))
    return summary


if __name__ == "__main__":
    sys.exit(main()["returncode"] or 0)
