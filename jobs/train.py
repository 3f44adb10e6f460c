"""Train ATSS on Ray Train (or in this process), log to MLflow, print the COCO AP reached.

    python jobs/train.py                                   # tiny preset, synthetic data, local Ray: a few minutes on 2 CPUs
    python jobs/train.py --preset atss_r50 --data coco:/data/coco --workers 8 --use-gpu \\
        --schedule 1x --storage-path s3://bucket/atss --name r50_1x --max-failures 3
    ray job submit --working-dir . -- python jobs/train.py --preset atss_r50 --data coco:/data/coco ...
    python jobs/train.py --name r50_1x --resume ...        # continue a run from its latest checkpoint

Re-running with the same ``--name`` (and storage path) resumes that run from its latest
checkpoint; ``--resume`` additionally makes "nothing to resume" an error. ``--batch-size`` is the
global batch; LR and a named schedule follow the linear scaling rule from 0.01 at 16 images (the log
says what was applied). ``--workers 0`` trains in this process without Ray. Training runs in fp32
(as the paper); ``--amp bf16`` opts into bf16 autocast for the training steps (evaluation stays fp32).

Defaults: ``MLFLOW_TRACKING_URI`` or ``sqlite:///<cwd>/mlflow.db``; checkpoints in ``<cwd>/ray_results``.
Under ``ray job submit`` the cwd is a temporary copy of the working dir, so pass ``--storage-path``
(shared storage on a multi-node cluster) and ``MLFLOW_TRACKING_URI`` for results that outlive the job.
"""
from __future__ import annotations

import argparse
import json
import os
import signal
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

# Before torch loads OpenMP (here and in a local Ray cluster started from this process, whose workers
# inherit it): idle OpenMP threads sleep instead of spinning. With the default (active) policy a
# multi-threaded CPU process on a busy 2-core machine runs ~8x slower (docs/training.md, Throughput).
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

from detector.config import DetectorConfig  # noqa: E402
from detector.fields import FieldError, coerce_fields, parse_assignments, parse_value  # noqa: E402
from pipeline.cli import UsageError, add_exit_codes, bad_input, run_main  # noqa: E402
from pipeline.data import AnnotationError, DataConfig  # noqa: E402
from pipeline.training import (TrainConfig, build_train_config, check_data_paths, check_settings,  # noqa: E402
                               check_workers, is_tiny, run_training)

# What the default (no-argument) run uses on a CPU box; bench/scaling.py and docs/training.md have
# the numbers. Two 1-CPU workers (one torch thread each): a multi-threaded worker on a busy machine
# runs ~20x slower unless OMP_WAIT_POLICY=PASSIVE reaches it, which a `ray start` cluster does not do.
TINY_DEFAULTS = dict(batch_size=8, iterations=300, base_lr=0.02, log_period=20, checkpoint_period=100)
DEFAULT_WORKERS_CPU = 2


BAD_INPUT = """bad input (exit 2): a --detector / --data-opt field of the wrong type or out of range, or unknown;
  --lr-steps that are not integers; --workers < 0; a --config file that is missing, not YAML/JSON or has
  unknown keys; data whose annotation file is missing or not JSON or whose image folder is missing
  (all checked by --dry-run too, before Ray or MLflow start); nothing to --resume"""


def _tags(items: list[str] | None) -> dict[str, str]:
    """``--tag KEY=VALUE``: MLflow tags are strings."""
    out = {}
    for item in items or []:
        key, sep, value = item.partition("=")
        if not sep or not key.strip():
            raise UsageError(f"--tag {item!r}: expected KEY=VALUE")
        out[key.strip()] = value
    return out


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    m = ap.add_argument_group("model and data")
    m.add_argument("--config", help="training settings (build_train_config's keywords) as a YAML/JSON file; "
                                    "the flags below override it")
    m.add_argument("--preset", help="detector preset (default tiny): atss_r50, retinanet_r50, fcos_r50, tiny, ...")
    m.add_argument("--detector", action="append", metavar="KEY=VALUE",
                   help="DetectorConfig override, e.g. --detector topk=5 (repeatable)")
    m.add_argument("--data", help="synthetic (default) | coco:/path/to/coco | files")
    m.add_argument("--data-opt", action="append", metavar="KEY=VALUE",
                   help="DataConfig field, e.g. --data-opt train_ann=/x/a.json --data-opt num_workers=4")
    o = ap.add_argument_group("optimisation")
    o.add_argument("--batch-size", type=int, help="global images per iteration (paper 16)")
    o.add_argument("--batch-per-worker", type=int, help="images per worker (global = this x workers)")
    o.add_argument("--schedule", choices=["1x", "2x"], help="the paper's schedule, scaled to the batch")
    o.add_argument("--iterations", type=int, help="explicit run length instead of --schedule")
    o.add_argument("--lr-steps", help="comma-separated iterations of the x0.1 LR steps")
    o.add_argument("--base-lr", type=float, help="LR at the reference batch of 16 (paper 0.01)")
    o.add_argument("--no-lr-scaling", action="store_true", help="use --base-lr as is, whatever the batch")
    o.add_argument("--warmup-iters", type=int, help="constant 1/3 warm-up length (default: 500 scaled)")
    o.add_argument("--max-grad-norm", type=float, help="clip gradients to this norm (paper: no clipping)")
    o.add_argument("--amp", choices=["bf16"], help="mixed precision: bf16 autocast in training (default: fp32, "
                                                 "as the paper); evaluation always runs in fp32")
    o.add_argument("--seed", type=int)
    r = ap.add_argument_group("cluster and fault tolerance")
    r.add_argument("--workers", type=int, help=f"Ray Train workers (default: {DEFAULT_WORKERS_CPU} on CPU, "
                                               "all GPUs with --use-gpu); 0 = this process, no Ray")
    r.add_argument("--use-gpu", action="store_true", help="one GPU per worker, NCCL")
    r.add_argument("--cpus-per-worker", type=float, help="CPUs reserved per worker (Ray default 1)")
    r.add_argument("--max-failures", type=int, default=0,
                   help="worker-group restarts from the last checkpoint before giving up (-1: forever)")
    r.add_argument("--storage-path", help="absolute path or URI (s3://...) for checkpoints (default <cwd>/ray_results)")
    r.add_argument("--name", help="run name; the same name resumes (default atss_<preset>_<time>)")
    r.add_argument("--resume", action="store_true", help="require an existing checkpoint of --name")
    r.add_argument("--checkpoint-period", type=int, help="iterations between checkpoints (paper 2500)")
    r.add_argument("--fail-at-iteration", type=int, help=argparse.SUPPRESS)  # fault-injection tests
    e = ap.add_argument_group("evaluation and tracking")
    e.add_argument("--eval-period", type=int, help="also evaluate every N iterations (default: at the end only)")
    e.add_argument("--no-eval", action="store_true", help="skip the final evaluation")
    e.add_argument("--log-period", type=int, help="iterations between progress lines / MLflow metrics")
    e.add_argument("--mlflow-uri", help="tracking URI (default MLFLOW_TRACKING_URI or sqlite:///<cwd>/mlflow.db)")
    e.add_argument("--experiment", help="MLflow experiment (default atss)")
    e.add_argument("--tag", action="append", metavar="KEY=VALUE", help="MLflow run tag (repeatable)")
    e.add_argument("--register-model", help="also register the final model under this name")
    e.add_argument("--dry-run", action="store_true", help="validate and print the resolved config, train nothing")
    e.add_argument("--json", action="store_true", help="print the result as one JSON object on the last line")
    return add_exit_codes(ap, BAD_INPUT)


def config_from_args(args) -> tuple[TrainConfig, int]:
    """The TrainConfig and worker count of the command line (raises ValueError on a bad combination)."""
    base: dict = {}
    if args.config:
        path = Path(args.config)
        if not path.is_file():
            raise FileNotFoundError(f"--config file not found: {path}")
        import yaml

        base = yaml.safe_load(path.read_text()) or {}
        if not isinstance(base, dict):
            raise ValueError(f"--config {path}: expected a mapping of training settings")
        check_settings(base, f"--config {path}")
        base = coerce_fields(build_train_config, base, option=f"--config {path}")  # YAML reads 1e-3 as text
    preset = args.preset or base.get("preset", "tiny")
    base["preset"] = preset
    explicit_length = args.schedule or args.iterations or "schedule" in base or "iterations" in base
    if is_tiny(preset):
        for k, v in TINY_DEFAULTS.items():
            if k == "iterations" and explicit_length:
                continue
            base.setdefault(k, v)
    if args.schedule:
        base.update(schedule=args.schedule, iterations=None)
    if args.iterations is not None:
        base["iterations"] = args.iterations
    workers = args.workers
    if workers is not None and workers < 0:
        raise UsageError(f"--workers {workers}: expected an int >= 0 (0 trains in this process, without Ray)")
    if workers is None:
        workers = _gpu_count() if args.use_gpu else DEFAULT_WORKERS_CPU
    if args.batch_size is not None and args.batch_per_worker is not None:
        raise ValueError("give --batch-size (global) or --batch-per-worker, not both")
    if args.batch_per_worker is not None:
        base["batch_size"] = args.batch_per_worker * max(workers, 1)
    simple = {"batch_size": args.batch_size, "base_lr": args.base_lr, "warmup_iters": args.warmup_iters,
              "max_grad_norm": args.max_grad_norm, "seed": args.seed, "storage_path": args.storage_path,
              "run_name": args.name, "checkpoint_period": args.checkpoint_period,
              "eval_period": args.eval_period, "log_period": args.log_period, "mlflow_uri": args.mlflow_uri,
              "mlflow_experiment": args.experiment, "register_model": args.register_model,
              "fail_at_iteration": args.fail_at_iteration}
    base.update({k: v for k, v in simple.items() if v is not None})
    if args.lr_steps:
        try:
            base["lr_steps"] = parse_value(build_train_config, "lr_steps", args.lr_steps)
        except FieldError as e:
            raise e.from_option("--lr-steps", args.lr_steps) from None
    if args.no_lr_scaling:
        base["scale_lr"] = False
    if args.amp:
        base["amp"] = args.amp
    if args.no_eval:
        base["eval_at_end"] = False
    base["detector"] = {**base.get("detector", {}), **parse_assignments(DetectorConfig, args.detector, "--detector")}
    data = {**base.get("data", {}), **parse_assignments(DataConfig, args.data_opt, "--data-opt")}
    if args.data:
        data["source"] = args.data
    base["data"] = data
    base["mlflow_tags"] = {**base.get("mlflow_tags", {}), **_tags(args.tag)}
    return build_train_config(**base), workers


def _gpu_count() -> int:
    import torch

    n = torch.cuda.device_count()
    if n == 0:
        raise ValueError("--use-gpu: no GPU visible here; give --workers N explicitly for a remote GPU cluster")
    return n


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    with bad_input(ValueError, FileNotFoundError):  # everything the real run checks before Ray or MLflow start
        cfg, workers = config_from_args(args)
        check_workers(cfg, workers)
        check_data_paths(cfg)
    if args.dry_run:
        print(f"[dry-run] {cfg.schedule.describe()}; {max(workers, 1)} worker(s) x "
              f"{cfg.batch_size // max(workers, 1)} images; {'fp32' if cfg.amp is None else cfg.amp + ' autocast'}")
        print(json.dumps({"workers": workers, "config": cfg.to_dict()}, indent=1, default=str))
        return 0

    # `ray job stop` and schedulers send SIGTERM: end as KILLED in MLflow instead of staying RUNNING.
    signal.signal(signal.SIGTERM, lambda signum, frame: sys.exit(128 + signum))
    resources = {"CPU": args.cpus_per_worker} if args.cpus_per_worker is not None else None
    with bad_input(ValueError, FileNotFoundError):
        result = run_training(cfg, num_workers=workers, use_gpu=args.use_gpu, max_failures=args.max_failures,
                              resources_per_worker=resources, require_resume=args.resume)
    if result.ap is not None:
        print(f"COCO AP {result.ap:.4f} (AP50 {result.eval['AP50']:.4f}, AP75 {result.eval['AP75']:.4f}) "
              f"after {result.iteration} iterations")
    if result.train_images_per_s:
        print(f"training loop: {result.train_images_per_s:.1f} images/s; total {result.wall_s:.0f}s")
    print(f"checkpoint: {result.checkpoint_path}")
    print(f"MLflow run {result.mlflow_run_id} in {result.tracking_uri}")
    if args.json:
        print(json.dumps({"run_name": result.run_name, "iteration": result.iteration, "ap": result.ap,
                          "metrics": {k: v for k, v in (result.eval or {}).items() if k != "per_category"},
                          "checkpoint": result.checkpoint_path, "mlflow_run_id": result.mlflow_run_id,
                          "tracking_uri": result.tracking_uri, "train_images_per_s": result.train_images_per_s,
                          "wall_s": result.wall_s}))
    return 0


if __name__ == "__main__":
    run_main(main, errors=(AnnotationError,))
