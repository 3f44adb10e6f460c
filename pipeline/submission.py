"""COCO test-dev submissions: validate a results file, write it under the server's name, zip it,
log it to the MLflow run of the checkpoint.

The evaluation server takes a zip holding one ``detections_test-dev2017_<name>_results.json``: a
list of ``{"image_id", "category_id", "bbox": [x, y, w, h], "score"}`` in original image pixels
and original COCO category ids. One malformed upload costs a day, so everything is checked
locally first (:func:`validate_results`) and the written file is loaded back with pycocotools'
``COCO.loadRes`` before it is zipped.
"""
from __future__ import annotations

import contextlib
import io
import json
import os
import re
import zipfile
from collections import Counter, defaultdict
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from pipeline.data.index import INDEX_SUFFIXES, read_index
from pipeline.evaluation import ResultsError, load_json, results_problems, write_results_json

DEFAULT_MAX_PER_IMAGE = 100  # the server scores the top 100 per image; it is also its upload limit
_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]*$")


class SubmissionError(ResultsError):
    """A results file the server would reject or misread; ``problems`` lists every finding."""


def submission_filename(name: str, split: str = "test-dev2017") -> str:
    """``detections_<split>_<name>_results.json``, the name the COCO server requires."""
    if not isinstance(name, str) or not _NAME.match(name):
        raise ValueError(f"submission name {name!r} must be letters, digits, '_', '-' or '.' "
                         "(it becomes part of the file name the server parses)")
    return f"detections_{split}_{name}_results.json"


def load_image_info(image_info) -> dict:
    """An image-info (or instances) json, ``.parquet``/``.arrow`` index or dict, checked for
    ``images`` (with ``id``, ``width``, ``height``) and ``categories``."""
    if isinstance(image_info, (str, os.PathLike)):
        source = str(image_info)
        data = (read_index(image_info).to_coco_dict() if Path(image_info).suffix in INDEX_SUFFIXES
                else load_json(image_info, "image-info file"))
    else:
        source, data = "image info", image_info
    if not isinstance(data, Mapping) or not isinstance(data.get("images"), list) \
            or not isinstance(data.get("categories"), list):
        raise ValueError(f"{source}: not a COCO image-info file (needs 'images' and 'categories' lists)")
    for i, img in enumerate(data["images"]):
        for key in ("id", "width", "height"):
            if not isinstance(img, Mapping) or key not in img:
                raise ValueError(f"{source}: image entry {i} lacks '{key}'")
    for i, cat in enumerate(data["categories"]):
        if not isinstance(cat, Mapping) or "id" not in cat:
            raise ValueError(f"{source}: category entry {i} lacks 'id'")
    return data


def cap_per_image(results: Sequence[Mapping], max_per_image: int = DEFAULT_MAX_PER_IMAGE) -> list[dict]:
    """Keep each image's ``max_per_image`` highest-scoring detections (stable for equal scores)."""
    by_image: dict = defaultdict(list)
    for det in results:
        by_image[det["image_id"]].append(det)
    out = []
    for dets in by_image.values():
        out.extend(sorted(dets, key=lambda d: -float(d["score"]))[:max_per_image])
    return out


def validate_results(results, image_info, max_per_image: int = DEFAULT_MAX_PER_IMAGE,
                     require_all_images: bool = True, source: str = "results") -> None:
    """Raise :class:`SubmissionError` naming the image and the field of every problem.

    Every detection follows the same rules as a results file scored by ``jobs/evaluate.py``
    (:func:`pipeline.evaluation.results_problems`: exact keys, integer ids known to the image-info
    file, score a finite number in [0, 1], bbox four finite numbers with positive size inside the
    image); on top, a submission has at most ``max_per_image`` detections per image and
    (``require_all_images``) at least one on every image.
    """
    info = load_image_info(image_info)
    images = {img["id"]: img for img in info["images"]}
    cat_ids = {c["id"] for c in info["categories"]}
    problems = results_problems(results, images, cat_ids, reference="image-info file")
    if not isinstance(results, list):
        raise SubmissionError(problems, source)
    per_image: Counter = Counter(
        d["image_id"] for d in results
        if isinstance(d, Mapping) and type(d.get("image_id")) is int and d["image_id"] in images)
    for image_id, n in sorted(per_image.items()):
        if n > max_per_image:
            problems.append(f"image {image_id}: {n} detections, more than the cap of {max_per_image}")
    if require_all_images:
        for image_id, img in images.items():
            if per_image[image_id] == 0:
                problems.append(f"image {image_id} ({img.get('file_name', '?')}): no detection "
                                "(every image of the image-info file must be covered)")
    if problems:
        raise SubmissionError(problems, source)


def check_loadres(path: str | os.PathLike, image_info) -> int:
    """Load ``path`` with pycocotools ``COCO.loadRes`` against the image-info file, as the server
    does; returns the number of detections read. Raises :class:`SubmissionError` on failure."""
    from pycocotools.coco import COCO

    info = load_image_info(image_info)
    gt = COCO()
    gt.dataset = {"images": info["images"], "categories": info["categories"], "annotations": []}
    with contextlib.redirect_stdout(io.StringIO()):
        gt.createIndex()
        try:
            res = gt.loadRes(str(path))
        except Exception as e:  # pycocotools asserts without saying which detection is wrong
            raise SubmissionError([f"pycocotools COCO.loadRes failed: {type(e).__name__}: {e}"],
                                  str(path)) from e
    return len(res.anns)


def write_submission(results: Sequence[Mapping], image_info, out_dir: str | os.PathLike, name: str,
                     max_per_image: int = DEFAULT_MAX_PER_IMAGE, require_all_images: bool = True,
                     split: str = "test-dev2017") -> tuple[Path, Path]:
    """Validate ``results``, write ``detections_<split>_<name>_results.json`` and its zip.

    Nothing is written when validation fails; files are written to temporary names and renamed,
    so an existing submission is only replaced by a complete, validated one.
    Returns ``(json path, zip path)``.
    """
    fname = submission_filename(name, split)
    info = load_image_info(image_info)
    results = [dict(d) for d in results]
    validate_results(results, info, max_per_image, require_all_images)
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    json_path = out_dir / fname
    zip_path = out_dir / (fname[: -len(".json")] + ".zip")
    tmp_json = out_dir / (fname + ".partial")
    write_results_json(results, tmp_json)
    try:
        n = check_loadres(tmp_json, info)
        if n != len(results):
            raise SubmissionError([f"COCO.loadRes read {n} detections, {len(results)} were written"],
                                  str(tmp_json))
        tmp_zip = zip_path.with_name(zip_path.name + ".partial")
        with zipfile.ZipFile(tmp_zip, "w", compression=zipfile.ZIP_DEFLATED) as zf:
            zf.write(tmp_json, arcname=fname)  # the server wants the json at the archive's top
        os.replace(tmp_json, json_path)
        os.replace(tmp_zip, zip_path)
    finally:
        for tmp in (tmp_json, zip_path.with_name(zip_path.name + ".partial")):
            if tmp.exists():
                tmp.unlink()
    return json_path, zip_path


def read_submission(path: str | os.PathLike) -> tuple[list, str]:
    """Results list of a submission ``.json`` or ``.zip`` (which must hold exactly one json)."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"submission file not found: {path}")
    if path.suffix == ".zip":
        try:
            with zipfile.ZipFile(path) as zf:
                names = [n for n in zf.namelist() if not n.endswith("/")]
                if len(names) != 1 or "/" in names[0] or not names[0].endswith(".json"):
                    raise SubmissionError([f"the zip must hold exactly one .json at its top level, "
                                           f"holds {names}"], str(path))
                data = zf.read(names[0])
        except (zipfile.BadZipFile, OSError, EOFError) as e:  # truncated or not a zip at all
            raise SubmissionError([f"not a readable zip archive ({type(e).__name__}: {e})"], str(path)) from None
        try:
            return json.loads(data), names[0]
        except json.JSONDecodeError as e:
            raise SubmissionError([f"{names[0]} is not valid JSON: {e}"], str(path)) from None
        except UnicodeDecodeError as e:
            raise SubmissionError([f"{names[0]} is not valid JSON: not UTF-8 text ({e.reason} at byte "
                                   f"{e.start})"], str(path)) from None
    return load_json(path, "submission file"), path.name


def validate_submission_file(path: str | os.PathLike, image_info,
                             max_per_image: int = DEFAULT_MAX_PER_IMAGE,
                             require_all_images: bool = True) -> int:
    """Check a written submission (``.json`` or ``.zip``) before upload; returns its detection
    count. The file name must follow the server's pattern, and the content passes
    :func:`validate_results` and ``COCO.loadRes``."""
    results, inner = read_submission(path)
    if not re.match(r"^detections_[a-z0-9-]+_[A-Za-z0-9][A-Za-z0-9_.-]*_results\.json$", inner):
        raise SubmissionError([f"file name {inner!r} does not follow "
                               "detections_<split>_<name>_results.json"], str(path))
    validate_results(results, image_info, max_per_image, require_all_images, source=str(path))
    if Path(path).suffix == ".zip":
        import tempfile

        with tempfile.TemporaryDirectory() as tmp:
            p = Path(tmp) / inner
            p.write_text(json.dumps(results))
            return check_loadres(p, image_info)
    return check_loadres(path, image_info)


# ----------------------------------------------------------------------------------------------
# MLflow: which run a checkpoint came from, and logging the submission there
# ----------------------------------------------------------------------------------------------
def source_run_id(checkpoint: str, state: dict, tracking_uri: str) -> str | None:
    """The MLflow run a checkpoint came from: ``runs:/<id>/...``, a registered model version's
    run, or the run id a training run stored in the checkpoint (``extra.mlflow_run_id``)."""
    if checkpoint.startswith("runs:/"):
        rest = checkpoint[len("runs:/"):]
        run_id = rest.split("/", 1)[0]
        if not run_id:
            raise ValueError(f"{checkpoint}: no run id after runs:/")
        return run_id
    if checkpoint.startswith("models:/"):
        from mlflow import MlflowClient

        # the registry lives in the same store (MLflow would otherwise open ./mlflow.db)
        client = MlflowClient(tracking_uri, registry_uri=tracking_uri)
        ref = checkpoint[len("models:/"):].strip("/")
        if "@" in ref:
            name, alias = ref.split("@", 1)
            return client.get_model_version_by_alias(name, alias).run_id
        name, _, version = ref.rpartition("/")
        if not name:
            raise ValueError(f"{checkpoint}: expected models:/<name>/<version> or models:/<name>@<alias>")
        if version == "latest":
            versions = client.search_model_versions(f"name = '{name}'")
            if not versions:
                raise ValueError(f"{checkpoint}: registered model {name!r} has no versions")
            return max(versions, key=lambda v: int(v.version)).run_id
        return client.get_model_version(name, version).run_id
    return (state.get("extra") or {}).get("mlflow_run_id") or None


def log_submission(paths: Sequence[str | os.PathLike], checkpoint: str, state: dict, tracking_uri: str,
                   experiment: str, run_id: str | None, name: str, summary: Mapping[str, Any]) -> str:
    """Log the submission files (``testdev/``) and ``summary`` tags (``testdev.<name>.<key>``) to the
    checkpoint's run (or ``run_id``), else to a new run linked to the checkpoint by tags; returns
    the run id used.

    An existing run only gains artifacts and tags: its status is its training's (a FAILED run stays
    FAILED). A new run goes through the one run lifecycle, :func:`pipeline.tracking.run_lifecycle`.
    """
    from mlflow import MlflowClient

    from pipeline import tracking

    def log(client: MlflowClient, rid: str) -> None:
        for p in paths:
            client.log_artifact(rid, str(p), artifact_path="testdev")
        for key, value in summary.items():
            client.set_tag(rid, f"testdev.{name}.{key}", str(value))

    client = MlflowClient(tracking_uri)
    run_id = run_id or source_run_id(checkpoint, state, tracking_uri)
    if run_id:
        client.get_run(run_id)  # fails clearly when the run is not in this tracking store
        log(client, run_id)
        return run_id
    config = tracking.TrackingConfig(tracking_uri, experiment,
                                     tags={"atss.job": "testdev", "atss.checkpoint": checkpoint})
    with tracking.run_lifecycle(config, f"testdev-{name}") as run:
        log(client, run.run_id)
    return run.run_id
