"""Accuracy side of the comparison: does the paper's ordering hold on the synthetic dataset?

The paper's Table 3 compares assignment strategies with everything else equal: RetinaNet with
one anchor per location and all of ATSS's other improvements (GroupNorm, GIoU, in-GT-box,
centerness, per-level scalar) but max-IoU assignment (37.0 AP), the same with ATSS assignment
(39.3), and FCOS's spatial & scale assignment with point regression (37.8). This script trains
those detectors (the ``tiny`` CPU presets) with one fixed seed, on the same synthetic COCO-format
data, for the same iterations with the same schedule, through the project's training loop
(``pipeline.training.run_training(cfg, num_workers=0)``, in-process, no Ray, no MLflow), then
reports the COCO AP of each on the synthetic val split (``pipeline.evaluation.evaluate_coco``)
and whether the paper's ordering ATSS > FCOS > RetinaNet (#A=1) holds.

``--seeds 0,1,2`` repeats every model with other seeds (initial weights and data order) and
reports mean and spread, to tell an ordering from noise: one short run on a small dataset can
differ by more than the paper's 1-2 AP gaps.

    python bench/accuracy.py                 # 3 models x 200 iterations x 8 images of ~160 px (~6 min, 2 idle cores)
    python bench/accuracy.py --models retinanet_a1,atss,fcos,atss_fcos,retinanet_a9
    python bench/accuracy.py --full          # GPU: 2000 synthetic images, 3000 iterations, 3 seeds
    python bench/accuracy.py --json          # + the figures as one JSON object on the last line
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

# Idle OpenMP threads must not spin on cores other processes need (docs/training.md): set before torch loads.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from pipeline.training import TrainConfig, build_train_config, run_training  # noqa: E402
from pipeline.verdict import Claim, Ordering, judge  # noqa: E402

sys.path.insert(0, str(REPO / "bench"))
from pipeline.environment import collect_environment  # noqa: E402

# key -> (detector preset, field overrides, label, the paper's R-50 1x minival AP (spec 6.3))
MODELS: dict[str, tuple[str, dict, str, float]] = {
    "retinanet_a1": ("tiny", {"assigner": "max_iou"}, "RetinaNet (#A=1) + imprs, max-IoU", 37.0),
    "atss": ("tiny", {}, "ATSS", 39.3),
    "fcos": ("fcos_tiny", {}, "FCOS (spatial & scale, point)", 37.8),
    "atss_fcos": ("atss_fcos_tiny", {}, "FCOS + ATSS (point)", 39.2),
    "retinanet_a9": ("retinanet_tiny", {}, "RetinaNet (#A=9), no imprs", 36.3),
}
PAPER_ORDER = ("atss", "fcos", "retinanet_a1")  # best first (Table 3)
METRICS = ("AP", "AP50", "AP75", "APs", "APm", "APl")


def train_config(model: str, seed: int, args, storage: str) -> TrainConfig:
    preset, overrides, _, _ = MODELS[model]
    data = {"synthetic_train_images": args.train_images, "synthetic_val_images": args.val_images}
    if args.cache_dir:
        data["cache_dir"] = args.cache_dir
    if args.image_size:
        data.update(train_min_size=args.image_size, test_min_size=args.image_size, max_size=args.image_size * 8 // 5)
    return build_train_config(
        preset=preset, detector=dict(overrides), data=data, batch_size=args.batch, schedule=None,
        iterations=args.iterations, base_lr=args.base_lr, seed=seed, log_period=args.log_period,
        checkpoint_period=0, checkpoints_to_keep=1, eval_at_end=True, eval_batch_size=args.eval_batch,
        storage_path=storage, run_name=f"{model}_seed{seed}", log_model=False, mlflow_enabled=False,
        torch_threads=args.threads)


def run_one(model: str, seed: int, args, storage: str) -> dict:
    cfg = train_config(model, seed, args, storage)
    t0 = time.perf_counter()
    res = run_training(cfg, num_workers=0, use_gpu=args.device == "cuda", verbose=args.verbose)
    if not res.eval:
        raise RuntimeError(f"{model} seed {seed}: the run finished without a final evaluation")
    out = {k: float(res.eval[k]) for k in METRICS}
    out.update(model=model, seed=seed, iterations=res.iteration, wall_s=time.perf_counter() - t0,
               train_images_per_s=res.train_images_per_s,
               per_category={k: float(v) for k, v in res.eval.get("per_category", {}).items()})
    return out


def summarise(runs: list[dict], models: list[str]) -> list[dict]:
    rows = []
    for m in models:
        mine = [r for r in runs if r["model"] == m]
        row = {"model": m, "label": MODELS[m][2], "paper_AP": MODELS[m][3], "seeds": [r["seed"] for r in mine],
               "AP_per_seed": [r["AP"] for r in mine], "train_images_per_s": statistics.mean(
                   r["train_images_per_s"] or 0.0 for r in mine)}
        for k in METRICS:
            vals = [r[k] for r in mine]
            row[k] = statistics.mean(vals)
            row[f"{k}_sd"] = statistics.stdev(vals) if len(vals) > 1 else 0.0
        rows.append(row)
    return rows


def ordering_verdict(rows: list[dict]) -> str:
    """Whether ATSS > FCOS > RetinaNet (#A=1) holds, paired by seed (``pipeline.verdict``).

    The models of one seed share initial weights (where the shapes match), data order and data,
    so differences within a seed are far less noisy than the spread of one model over seeds.
    """
    by = {r["model"]: r for r in rows}
    have = [m for m in PAPER_ORDER if m in by]
    if len(have) < 2:
        return "paper ordering: needs at least two of " + ", ".join(PAPER_ORDER)
    claim = Claim("3", "paper ordering", Ordering(tuple((MODELS[a][2], MODELS[b][2]) for a, b in zip(have, have[1:]))))
    seeds = by[have[0]].get("seeds") or range(len(by[have[0]]["AP_per_seed"]))
    ap_by_seed = {s: {MODELS[m][2]: 100 * by[m]["AP_per_seed"][i] for m in have} for i, s in enumerate(seeds)}
    return judge(claim, ap_by_seed).text()


def format_table(rows: list[dict], setup: dict) -> str:
    m = setup["machine"]
    seeds = len(setup["seeds"])
    lines = [f"Machine: {m['cpu']} ({m['cpus']} cores), torch {m['torch']} with {setup['threads']} threads, "
             f"device {m.get('gpu') or setup['device']}",
             f"Data: synthetic, {setup['train_images']} train / {setup['val_images']} val images, inputs "
             f"~{setup['image_size'] or 160} px; {setup['iterations']} iterations x batch {setup['batch']}, "
             f"base LR {setup['base_lr']} at batch 16 (linear scaling), seeds {setup['seeds']}"
             + (" (mean ± sd over seeds)" if seeds > 1 else ""), ""]
    lines.append("| model | preset | " + " | ".join(METRICS) + " | paper AP (R-50) | train img/s |")
    lines.append("|---|---|" + "---|" * (len(METRICS) + 2))
    for r in rows:
        cells = [f"{100 * r[k]:.1f}" + (f" ±{100 * r[f'{k}_sd']:.1f}" if seeds > 1 and k == "AP" else "")
                 for k in METRICS]
        preset, overrides, _, _ = MODELS[r["model"]]
        name = preset + "".join(f" {k}={v}" for k, v in overrides.items())
        lines.append(f"| {r['label']} | `{name}` | " + " | ".join(cells)
                     + f" | {r['paper_AP']:.1f} | {r['train_images_per_s']:.1f} |")
    lines += ["", ordering_verdict(rows)]
    return "\n".join(lines)


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--full", action="store_true",
                   help="GPU size: 2000 train / 500 val images at 320 px, 3000 iterations x 16, seeds 0,1,2")
    p.add_argument("--models", default="retinanet_a1,atss,fcos", help=f"comma list of {list(MODELS)}")
    p.add_argument("--seeds", help="comma list of seeds (default 0; --full 0,1,2)")
    p.add_argument("--iterations", type=int)
    p.add_argument("--batch", type=int)
    p.add_argument("--base-lr", type=float, default=0.02, help="LR at batch 16 (linearly scaled; jobs/train.py's tiny default)")
    p.add_argument("--train-images", type=int)
    p.add_argument("--val-images", type=int)
    p.add_argument("--image-size", type=int, help="shorter input side (default: DataConfig.tiny's 160)")
    p.add_argument("--eval-batch", type=int, default=8)
    p.add_argument("--threads", type=int, default=1, help="torch intra-op threads per run (default 1)")
    p.add_argument("--device", help="cpu / cuda (default: cuda with --full when available)")
    p.add_argument("--cache-dir", help="synthetic data cache (default: the data layer's, ~/.cache/atss_ray)")
    p.add_argument("--storage", help="keep the runs' checkpoints and results here (default: a temporary folder)")
    p.add_argument("--log-period", type=int, default=100)
    p.add_argument("--verbose", action="store_true", help="the training loop's progress lines")
    p.add_argument("--json", action="store_true", help="print all figures as JSON on the last line")
    args = p.parse_args(argv)
    full = args.full
    args.models = [m.strip() for m in args.models.split(",") if m.strip()]
    if unknown := [m for m in args.models if m not in MODELS]:
        p.error(f"--models: unknown {unknown}; choose from {list(MODELS)}")
    try:
        args.seeds = [int(s) for s in (args.seeds or ("0,1,2" if full else "0")).split(",")]
    except ValueError:
        p.error(f"--seeds must be a comma list of integers, got {args.seeds!r}")
    args.iterations = args.iterations or (3000 if full else 200)
    args.batch = args.batch or (16 if full else 8)
    args.train_images = args.train_images or (2000 if full else 300)
    args.val_images = args.val_images or (500 if full else 50)
    args.image_size = args.image_size or (320 if full else None)
    args.device = args.device or ("cuda" if full and torch.cuda.is_available() else "cpu")
    if args.device == "cuda" and not torch.cuda.is_available():
        p.error("--device cuda: no CUDA device here")
    return args


def main(argv=None) -> dict:
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    setup = {"machine": collect_environment(str(device)).to_dict(), "device": args.device, "threads": args.threads, "seeds": args.seeds,
             "iterations": args.iterations, "batch": args.batch, "base_lr": args.base_lr,
             "train_images": args.train_images, "val_images": args.val_images, "image_size": args.image_size,
             "models": args.models}
    t0 = time.perf_counter()
    runs = []
    with tempfile.TemporaryDirectory(prefix="atss_accuracy_") as tmp:
        storage = str(Path(args.storage).resolve()) if args.storage else tmp
        for seed in args.seeds:
            for m in args.models:
                print(f"[accuracy] {m} seed {seed}: {args.iterations} iterations", file=sys.stderr, flush=True)
                r = run_one(m, seed, args, storage)
                print(f"[accuracy] {m} seed {seed}: AP {100 * r['AP']:.1f} AP50 {100 * r['AP50']:.1f} "
                      f"({r['wall_s']:.0f} s)", file=sys.stderr, flush=True)
                runs.append(r)
    rows = summarise(runs, args.models)
    print(format_table(rows, setup))
    print(f"\n(total {time.perf_counter() - t0:.0f} s)")
    out = {"setup": setup, "rows": rows, "runs": runs, "verdict": ordering_verdict(rows)}
    if args.json:
        print(json.dumps(out))
    return out


if __name__ == "__main__":
    main()
