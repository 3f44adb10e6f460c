"""COCO test-dev submission: run a trained detector over the test-dev images, validate, zip, log.

    python jobs/testdev.py --checkpoint runs:/<run id>/model --data coco:/data/coco --name atss_r50 --workers 8
    python jobs/testdev.py --checkpoint CKPT_DIR --image-info image_info_test-dev2017.json \
        --images test2017/ --name atss_x101_tta --tta --device cuda --workers 0
    python jobs/testdev.py --validate out/detections_test-dev2017_atss_r50_results.zip \
        --image-info image_info_test-dev2017.json     # check an existing file before uploading

Writes ``<out>/detections_test-dev2017_<name>_results.json`` (image_id, original COCO
category_id, bbox [x, y, w, h] in original pixels, score) and the ``.zip`` the server expects,
after checking that every image is covered, every category exists, at most ``--max-dets``
detections per image, scores are finite in [0, 1], boxes lie inside their image with positive
size, and that pycocotools ``COCO.loadRes`` reads the file. A failed check names the image and
the field, and nothing is written.

Both files are logged as artifacts (``testdev/``) of the MLflow run that produced the checkpoint
(the run of a ``runs:/`` or ``models:/`` URI, the run id recorded in a local checkpoint, or
``--run-id``); otherwise of a new run tagged with the checkpoint path. ``--no-mlflow`` skips this.
Images are sharded over ``--workers`` Ray tasks; ``--workers 0`` runs in this process. Inference
always runs in fp32. ``--validate`` holds a file to the same per-detection rules as
``jobs/evaluate.py --results`` (``pipeline.evaluation.results_problems``), plus coverage of every
image and the per-image cap.
"""
from __future__ import annotations

import json
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from pipeline import inference_cli as cli  # noqa: E402


def main(argv=None) -> dict:
    from pipeline.submission import DEFAULT_MAX_PER_IMAGE

    ap = cli.job_parser(__doc__)
    ap.add_argument("--image-info", help="image-info json (image_info_test-dev2017.json)")
    ap.add_argument("--images", help="its image folder (test2017/)")
    ap.add_argument("--data", help="'coco:/root' instead of --image-info/--images "
                                   "(root/annotations/image_info_test-dev2017.json, root/test2017)")
    ap.add_argument("--name", default="atss", help="the <name> in detections_test-dev2017_<name>_results.json")
    ap.add_argument("--out", default="submissions", help="output folder")
    ap.add_argument("--allow-missing-images", action="store_true",
                    help="accept images without any detection (otherwise a failed check)")
    ap.add_argument("--validate", metavar="FILE", help="only validate an existing .json/.zip submission")
    ap.add_argument("--experiment", default=None, help="experiment of a new run (default: atss)")
    ap.add_argument("--run-id", default=None, help="log into this MLflow run")
    ap.add_argument("--no-mlflow", action="store_true", help="do not log to MLflow")
    ap.add_argument("--json", action="store_true", help="print a JSON summary on the last line")
    cli.add_model_arguments(ap, max_dets=DEFAULT_MAX_PER_IMAGE)
    args = ap.parse_args(argv)

    if args.validate:
        return _validate_only(args, ap)
    if not args.checkpoint:
        ap.error("--checkpoint is required (or --validate FILE)")
    return _run(args, ap)


def _image_info(args, ap, data_cfg=None) -> tuple[str, str]:
    from pipeline.data import resolve_split

    if args.image_info or args.images:
        if not args.image_info:
            ap.error("--images needs --image-info")
        return args.image_info, args.images
    if args.data:
        return resolve_split(data_cfg.replace(source=args.data, test_ann=None, test_images=None), "test")
    ap.error("give --image-info and --images, or --data coco:/root")


def _validate_only(args, ap) -> dict:
    from pipeline.data import DataConfig
    from pipeline.submission import validate_submission_file

    info, _ = _image_info(args, ap, DataConfig())
    n = validate_submission_file(args.validate, info, args.max_dets,
                                 require_all_images=not args.allow_missing_images)
    summary = {"file": str(args.validate), "detections": n, "valid": True}
    print(f"{args.validate}: valid, {n} detections")
    if args.json:
        print(json.dumps(summary))
    return summary


def _run(args, ap) -> dict:
    from pipeline import tracking
    from pipeline.inference import predict_sharded
    from pipeline.submission import (cap_per_image, load_image_info, log_submission, submission_filename,
                                     write_submission)

    submission_filename(args.name)  # a bad name fails before any inference
    t0 = time.perf_counter()
    uri = None if args.no_mlflow else cli.tracking_uri(args.mlflow_uri)
    state = cli.load_checkpoint(args.checkpoint, args.mlflow_uri)
    data_cfg = cli.data_config_of(state)
    info_path, images = _image_info(args, ap, data_cfg)
    if not images:
        ap.error("--image-info needs --images (the image folder)")
    info = load_image_info(info_path)
    spec, tta = cli.inference_spec(args, data_cfg, info_path, images)
    results = predict_sharded(state, spec, args.workers)
    results = cap_per_image(results, args.max_dets)
    t_infer = time.perf_counter() - t0
    json_path, zip_path = write_submission(results, info, args.out, args.name, args.max_dets,
                                           require_all_images=not args.allow_missing_images)
    summary = {"json": str(json_path), "zip": str(zip_path), "images": len(info["images"]),
               "detections": len(results), "tta": bool(tta), "inference_s": round(t_infer, 2),
               "run_id": None}
    if uri is not None:
        summary["run_id"] = log_submission(
            (json_path, zip_path), args.checkpoint, state, uri, args.experiment or tracking.DEFAULT_EXPERIMENT,
            args.run_id, args.name, {"detections": len(results), "tta": bool(tta)})
        summary["tracking_uri"] = uri
    print(f"{json_path.name}: {summary['detections']} detections on {summary['images']} images "
          f"({'TTA' if tta else 'single scale'}, {t_infer:.1f} s); zip: {zip_path}"
          + (f"; logged to MLflow run {summary['run_id']}" if summary["run_id"] else ""))
    if args.json:
        print(json.dumps(summary))
    return summary


if __name__ == "__main__":
    cli.run_job(main)
