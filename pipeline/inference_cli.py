"""The command line of running a trained model (``jobs/evaluate.py``, ``jobs/testdev.py``): the
shared options, and the one place where they become objects (checkpoint state, device, TTA
settings, :class:`pipeline.inference.InferenceSpec`). Every bad value is refused here, before any
inference runs, with a message naming the option, the value and what is allowed.

Both jobs end through :func:`run_job` (:func:`pipeline.cli.run_main`): exit 0 success, 2 bad input
(one line naming the option, file or record), 1 internal failure (with its traceback).
"""
from __future__ import annotations

import argparse
import json
import re
import sys
from collections.abc import Callable, Sequence
from pathlib import Path

import torch

from pipeline.checkpoint import is_mlflow_uri
from pipeline.cli import UsageError, add_exit_codes, call_main, run_main
from pipeline.data import DataConfig, TooManyBadImagesError
from pipeline.inference import InferenceSpec, load_model_state
from pipeline.tracking import absolute_tracking_uri, default_tracking_uri
from pipeline.tta import TTAConfig

# The bad input of these jobs besides FieldError / UsageError: missing files and folders, values
# and records that cannot be used (annotation, results and submission errors are ValueErrors),
# unreadable images.
BAD_INPUT_ERRORS = (FileNotFoundError, NotADirectoryError, IsADirectoryError, PermissionError, ValueError,
                    TooManyBadImagesError)
BAD_INPUT_HANDLED = """bad input handled (exit 2): missing or unreadable checkpoint, annotation, image-info,
results or submission files (corrupt .zip, invalid JSON, non-UTF-8); MLflow model URIs that do not
exist; a plain path as --mlflow-uri; weights that do not match their detector config; results that
break the rules (field, type, range: each detection named); ground truth without annotations;
--max-dets/--batch-size/--test-min-size/--max-size < 1, --workers < 0, a bad --tta-config,
--device other than cpu/cuda/cuda:N or cuda without a GPU; unreadable images."""
_URI_SCHEME = re.compile(r"^[A-Za-z][A-Za-z0-9+.-]*:")


def _bad(option: str, value, allowed: str, detail: str = "") -> UsageError:
    return UsageError(f"{option} {value!r}: {detail + '; ' if detail else ''}allowed: {allowed}")


def int_at_least(lo: int) -> Callable[[str], int]:
    """argparse ``type`` of an integer option that must be >= ``lo`` (``--max-dets``: 1, ``--workers``: 0)."""
    def parse(text: str) -> int:
        try:
            v = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r} is not an integer (allowed: an integer >= {lo})") from None
        if v < lo:
            raise argparse.ArgumentTypeError(f"{v} is not allowed (allowed: an integer >= {lo})")
        return v

    return parse


def job_parser(doc: str) -> argparse.ArgumentParser:
    """The parser of a job whose module docstring is ``doc``: its first paragraph as description,
    the whole as the ``--help`` epilogue, followed by the exit codes and the bad input handled."""
    ap = argparse.ArgumentParser(description=doc.split("\n\n")[0], epilog=doc,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    return add_exit_codes(ap, extra=BAD_INPUT_HANDLED)


def add_model_arguments(ap: argparse.ArgumentParser, max_dets: int = 100) -> None:
    """How to run the model: the options both jobs share."""
    ap.add_argument("--checkpoint", help="checkpoint directory, its state.pt, or an MLflow model URI "
                                         "(runs:/<run id>/model, models:/<name>/<version>)")
    ap.add_argument("--workers", type=int_at_least(0), default=0,
                    help="Ray tasks to shard the images over (0: in this process, no Ray)")
    ap.add_argument("--device", default=None, help="cpu, cuda or cuda:N (default: cuda when available)")
    ap.add_argument("--batch-size", type=int_at_least(1), default=2, help="images per forward pass")
    ap.add_argument("--test-min-size", type=int_at_least(1), default=None,
                    help="shorter side at test time (default: the data config's, paper 800)")
    ap.add_argument("--max-size", type=int_at_least(1), default=None, help="longer-side cap (default: paper 1333)")
    ap.add_argument("--tta", action="store_true", help="multi-scale + flip testing (ATSS.md section 4)")
    ap.add_argument("--tta-config", default=None,
                    help="TTAConfig as JSON or a JSON file (implies --tta), e.g. "
                         "'{\"merge\": \"vote\", \"scales\": [400, 1200], \"scale_ranges\": [[96, null], [0, 256]]}'; "
                         "merge: soft-vote (paper) | vote | nms")
    ap.add_argument("--max-dets", type=int_at_least(1), default=max_dets,
                    help=f"detections kept per image (default {max_dets}; the COCO server's limit is 100, "
                         "TTA yields up to 1000)")
    ap.add_argument("--mlflow-uri", default=None,
                    help="tracking URI (sqlite:///path/mlflow.db, http://host:port) for MLflow model URIs "
                         "(and logging); default: MLFLOW_TRACKING_URI or sqlite:///<cwd>/mlflow.db")


def tracking_uri(mlflow_uri: str | None) -> str:
    """``--mlflow-uri`` (made absolute), else ``MLFLOW_TRACKING_URI``, else ``sqlite:///<cwd>/mlflow.db``.
    A plain path is refused: it names no backend (MLflow would take it for a file store)."""
    if not mlflow_uri:
        return default_tracking_uri()
    if mlflow_uri != "databricks" and not _URI_SCHEME.match(mlflow_uri):
        raise _bad("--mlflow-uri", mlflow_uri, "a tracking URI such as sqlite:///<path>/mlflow.db, "
                        "http://<host>:<port> or databricks",
                        f"a plain path is not a tracking URI (for an sqlite store there: "
                        f"sqlite:///{Path(mlflow_uri).resolve()})")
    return absolute_tracking_uri(mlflow_uri)


def load_checkpoint(checkpoint: str, mlflow_uri: str | None) -> dict:
    """:func:`pipeline.inference.load_model_state` of ``--checkpoint``; ``runs:/`` and ``models:/``
    URIs resolve in the ``--mlflow-uri`` store."""
    uri = tracking_uri(mlflow_uri) if is_mlflow_uri(checkpoint) else None
    return load_model_state(checkpoint, tracking_uri=uri)


def resolve_device(name: str | None) -> str:
    """``--device``: cpu, cuda or cuda:N (a GPU must be present); default cuda when available."""
    if name is None:
        return "cuda" if torch.cuda.is_available() else "cpu"
    allowed = "cpu, cuda or cuda:N"
    if not re.fullmatch(r"cpu|cuda(:\d+)?", name):
        raise _bad("--device", name, allowed)
    if name.startswith("cuda"):
        if not torch.cuda.is_available():
            raise _bad("--device", name, "cpu", "CUDA is not available on this machine")
        index = int(name.split(":")[1]) if ":" in name else 0
        if index >= torch.cuda.device_count():
            raise _bad("--device", name, f"cuda:0 .. cuda:{torch.cuda.device_count() - 1}")
    return name


def tta_config(tta: bool, tta_config_text: str | None, test_min_size: int, max_size: int) -> TTAConfig | None:
    """The TTA settings of the command line (None without ``--tta`` / ``--tta-config``)."""
    if tta_config_text:
        text = tta_config_text
        path = Path(text)
        if not text.lstrip().startswith("{") and path.is_file():
            try:
                text = path.read_text(encoding="utf-8")
            except (OSError, UnicodeDecodeError) as e:
                raise _bad("--tta-config", tta_config_text, "a JSON object or a JSON file",
                                f"cannot read the file ({e})") from None
        try:
            d = json.loads(text)
        except json.JSONDecodeError as e:
            raise _bad("--tta-config", tta_config_text, "a JSON object or a JSON file",
                            f"neither valid JSON nor an existing file ({e})") from None
        try:
            return TTAConfig.from_dict(d)
        except ValueError as e:
            raise ValueError(f"--tta-config: {e}") from None
    if tta:
        return TTAConfig().scaled_to(test_min_size, max_size)
    return None


def data_config_of(state: dict) -> DataConfig:
    """The DataConfig the checkpoint was trained with (paper defaults when it does not say)."""
    data = (state.get("train_config") or {}).get("data")
    if data:
        try:
            return DataConfig.from_dict(dict(data))
        except (TypeError, ValueError) as e:
            print(f"warning: cannot rebuild the checkpoint's data config ({e}); using the paper's",
                  file=sys.stderr)
    return DataConfig()


def inference_spec(args: argparse.Namespace, data_cfg: DataConfig, ann_file, image_dir) -> tuple[InferenceSpec, TTAConfig | None]:
    """The :class:`InferenceSpec` (and TTA settings) of the command line for one split."""
    test_min = args.test_min_size or data_cfg.test_min_size
    max_size = args.max_size or data_cfg.max_size
    tta = tta_config(args.tta, args.tta_config, test_min, max_size)
    spec = InferenceSpec(ann_file=str(ann_file), image_dir=str(image_dir), test_min_size=test_min,
                         max_size=max_size, batch_size=args.batch_size, device=resolve_device(args.device),
                         tta=tta.to_dict() if tta else None, max_bad_fraction=0.0)
    return spec, tta


def run_job(main: Callable[[Sequence[str] | None], object], argv: Sequence[str] | None = None) -> None:
    """End a job: :func:`pipeline.cli.run_main` with this module's bad-input classes (``main``'s
    return value is for Python callers; the exit code is 0)."""
    run_main(lambda a: (main(a), None)[1], argv, errors=BAD_INPUT_ERRORS)


def exit_code(main: Callable[[Sequence[str] | None], object], argv: Sequence[str] | None = None) -> int:
    """The exit code :func:`run_job` would end with (messages go to stderr as there)."""
    return call_main(lambda a: (main(a), None)[1], argv, errors=BAD_INPUT_ERRORS)
