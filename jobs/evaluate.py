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
800); ``--tta-config`` gives the settings explicitly (``"merge"``: ``soft-vote``, the paper's,
``vote`` or ``nms``, the official merges). Inference and scoring always run in fp32. ``--json``
prints the metrics as one JSON object (keys AP, AP50, AP75, APs, APm, APl) on the last line.

A results file (``--results``, or the detections of a checkpoint) follows the rules of a test-dev
submission (``pipeline.evaluation.results_problems``): exact keys, integer ids of the ground truth,
scores that are numbers in [0, 1], boxes with positive size inside their image; a bad file is
refused naming each detection and field. Ground truth may be an instances json or a
``.parquet``/``.arrow`` index (``jobs/build_index.py``); it needs at least one annotation.
"""
from __future__ import annotations

import json
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from pipeline import inference_cli as cli  # noqa: E402
from pipeline.evaluation import METRIC_KEYS, evaluate_coco, load_ground_truth, write_results_json  # noqa: E402


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
    ap = cli.job_parser(__doc__)
    ap.add_argument("--results", help="score this COCO results file (needs --annotations)")
    ap.add_argument("--annotations", help="ground-truth instances json (or .parquet/.arrow index)")
    ap.add_argument("--images", help="image folder of --annotations (checkpoint mode)")
    ap.add_argument("--data", help="data source: 'synthetic' or 'coco:/root' (default: the checkpoint's)")
    ap.add_argument("--split", default="val", choices=("train", "val"), help="split of --data")
    ap.add_argument("--backend", default=None, choices=("pycocotools", "faster"),
                    help="COCO evaluator (default: faster-coco-eval; identical metrics, bench/eval.py)")
    ap.add_argument("--save-results", help="also write the COCO results json here (checkpoint mode)")
    ap.add_argument("--json", action="store_true", help="print the metrics as JSON on the last line")
    cli.add_model_arguments(ap)
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
    from pipeline.inference import predict_sharded
    from pipeline.submission import cap_per_image

    state = cli.load_checkpoint(args.checkpoint, args.mlflow_uri)
    data_cfg = cli.data_config_of(state)
    if args.data:
        data_cfg = data_cfg.replace(source=args.data)
    if args.annotations or args.images:
        if not (args.annotations and args.images):
            ap.error("--annotations and --images go together in checkpoint mode")
        ann, images = args.annotations, args.images
    else:
        ann, images = resolve_split(data_cfg, args.split)
    spec, tta = cli.inference_spec(args, data_cfg, ann, images)
    gt = load_ground_truth(ann)  # a ground truth that cannot be scored fails before inference
    results = cap_per_image(predict_sharded(state, spec, args.workers), args.max_dets)
    if args.save_results:
        write_results_json(results, args.save_results)
    metrics = evaluate_coco(gt, results, backend=args.backend)
    mode = f"TTA ({len(tta.passes())} passes) merged by {tta.merge}" if tta else \
        f"single scale {spec.test_min_size}/{spec.max_size}"
    return metrics, f"{args.checkpoint} on {ann}, {mode}, {len(results)} detections"


if __name__ == "__main__":
    cli.run_job(main)
