"""Memory and CPU of the demo's training step under glibc's malloc and under Ray's bundled jemalloc.

Each variant trains the demo trial's model (tiny preset, batch 8 of the tiny synthetic data, one
torch thread, in a thread of its own as in a Tune trial) for ``--iterations`` steps in a fresh
process. The variants alternate over ``--repeats`` rounds, so a change in the machine's load falls
on all of them; the report gives medians and their ratios to glibc:

* **anon MB:** the process's anonymous memory (``/proc/self/smaps_rollup``), median over the steps:
  what a trial holds beyond the shared libraries;
* **CPU s:** user + system time of the steps; **faults:** minor page faults during the steps;
* **loss:** the last step's loss, which must be the same for every variant (an allocator must not
  change the numbers).

``jemalloc thp`` is what the sweep's local cluster runs its trials on (``pipeline.ablation.sweep``:
``RAY_LD_PRELOAD_ON_WORKERS=1``, ``MALLOC_CONF=thp:always``).

    python bench/allocator.py
    python bench/allocator.py --iterations 10 --repeats 1 --variants glibc,jemalloc_thp --json out.json
"""
from __future__ import annotations

import argparse
import importlib.util
import json
import os
import resource
import statistics
import subprocess
import sys
import threading
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
# Ray's wheel ships jemalloc; found without importing Ray.
JEMALLOC = str(Path(importlib.util.find_spec("ray").origin).parent / "core" / "libjemalloc.so")
VARIANTS = {
    "glibc": {},
    "glibc_arena2": {"MALLOC_ARENA_MAX": "2"},
    "jemalloc": {"LD_PRELOAD": JEMALLOC},
    "jemalloc_thp": {"LD_PRELOAD": JEMALLOC, "MALLOC_CONF": "thp:always"},
    "jemalloc_thp_oversize0": {"LD_PRELOAD": JEMALLOC, "MALLOC_CONF": "thp:always,oversize_threshold:0"},
}


def anon_mb() -> float:
    for line in Path("/proc/self/smaps_rollup").read_text().splitlines():
        if line.startswith("Anonymous:"):
            return int(line.split()[1]) / 1024
    return 0.0


def child(iterations: int) -> dict:
    """Train ``iterations`` steps of the demo's trial in a thread; what the process measured."""
    sys.path.insert(0, str(REPO))
    import torch

    from detector import build_detector, get_preset
    from pipeline.data import DataConfig, build_dataloader

    torch.set_num_threads(1)
    torch.manual_seed(0)
    model = build_detector(get_preset("tiny", num_classes=5))
    optimizer = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
    batches = iter(build_dataloader(DataConfig.tiny(), "train", 8, train=True, seed=0))
    out: dict = {}

    def step() -> float:
        images, targets = next(batches)
        loss = sum(model(images, targets).values())
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        return loss.item()

    def train() -> None:
        step()  # the first step builds what every later step reuses
        before = resource.getrusage(resource.RUSAGE_SELF)
        anon, loss = [], 0.0
        for _ in range(iterations):
            loss = step()
            anon.append(anon_mb())
        after = resource.getrusage(resource.RUSAGE_SELF)
        maps = Path("/proc/self/maps").read_text()
        out.update(allocator="jemalloc" if "libjemalloc" in maps else "glibc", anon_mb=statistics.median(anon), cpu_s=(after.ru_utime + after.ru_stime)
                   - (before.ru_utime + before.ru_stime), faults=after.ru_minflt - before.ru_minflt, loss=loss)

    thread = threading.Thread(target=train)  # a Tune trial trains in a thread, with an arena of its own
    thread.start()
    thread.join()
    return out


def run_variant(name: str, iterations: int) -> dict:
    env = {**os.environ, **VARIANTS[name]}
    proc = subprocess.run([sys.executable, __file__, "--child", "--iterations", str(iterations)], env=env,
                          capture_output=True, text=True)
    if proc.returncode != 0:
        raise SystemExit(f"variant {name} failed:\n{proc.stderr[-2000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--iterations", type=int, default=25, help="measured steps per run (default 25)")
    p.add_argument("--repeats", type=int, default=3, help="rounds over the variants (default 3)")
    p.add_argument("--variants", default=",".join(VARIANTS), help=f"comma-separated, from {', '.join(VARIANTS)}")
    p.add_argument("--json", help="write every run's figures here")
    p.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.iterations < 1 or args.repeats < 1:
        p.error("--iterations and --repeats must be >= 1")
    if args.child:
        print(json.dumps(child(args.iterations)))
        return {}
    names = [v.strip() for v in args.variants.split(",") if v.strip()]
    unknown = [n for n in names if n not in VARIANTS]
    if unknown or not names:
        p.error(f"--variants: unknown {unknown or names}; choose from {', '.join(VARIANTS)}")
    runs: dict[str, list[dict]] = {n: [] for n in names}
    for r in range(args.repeats):
        for name in names:
            runs[name].append(run_variant(name, args.iterations))
            print(f"[allocator] round {r + 1}/{args.repeats} {name}: {runs[name][-1]}", file=sys.stderr, flush=True)
    med = {n: {k: statistics.median(run[k] for run in rs) for k in ("anon_mb", "cpu_s", "faults")}
           for n, rs in runs.items()}
    base = med.get("glibc") or med[names[0]]
    print(f"\n{args.iterations} steps of the demo trial (tiny, batch 8, 1 thread), median of {args.repeats} "
          f"runs; ratios to {'glibc' if 'glibc' in med else names[0]}\n")
    print("| allocator | anon MB | ratio | CPU s | ratio | minor faults | last loss |")
    print("|---|---|---|---|---|---|---|")
    for n in names:
        m = med[n]
        losses = sorted({f"{run['loss']:.6f}" for run in runs[n]})
        print(f"| {n} | {m['anon_mb']:.0f} | {m['anon_mb'] / base['anon_mb']:.2f} | {m['cpu_s']:.1f} | "
              f"{m['cpu_s'] / base['cpu_s']:.2f} | {m['faults']:.0f} | {', '.join(losses)} |")
    same = len({f"{run['loss']:.6f}" for rs in runs.values() for run in rs}) == 1
    print(f"\nlosses {'identical' if same else 'DIFFER'} across allocators")
    summary = {"iterations": args.iterations, "repeats": args.repeats, "runs": runs, "median": med,
               "same_loss": same}
    if args.json:
        Path(args.json).write_text(json.dumps(summary, indent=1))
    return summary


if __name__ == "__main__":
    result = main()
    sys.exit(0 if not result or result["same_loss"] else 1)
