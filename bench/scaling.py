"""Training-loop throughput: plain process vs Ray Train workers, and (``--full``) R-50 on a GPU.

Default (CPU, a few minutes on 2 cores): the real training loop (``pipeline.training``: data loading,
forward, losses with all-reduced normalisers, backward, SGD, logging) of the ``tiny`` preset on
synthetic data, run the same number of iterations as

* ``plain-1t``: ``run_training(num_workers=0)``, 1 torch thread: no Ray at all;
* ``ray-1w``: one Ray Train worker with 1 CPU (1 thread): Ray's overhead against ``plain-1t``;
* ``plain-2t``: the plain process with 2 threads (all cores);
* ``ray-1w-2cpu``: one worker holding 2 CPUs (2 threads);
* ``ray-2w``: two workers x 1 CPU, gloo DDP (the ``jobs/train.py`` default on CPU): the same 2 cores
  against ``plain-2t``.

Images/s count only data + step time of the loop (after 2 warm-up iterations), so Ray's start-up
(worker group ~10-20 s) is reported separately as wall time. ``cpu img/s`` divides by the CPU time
the workers spent instead (robust on a shared machine where other processes stretch wall time).
A profiler pass (``torch.profiler``) then splits a training step into data loading, forward
(of which: assignment, losses), backward and the optimiser step.

``--full`` (CUDA): ATSS R-50 at 800x1333, batch 8 in one process: bf16 autocast vs fp32 images/s and
peak memory, and the same profiler split of the step (assignment / loss / data loading share).

    python bench/scaling.py                  # CPU table + profile (tiny preset)
    python bench/scaling.py --full           # GPU: R-50 800x1333 batch 8, bf16 vs fp32
    python bench/scaling.py --json           # also one JSON object on the last line
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

# As jobs/train.py does (before torch loads OpenMP); --omp-active measures the OpenMP default instead.
if "--omp-active" not in sys.argv:
    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
os.environ.setdefault("RAY_TRAIN_HEALTH_CHECK_INTERVAL_S", "0.2")
os.environ.setdefault("RAY_TRAIN_ENABLE_PRINT_PATCH", "0")

CPU_DATA = dict(synthetic_train_images=64, synthetic_val_images=8)


# ----------------------------------------------------------------------------------------------
# CPU: plain vs Ray
# ----------------------------------------------------------------------------------------------
def _cfg(storage: str, name: str, iterations: int, batch: int, threads: int):
    from pipeline.training import build_train_config

    return build_train_config(preset="tiny", batch_size=batch, iterations=iterations, log_period=0,
                              checkpoint_period=0, eval_at_end=False, mlflow_enabled=False, storage_path=storage,
                              run_name=name, torch_threads=threads, data=dict(CPU_DATA))


def cpu_scaling(iterations: int, batch: int) -> list[dict]:
    import ray

    from pipeline.training import run_training

    storage = tempfile.mkdtemp(prefix="atss_scaling_")
    plans = [("plain-1t", 0, 1, None), ("ray-1w", 1, 1, {"CPU": 1}), ("plain-2t", 0, 2, None),
             ("ray-1w-2cpu", 1, 2, {"CPU": 2}), ("ray-2w", 2, 1, {"CPU": 1})]
    rows = []
    for name, workers, threads, resources in plans:
        if workers and not ray.is_initialized():
            ray.init(num_cpus=os.cpu_count(), object_store_memory=200 * 1024 * 1024,
                     runtime_env={"env_vars": {k: os.environ[k] for k in
                                               ("RAY_TRAIN_HEALTH_CHECK_INTERVAL_S", "RAY_TRAIN_ENABLE_PRINT_PATCH")}})
        t0 = time.perf_counter()
        res = run_training(_cfg(storage, name, iterations, batch, threads), num_workers=workers,
                           resources_per_worker=resources, verbose=False)
        wall = time.perf_counter() - t0
        summary = res.summary
        cpu_s = summary.get("train_cpu_s") or float("nan")
        steady_images = summary.get("steady_images") or 0
        rows.append({"config": name, "workers": max(workers, 1), "threads_per_worker": threads,
                     "images_per_s": res.train_images_per_s,
                     "cpu_images_per_s": steady_images / (cpu_s * max(workers, 1)) if cpu_s == cpu_s else None,
                     "wall_s": wall})
        print(f"  {name:12s} {res.train_images_per_s:6.2f} img/s  wall {wall:5.1f}s", flush=True)
    return rows


def print_cpu_table(rows: list[dict]) -> dict:
    by = {r["config"]: r for r in rows}
    print("\n| config | workers x threads | img/s (loop) | cpu img/s | wall s (incl. start-up) |")
    print("|---|---|---|---|---|")
    for r in rows:
        cpu = f"{r['cpu_images_per_s']:.2f}" if r["cpu_images_per_s"] else "-"
        print(f"| {r['config']} | {r['workers']} x {r['threads_per_worker']} | {r['images_per_s']:.2f} | {cpu} "
              f"| {r['wall_s']:.1f} |")
    pairs = {"ray-1w / plain-1t (Ray overhead, same thread)": ("ray-1w", "plain-1t"),
             "ray-1w-2cpu / plain-2t (Ray overhead, 2 threads)": ("ray-1w-2cpu", "plain-2t"),
             "ray-2w / plain-2t (2 DDP workers vs 2 threads)": ("ray-2w", "plain-2t"),
             "ray-2w / ray-1w-2cpu": ("ray-2w", "ray-1w-2cpu")}
    ratios = {}
    print("\n| ratio | wall img/s | cpu img/s |\n|---|---|---|")
    for label, (a, b) in pairs.items():
        wall = by[a]["images_per_s"] / by[b]["images_per_s"]
        cpu = (by[a]["cpu_images_per_s"] / by[b]["cpu_images_per_s"]
               if by[a]["cpu_images_per_s"] and by[b]["cpu_images_per_s"] else float("nan"))
        ratios[label] = {"wall": wall, "cpu": cpu}
        print(f"| {label} | {wall:.2f} | {cpu:.2f} |")
    return ratios


# ----------------------------------------------------------------------------------------------
# profiler split of one training step (both modes)
# ----------------------------------------------------------------------------------------------
def _instrument(model, sync):
    """record_function ranges around the assigner and the loss computation (instance attributes:
    the model's code is unchanged; ``sync`` makes CUDA ranges measure the GPU work inside them)."""
    import torch

    def wrap(fn, label):
        def inner(*a, **k):
            with torch.profiler.record_function(label):
                out = fn(*a, **k)
                sync()
            return out
        return inner

    model.assign = wrap(model.assign, "atss/assign")
    model.compute_losses = wrap(model.compute_losses, "atss/losses_incl_assign")


def profile_step(preset: str, data: dict, batch: int, steps: int, device: str, amp: str | None) -> dict:
    import torch
    from torch.profiler import ProfilerActivity, profile, record_function

    from detector import build_detector
    from pipeline.data import DataConfig, build_dataloader
    from pipeline.optim import WarmupMultiStepLR, build_optimizer
    from pipeline.schedule import resolve_schedule
    from pipeline.training.loop import to_device, train_step

    base = DataConfig.tiny() if preset == "tiny" else DataConfig()
    data_cfg = base.replace(**data)
    loader = build_dataloader(data_cfg, "train", batch, train=True, seed=0)
    cats = loader.dataset.category_map.num_classes
    from detector import get_preset

    model = build_detector(get_preset(preset, num_classes=cats)).to(device).train()
    sched = resolve_schedule(batch, None, iterations=1000, warmup_iters=0)
    opt = build_optimizer(model, sched)
    lr = WarmupMultiStepLR(opt, sched)
    sync = (lambda: torch.cuda.synchronize()) if device.startswith("cuda") else (lambda: None)
    _instrument(model, sync)
    it = iter(loader)

    def step(i):
        with record_function("step"):
            with record_function("data"):
                images, targets = to_device(*next(it), torch.device(device))
                sync()
            train_step(model, opt, lr, images, targets, i, amp=amp,
                       image_sizes=[tuple(t["image_size"]) for t in targets])
            sync()

    for i in range(2):  # warm-up (lazy inits, cudnn autotune)
        step(i)
    acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.startswith("cuda") else [])
    with profile(activities=acts) as prof:
        for i in range(steps):
            step(2 + i)
    totals = {e.key: e.cpu_time_total for e in prof.key_averages() if e.key in
              ("step", "data", "atss/assign", "atss/losses_incl_assign")}
    step_us = totals.get("step", 0.0) or 1.0
    shares = {"data loading": totals.get("data", 0.0) / step_us,
              "assignment": totals.get("atss/assign", 0.0) / step_us,
              "losses (excl. assignment)": (totals.get("atss/losses_incl_assign", 0.0)
                                            - totals.get("atss/assign", 0.0)) / step_us}
    shares["rest (backbone/head fwd, backward, SGD)"] = 1.0 - sum(shares.values())
    print(f"\nstep split ({preset}, batch {batch}, {device}{', bf16' if amp else ''}; "
          f"{step_us / steps / 1e3:.0f} ms/step over {steps} profiled steps):")
    for k, v in shares.items():
        print(f"  {k:40s} {100 * v:5.1f}%")
    return {"ms_per_step": step_us / steps / 1e3, "shares": shares}


# ----------------------------------------------------------------------------------------------
# GPU: R-50 800x1333 batch 8, bf16 vs fp32
# ----------------------------------------------------------------------------------------------
def gpu_precision(batch: int, steps: int) -> list[dict]:
    import torch

    from detector import build_detector, get_preset
    from pipeline.optim import WarmupMultiStepLR, build_optimizer
    from pipeline.schedule import resolve_schedule
    from pipeline.training import train_step

    g = torch.Generator().manual_seed(0)
    images = torch.randn(batch, 3, 800, 1344, generator=g).cuda()
    targets = []
    for _ in range(batch):
        n = 7
        xy = torch.rand(n, 2, generator=g) * torch.tensor([1000.0, 600.0])
        wh = 16 + torch.rand(n, 2, generator=g) * 300
        targets.append({"boxes": torch.cat([xy, xy + wh], 1).cuda(), "labels": torch.randint(1, 81, (n,)).cuda()})
    rows = []
    for amp in (None, "bf16"):
        torch.manual_seed(0)
        model = build_detector(get_preset("atss_r50")).cuda().train()
        sched = resolve_schedule(batch, None, iterations=1000, warmup_iters=0)
        opt = build_optimizer(model, sched)
        lr = WarmupMultiStepLR(opt, sched)
        for i in range(3):
            train_step(model, opt, lr, images, targets, i, amp=amp)
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        t0 = time.perf_counter()
        for i in range(steps):
            train_step(model, opt, lr, images, targets, 3 + i, amp=amp)
        torch.cuda.synchronize()
        dt = time.perf_counter() - t0
        rows.append({"precision": "bf16 autocast" if amp else "fp32", "images_per_s": batch * steps / dt,
                     "peak_memory_gib": torch.cuda.max_memory_allocated() / 2**30})
        del model, opt
        torch.cuda.empty_cache()
    print("\n| R-50 800x1333, batch 8 | img/s | peak memory GiB |")
    print("|---|---|---|")
    for r in rows:
        print(f"| {r['precision']} | {r['images_per_s']:.1f} | {r['peak_memory_gib']:.1f} |")
    print(f"bf16 / fp32 speed: {rows[1]['images_per_s'] / rows[0]['images_per_s']:.2f}, "
          f"memory: {rows[1]['peak_memory_gib'] / rows[0]['peak_memory_gib']:.2f}")
    return rows


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--full", action="store_true", help="GPU mode: R-50 800x1333 batch 8, bf16 vs fp32")
    ap.add_argument("--iterations", type=int, default=40, help="training iterations per CPU configuration")
    ap.add_argument("--batch", type=int, default=4, help="global batch on CPU")
    ap.add_argument("--steps", type=int, default=10, help="timed / profiled steps")
    ap.add_argument("--omp-active", action="store_true",
                    help="keep OpenMP's default (spinning) wait policy instead of OMP_WAIT_POLICY=PASSIVE")
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args()
    out: dict = {}
    if args.full:
        import torch

        if not torch.cuda.is_available():
            print("--full needs a CUDA GPU", file=sys.stderr)
            return 2
        out["precision"] = gpu_precision(8, args.steps)
        out["profile"] = profile_step("atss_r50", {"train_min_size": 800, "max_size": 1333, "num_workers": 4},
                                      8, args.steps, "cuda", amp="bf16")
    else:
        print(f"training loop, tiny preset, synthetic data, global batch {args.batch}, "
              f"{args.iterations} iterations per configuration ({os.cpu_count()} cores, "
              f"OMP_WAIT_POLICY={os.environ.get('OMP_WAIT_POLICY', 'default')})")
        rows = cpu_scaling(args.iterations, args.batch)
        out["cpu"] = rows
        out["ratios"] = print_cpu_table(rows)
        import torch

        torch.set_num_threads(min(2, os.cpu_count() or 1))
        out["profile"] = profile_step("tiny", dict(CPU_DATA), args.batch, args.steps, "cpu", amp=None)
    if args.json:
        print(json.dumps(out, default=float))
    return 0


if __name__ == "__main__":
    sys.exit(main())
