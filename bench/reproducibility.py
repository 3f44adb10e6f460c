"""What is and is not reproducible: one short training under other CPU kernels and thread counts.

The same config and seed give bit-identical weights on one machine whatever its load
(tests/test_reproducibility.py). A different CPU model does not, because torch picks its kernels by
the instruction set it finds. This script shows how large that difference is without a second
machine: it trains the same run (the ``tiny`` preset on synthetic data, evaluated at the end) in
fresh processes that force other kernels, and compares each run's weights and AP with the
reference run (this machine's own kernels):

* ``native`` / ``native_again``: no setting (the control: must be identical);
* ``aten_<cap>``: ``ATEN_CPU_CAPABILITY=<cap>`` for every capability this CPU can run
  (``avx512``, ``avx2``, ``default`` = scalar; ``torch.backends.cpu.get_cpu_capability()``): ATen's
  own vectorised kernels (element-wise ops, reductions, GroupNorm, ...), not oneDNN's or MKL's;
* ``avx2_cpu`` (on an AVX512 machine): ``ATEN_CPU_CAPABILITY=avx2`` plus ``ONEDNN_MAX_CPU_ISA=AVX2``
  (convolutions) and ``MKL_ENABLE_INSTRUCTIONS=AVX2`` (matrix products): the kernels an AVX2-only
  CPU (e.g. an older AMD EPYC) would run;
* ``threads_2``: two intra-op threads instead of one (another way of splitting reductions).

Each run records its :class:`pipeline.environment.Environment`; the table shows that every run
whose weights differ also has another environment key, i.e. the recorded environment explains it.

    python bench/reproducibility.py                       # 100 iterations x 8 images, 7 runs
    python bench/reproducibility.py --iterations 20 --parallel 3 --json
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

KERNEL_VARS = ("ATEN_CPU_CAPABILITY", "ONEDNN_MAX_CPU_ISA", "MKL_ENABLE_INSTRUCTIONS", "MKL_CBWR")
CAPABILITY_ORDER = ("avx512", "avx2", "default")  # x86; what ATEN_CPU_CAPABILITY accepts


def variants(capability: str) -> dict[str, tuple[dict[str, str], int]]:
    """name -> (environment variables, torch threads) of every run, the reference first."""
    runs: dict[str, tuple[dict[str, str], int]] = {"native": ({}, 1), "native_again": ({}, 1)}
    cap = capability.lower()
    usable = CAPABILITY_ORDER[CAPABILITY_ORDER.index(cap):] if cap in CAPABILITY_ORDER else ("default",)
    for c in usable:
        runs[f"aten_{c}"] = ({"ATEN_CPU_CAPABILITY": c}, 1)
    if cap == "avx512":
        runs["avx2_cpu"] = ({"ATEN_CPU_CAPABILITY": "avx2", "ONEDNN_MAX_CPU_ISA": "AVX2",
                             "MKL_ENABLE_INSTRUCTIONS": "AVX2"}, 1)
    runs["threads_2"] = ({}, 2)
    return runs


def _cfg(out: Path, name: str, iterations: int, batch: int, threads: int, seed: int, lr: float):
    from pipeline.training import build_train_config

    # base_lr is given at the reference batch 16: ``lr`` is the LR this batch trains at
    return build_train_config(preset="tiny", batch_size=batch, iterations=iterations, seed=seed,
                              base_lr=lr * 16 / batch, torch_threads=threads, log_period=max(iterations // 4, 1),
                              checkpoint_period=0, eval_at_end=True, mlflow_enabled=False,
                              storage_path=str(out / "runs"), run_name=name, data={"cache_dir": str(out / "cache")})


def worker(args) -> int:
    """One run in this process (started by :func:`main` with the variant's environment)."""
    import resource

    import torch

    from pipeline.environment import collect_environment
    from pipeline.training import run_training

    cfg = _cfg(args.out, args.worker, args.iterations, args.batch, args.threads, args.seed, args.lr)
    torch.set_num_threads(args.threads)
    env = collect_environment("cpu", cfg.data)
    result = run_training(cfg, num_workers=0, verbose=False)
    usage = resource.getrusage(resource.RUSAGE_SELF)
    (args.out / f"{args.worker}.json").write_text(json.dumps({
        "name": args.worker, "checkpoint": result.checkpoint_path, "loss": result.metrics.get("loss"),
        "eval": {k: v for k, v in result.eval.items() if k != "per_category"},
        "cpu_capability": torch.backends.cpu.get_cpu_capability(), "environment_key": env.key(),
        "environment": env.footer(), "wall_s": result.wall_s, "cpu_s": usage.ru_utime + usage.ru_stime}))
    return 0


def compare(reference: dict, other: dict) -> dict:
    """Every tensor of the state dict compared (how many differ); the largest absolute difference
    and the relative L2 distance of all trained weights together (``||other - ref|| / ||ref||``)
    leave out BatchNorm's running statistics, which are averages of batch statistics, not weights."""
    import torch

    differing, max_abs, sq_diff, sq_ref = 0, 0.0, 0.0, 0.0
    for k, a in reference.items():
        b = other[k]
        weight = a.is_floating_point() and "running_" not in k
        if weight:
            sq_ref += a.double().pow(2).sum().item()
        if torch.equal(a, b):
            continue
        differing += 1
        if weight:
            d = a.double() - b.double()
            max_abs = max(max_abs, d.abs().max().item())
            sq_diff += d.pow(2).sum().item()
    return {"tensors": len(reference), "differing_tensors": differing, "max_abs_diff": max_abs,
            "rel_l2_diff": (sq_diff / sq_ref) ** 0.5 if sq_ref else 0.0}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--iterations", type=int, default=100)
    ap.add_argument("--batch", type=int, default=8, help="global batch (the demo's: 8)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--lr", type=float, default=0.01, help="LR at --batch (default: the demo's, 0.01 at 8)")
    ap.add_argument("--parallel", type=int, default=1, help="runs at a time (each uses its own threads)")
    ap.add_argument("--only", default=None, help="comma-separated variant names (the reference is always run)")
    ap.add_argument("--out", type=Path, default=None,
                    help="work folder (default: a new temporary one); runs already finished there are reused")
    ap.add_argument("--json", action="store_true", help="also one JSON object on the last line")
    ap.add_argument("--worker", default=None, help=argparse.SUPPRESS)
    ap.add_argument("--threads", type=int, default=1, help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.worker:
        return worker(args)

    import tempfile

    import torch

    from pipeline import checkpoint as ck
    from pipeline.data import build_dataset
    from pipeline.environment import cpu_description

    args.out = args.out or Path(tempfile.mkdtemp(prefix="atss_repro_"))
    args.out.mkdir(parents=True, exist_ok=True)
    capability = torch.backends.cpu.get_cpu_capability()
    runs = variants(capability)
    if args.only:
        keep = {"native", *args.only.split(",")}
        runs = {k: v for k, v in runs.items() if k in keep}
    # generate the synthetic data once, before runs in parallel would race to write it
    data_cfg = _cfg(args.out, "data", args.iterations, args.batch, 1, args.seed, args.lr).data
    build_dataset(data_cfg, "train", train=True), build_dataset(data_cfg, "val", train=False)
    cpu, flags = cpu_description()
    print(f"{cpu}; flags {' '.join(flags)}; torch {torch.__version__} uses {capability} kernels")
    print(f"{len(runs)} runs of the tiny preset: {args.iterations} iterations x {args.batch} images, seed "
          f"{args.seed}, evaluated; work folder {args.out}", flush=True)

    base_env = {k: v for k, v in os.environ.items() if k not in KERNEL_VARS}
    pending = [(name, run) for name, run in runs.items() if not (args.out / f"{name}.json").exists()]
    running: list[tuple[str, subprocess.Popen, float]] = []
    while pending or running:
        while pending and len(running) < args.parallel:
            name, (env, threads) = pending.pop(0)
            cmd = [sys.executable, __file__, "--worker", name, "--threads", str(threads), "--iterations",
                   str(args.iterations), "--batch", str(args.batch), "--seed", str(args.seed), "--lr", str(args.lr),
                   "--out", str(args.out)]
            log = open(args.out / f"{name}.log", "w")
            running.append((name, subprocess.Popen(cmd, env={**base_env, **env, "OMP_NUM_THREADS": str(threads)},
                                                   stdout=log, stderr=subprocess.STDOUT), time.time()))
        for item in list(running):
            name, proc, t0 = item
            if proc.poll() is None:
                continue
            running.remove(item)
            if proc.returncode:
                print(f"run {name} failed (rc {proc.returncode}); see {args.out / (name + '.log')}", file=sys.stderr)
                return 1
            print(f"  {name} done in {time.time() - t0:.0f} s", flush=True)
        time.sleep(1)

    results = {name: json.loads((args.out / f"{name}.json").read_text()) for name in runs}
    ref = results["native"]
    ref_weights = ck.load_state(ref["checkpoint"])["model"]
    rows = []
    for name, (env, threads) in runs.items():
        r = results[name]
        diff = compare(ref_weights, ck.load_state(r["checkpoint"])["model"])
        rows.append({"run": name, "settings": " ".join(f"{k}={v}" for k, v in env.items()) or "-",
                     "threads": threads, "kernels": r["cpu_capability"], **diff,
                     "AP": 100 * r["eval"]["AP"], "dAP": 100 * (r["eval"]["AP"] - ref["eval"]["AP"]),
                     "AP50": 100 * r["eval"]["AP50"], "loss": r["loss"], "same_environment": (
                         r["environment_key"] == ref["environment_key"]), "cpu_s": r["cpu_s"]})
    print("\n| run | settings | threads | ATen kernels | tensors differing | weights: max abs diff | rel. L2 diff | AP | "
          "AP - ref | AP50 | last loss | same env. key |")
    print("|---|---|---|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['run']} | {r['settings']} | {r['threads']} | {r['kernels']} | {r['differing_tensors']} / "
              f"{r['tensors']} | {r['max_abs_diff']:.2g} | {r['rel_l2_diff']:.2g} | {r['AP']:.2f} | "
              f"{r['dAP']:+.2f} | {r['AP50']:.2f} | {r['loss']:.4f} | {'yes' if r['same_environment'] else 'no'} |")
    print(f"\nreference environment: {ref['environment']}")
    unexplained = [r["run"] for r in rows if r["differing_tensors"] and r["same_environment"]]
    if unexplained:
        print(f"NOT explained by the recorded environment: {unexplained}")
    if args.json:
        print(json.dumps({"capability": capability, "cpu": cpu, "rows": rows, "unexplained": unexplained}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
