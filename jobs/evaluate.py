"""Evaluate a trained detector on a COCO split, or score an existing COCO results file.

    # a checkpoint (directory, state.pt, runs:/<id>/model, models:/<name>/<version>) on a split
    python jobs/evaluate.py --checkpoint ray_results/run/checkpoint_000001 --data coco:/data/coco
    python jobs/evaluate.py --checkpoint runs:/<run id>/model --tta --workers 2 --json
    # explicit files instead of a data source
    python jobs/evaluate.py --checkpoint CKPT --annotations GT.json --images DIR
    # an existing results file
    python jobs/evaluate.py --results DETS.json --annotations GT.json --json

Without ``--data`` / ``--annotations`` the checkpoint's own data config is used (what it was
trained on, e.g. the synthetic set). ``--tta`` runs the paper's multi-scale + flip testing
(``pipeline.tta``), with all sizes scaled to the data config's test size (exactly the paper's at
800); ``--tta-config`` gives the settings explicitly. ``--json`` prints the metrics as one JSON
object (keys AP, AP50, AP75, APs, APm, APl) on the last line.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from pipeline.evaluation import METRIC_KEYS, evaluate_coco  # noqa: E402


def add_model_arguments(ap: argparse.ArgumentParser) -> None:
    """Options shared with jobs/testdev.py: how to run the model."""
    ap.add_argument("--checkpoint", help="checkpoint directory, its state.pt, or an MLflow model URI "
                                         "(runs:/<run id>/model, models:/<name>/<version>)")
    ap.add_argument("--workers", type=int, default=0,
                    help="Ray tasks to shard the images over (0: in this process, no Ray)")
    ap.add_argument("--device", default=None, help="cpu or cuda (default: cuda when available)")
    ap.add_argument("--batch-size", type=int, default=2, help="images per forward pass")
    ap.add_argument("--amp", action="store_true", help="bf16 autocast (CUDA only)")
    ap.add_argument("--test-min-size", type=int, default=None,
                    help="shorter side at test time (default: the data config's, paper 800)")
    ap.add_argument("--max-size", type=int, default=None, help="longer-side cap (default: paper 1333)")
    ap.add_argument("--tta", action="store_true", help="multi-scale + flip testing (ATSS.md section 4)")
    ap.add_argument("--tta-config", default=None,
                    help="TTAConfig as JSON or a JSON file (implies --tta), e.g. "
                         "'{\"scales\": [400, 1200], \"scale_ranges\": [[96, null], [0, 256]]}'")
    ap.add_argument("--max-dets", type=int, default=100,
                    help="detections kept per image (the COCO server's limit; TTA yields up to 1000)")
    ap.add_argument("--mlflow-uri", default=None,
                    help="tracking URI for MLflow model URIs (and logging); default: "
                         "MLFLOW_TRACKING_URI or sqlite:///<cwd>/mlflow.db")


def tracking_uri(args) -> str:
    """The MLflow store of the command line: ``--mlflow-uri``, else ``MLFLOW_TRACKING_URI``, else
    ``sqlite:///<cwd>/mlflow.db`` (absolute)."""
    from pipeline import tracking

    return tracking.absolute_tracking_uri(args.mlflow_uri) if args.mlflow_uri else tracking.default_tracking_uri()


def load_checkpoint(args) -> dict:
    """``load_model_state`` of ``--checkpoint``; ``runs:/`` and ``models:/`` URIs resolve in the
    ``--mlflow-uri`` store (set as MLflow's default only while loading)."""
    from pipeline.checkpoint import is_mlflow_uri
    from pipeline.evaluation import load_model_state

    if not is_mlflow_uri(args.checkpoint):
        return load_model_state(args.checkpoint)
    import mlflow

    before = mlflow.get_tracking_uri(), mlflow.get_registry_uri()
    uri = tracking_uri(args)
    mlflow.set_tracking_uri(uri)
    mlflow.set_registry_uri(uri)
    try:
        return load_model_state(args.checkpoint)
    finally:
        mlflow.set_tracking_uri(before[0])
        mlflow.set_registry_uri(before[1])


def tta_config(args, test_min_size: int, max_size: int):
    """The TTA settings of the command line (None without --tta / --tta-config)."""
    from pipeline.tta import TTAConfig

    if args.tta_config:
        text = args.tta_config
        if os.path.isfile(text):
            text = Path(text).read_text()
        try:
            d = json.loads(text)
        except json.JSONDecodeError as e:
            raise SystemExit(f"--tta-config is neither a JSON object nor a JSON file: {e}")
        return TTAConfig.from_dict(d)
    if args.tta:
        return TTAConfig().scaled_to(test_min_size, max_size)
    return None


def resolve_device(name: str | None) -> str:
    import torch

    if name:
        if name.startswith("cuda") and not torch.cuda.is_available():
            raise SystemExit(f"--device {name}: CUDA is not available on this machine")
        return name
    return "cuda" if torch.cuda.is_available() else "cpu"


def data_config_of(state: dict):
    """The DataConfig the checkpoint was trained with (paper defaults when it does not say)."""
    from pipeline.data import DataConfig

    train_config = state.get("train_config") or {}
    if train_config:
        from pipeline.train import TrainConfig

        try:
            return TrainConfig.from_dict(train_config).data_config()
        except (TypeError, ValueError) as e:
            print(f"warning: cannot rebuild the checkpoint's data config ({e}); using the paper's",
                  file=sys.stderr)
    return DataConfig()


def _print_metrics(metrics: dict, title: str) -> None:
    print(f"\n{title}")
    print(" ".join(f"{k:>6}" for k in METRIC_KEYS))
    print(" ".join(f"{metrics[k]:6.3f}" for k in METRIC_KEYS))
    per_cat = metrics.get("per_category", {})
    if per_cat:
        worst = sorted(per_cat.items(), key=lambda kv: kv[1])
        print(f"per category ({len(per_cat)}): best " + ", ".join(f"{n} {v:.3f}" for n, v in worst[::-1][:3])
              + "; worst " + ", ".join(f"{n} {v:.3f}" for n, v in worst[:3]))


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__)
    ap.add_argument("--results", help="score this COCO results file (needs --annotations)")
    ap.add_argument("--annotations", help="ground-truth instances json (or Parquet index)")
    ap.add_argument("--images", help="image folder of --annotations (checkpoint mode)")
    ap.add_argument("--data", help="data source: 'synthetic' or 'coco:/root' (default: the checkpoint's)")
    ap.add_argument("--split", default="val", choices=("train", "val"), help="split of --data")
    ap.add_argument("--backend", default=None, choices=("pycocotools", "faster"),
                    help="COCO evaluator (default: faster-coco-eval; identical metrics, bench/eval.py)")
    ap.add_argument("--save-results", help="also write the COCO results json here (checkpoint mode)")
    ap.add_argument("--json", action="store_true", help="print the metrics as JSON on the last line")
    add_model_arguments(ap)
    args = ap.parse_args(argv)

    if bool(args.results) == bool(args.checkpoint):
        ap.error("give exactly one of --results (score a file) or --checkpoint (run a model)")
    t0 = time.perf_counter()
    if args.results:
        if not args.annotations:
            ap.error("--results needs --annotations (the ground truth)")
        metrics = evaluate_coco(args.annotations, args.results, backend=args.backend)
        title = f"{args.results} vs {args.annotations}"
    else:
        metrics, title = _evaluate_checkpoint(args, ap)
    if not args.json:
        _print_metrics(metrics, f"{title} ({time.perf_counter() - t0:.1f} s)")
    else:
        print(json.dumps({k: metrics[k] for k in METRIC_KEYS}))
    return metrics


def _evaluate_checkpoint(args, ap) -> tuple[dict, str]:
    from pipeline.data import resolve_split
    from pipeline.evaluation import InferenceSpec, predict_sharded, write_results_json
    from pipeline.submission import cap_per_image

    state = load_checkpoint(args)
    data_cfg = data_config_of(state)
    if args.data:
        data_cfg = data_cfg.replace(source=args.data)
    if args.annotations or args.images:
        if not (args.annotations and args.images):
            ap.error("--annotations and --images go together in checkpoint mode")
        ann, images = args.annotations, args.images
    else:
        ann, images = resolve_split(data_cfg, args.split)
    test_min = args.test_min_size or data_cfg.test_min_size
    max_size = args.max_size or data_cfg.max_size
    tta = tta_config(args, test_min, max_size)
    spec = InferenceSpec(ann_file=str(ann), image_dir=str(images), test_min_size=test_min,
                         max_size=max_size, batch_size=args.batch_size, device=resolve_device(args.device),
                         amp=args.amp, tta=tta.to_dict() if tta else None, max_bad_fraction=0.0)
    results = cap_per_image(predict_sharded(state, spec, args.workers), args.max_dets)
    if args.save_results:
        write_results_json(results, args.save_results)
    metrics = evaluate_coco(ann, results, backend=args.backend)
    mode = f"TTA ({len(tta.passes())} passes)" if tta else f"single scale {test_min}/{max_size}"
    return metrics, f"{args.checkpoint} on {ann}, {mode}, {len(results)} detections"


if __name__ == "__main__":
    from pipeline.data import TooManyBadImagesError

    try:
        main()
    except (FileNotFoundError, ValueError, TooManyBadImagesError) as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
