"""Field validation (detector.fields) and the job edge (pipeline.cli): every bad value is an error
naming the field (and the option it came from), the value and what is allowed; exit codes 0/1/2."""
from __future__ import annotations

import pickle
import sys

import pytest

from detector import DetectorConfig, get_preset
from detector.fields import FieldError, UnknownFieldError, coerce_fields, describe, parse_assignments, parse_value
from pipeline.cli import EXIT_BAD_INPUT, EXIT_FAILURE, EXIT_OK, UsageError, add_exit_codes, bad_input, call_main
from pipeline.data import DataConfig
from pipeline.training import build_train_config


# ---------------------------------------------------------------------------------------------
# DetectorConfig: types as well as ranges
# ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("text, message", [
    ("topk=2.5", "--detector topk=2.5: DetectorConfig.topk expects an int >= 1"),
    ("topk=abc", "--detector topk=abc: DetectorConfig.topk expects an int >= 1"),
    ("topk=true", "--detector topk=true: DetectorConfig.topk expects an int >= 1"),
    ("topk=-3", "--detector topk=-3: DetectorConfig.topk expects an int >= 1"),
    ("aspect_ratios=abc", "--detector aspect_ratios=abc: DetectorConfig.aspect_ratios expects a non-empty list "
                          "of numbers, each > 0"),
    ("aspect_ratios=1:0", "aspect_ratios=1:0: DetectorConfig.aspect_ratios expects"),
    ("backbone=resnet152", "DetectorConfig.backbone expects one of 'resnet18'"),
    ("frozen_bn=maybe", "DetectorConfig.frozen_bn expects true or false"),
    ("bbox_reg_weights=1,2", "DetectorConfig.bbox_reg_weights expects a list of 4 numbers, each > 0"),
    ("score_thresh=nan", "DetectorConfig.score_thresh expects a number in [0, 1)"),
    ("topK=5", "--detector topK=5: DetectorConfig has no field 'topK'; known fields: backbone"),
    ("topk", "--detector 'topk': expected KEY=VALUE with KEY a field of DetectorConfig"),
])
def test_detector_options_are_parsed_as_the_fields_type(text, message):
    with pytest.raises(FieldError) as e:
        parse_assignments(DetectorConfig, [text], "--detector")
    assert message in str(e.value)


def test_detector_options_give_typed_values():
    got = parse_assignments(DetectorConfig, ["topk=5", "aspect_ratios=1:2,1:1,2:1", "frozen_bn=no",
                                             "dcn_stages=[4, 5]", "anchor_scale=4", "pretrained_path=/w.pth"],
                            "--detector")
    assert got == {"topk": 5, "aspect_ratios": (0.5, 1.0, 2.0), "frozen_bn": False, "dcn_stages": (4, 5),
                   "anchor_scale": 4.0, "pretrained_path": "/w.pth"}
    assert type(got["anchor_scale"]) is float
    assert get_preset("tiny", **got).topk == 5
    assert parse_assignments(DetectorConfig, ["k=7"], "--set", aliases={"k": "topk"}) == {"topk": 7}


@pytest.mark.parametrize("changes, message", [
    (dict(topk=2.5), "DetectorConfig.topk=2.5: expected an int >= 1, got a float"),
    (dict(topk=True), "DetectorConfig.topk=True: expected an int >= 1, got a bool"),
    (dict(topk="9"), "DetectorConfig.topk='9': expected an int >= 1, got a string"),
    (dict(topk=0), "DetectorConfig.topk=0: expected an int >= 1"),
    (dict(anchor_scale=float("inf")), "DetectorConfig.anchor_scale=inf: expected a number > 0, got a non-finite"),
    (dict(frozen_bn=1), "DetectorConfig.frozen_bn=1: expected true or false, got an int"),
    (dict(aspect_ratios="abc"), "DetectorConfig.aspect_ratios='abc': expected a non-empty list of numbers"),
    (dict(aspect_ratios=(1.0, -2.0)), "DetectorConfig.aspect_ratios=(1.0, -2.0): expected a non-empty list"),
    (dict(dcn_stages=(2,)), "DetectorConfig.dcn_stages=(2,): expected a list of ints whose items are each one of 3"),
    (dict(pretrained_path=3), "DetectorConfig.pretrained_path=3: expected a string, got an int"),
])
def test_detector_config_checks_types_and_ranges(changes, message):
    with pytest.raises(FieldError, match=message.replace("(", r"\(").replace(")", r"\)").replace("[", r"\[")):
        DetectorConfig().replace(**changes)


def test_values_are_normalised():
    cfg = DetectorConfig(aspect_ratios=[1, 2], anchor_scale=4, bbox_reg_weights=[10, 10, 5, 5], dcn_stages=[5, 4],
                         frozen_stages=1, topk=__import__("numpy").int64(7))
    assert cfg.aspect_ratios == (1.0, 2.0) and type(cfg.anchor_scale) is float
    assert cfg.bbox_reg_weights == (10.0, 10.0, 5.0, 5.0) and cfg.dcn_stages == (4, 5)
    assert type(cfg.topk) is int and cfg == DetectorConfig.from_dict(cfg.to_dict())
    assert DetectorConfig(aspect_ratios=2.0).aspect_ratios == (2.0,)


def test_field_errors_survive_pickling():
    with pytest.raises(FieldError) as e:
        parse_assignments(DetectorConfig, ["topk=abc"], "--detector")
    again = pickle.loads(pickle.dumps(e.value))
    assert type(again) is FieldError and str(again) == str(e.value) and again.field == "topk"
    with pytest.raises(UnknownFieldError) as e:
        DetectorConfig.from_dict({"bogus": 1, "x": 2})
    assert "DetectorConfig has no fields 'bogus', 'x'" in str(pickle.loads(pickle.dumps(e.value)))


# ---------------------------------------------------------------------------------------------
# DataConfig and the training settings
# ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("text, message", [
    ("num_workers=-1", "--data-opt num_workers=-1: DataConfig.num_workers expects an int >= 0"),
    ("num_workers=1.5", "DataConfig.num_workers expects an int >= 0"),
    ("flip_prob=abc", "DataConfig.flip_prob expects a number in [0, 1]"),
    ("train_min_size=640,800,900", "DataConfig.train_min_size expects an int or a list of 2 ints > 0"),
    ("train_min_size=800,640", "DataConfig.train_min_size=(800, 640): expected an int or an inclusive (lo, hi)"),
    ("synthetic_num_classes=9", "DataConfig.synthetic_num_classes expects an int in [1, 8]"),
    ("source=s3", "--data-opt source=s3: DataConfig.source expects 'synthetic', 'coco:/path/to/root'"),
    ("source=coco:", "DataConfig.source expects 'synthetic', 'coco:/path/to/root' (a root directory after"),
    ("min_size=800", "DataConfig has no field 'min_size'"),
])
def test_data_options(text, message):
    with pytest.raises(FieldError) as e:
        DataConfig().replace(**parse_assignments(DataConfig, [text], "--data-opt"))
    assert message in str(e.value)


def test_data_config_values():
    got = parse_assignments(DataConfig, ["train_min_size=[640, 800]", "cache_dir=null", "num_workers=0"], "--data-opt")
    assert got == {"train_min_size": (640, 800), "cache_dir": None, "num_workers": 0}
    # JSON-style quotes around a string are not part of it (json.dumps(path) as a value)
    assert parse_assignments(DataConfig, ['cache_dir="/tmp/a b"', "train_ann='/x.json'"], "--data-opt") == {
        "cache_dir": "/tmp/a b", "train_ann": "/x.json"}
    assert DataConfig(train_min_size=[640, 800]).train_min_size == (640, 800)
    assert DataConfig(synthetic_image_size=128).synthetic_image_size == (128, 128)
    for bad, message in [(dict(num_workers=-1), "DataConfig.num_workers=-1: expected an int >= 0"),
                         (dict(train_min_size=True), "DataConfig.train_min_size=True: expected an int or"),
                         (dict(max_size=1333.0), "DataConfig.max_size=1333.0: expected an int > 0, got a float")]:
        with pytest.raises(FieldError) as e:
            DataConfig(**bad)
        assert message in str(e.value)


def test_training_settings_from_the_command_line(tmp_path):
    with pytest.raises(FieldError) as e:
        parse_assignments(build_train_config, ["lr_steps=a,b"], "--train-set")
    assert "--train-set lr_steps=a,b: build_train_config.lr_steps expects a list of ints or None" in str(e.value)
    with pytest.raises(UnknownFieldError) as e:  # was a TypeError traceback
        parse_assignments(build_train_config, ["learning_rate=0.1"], "--train-set")
    assert "has no field 'learning_rate'; known fields: preset, detector, data" in str(e.value)
    assert parse_assignments(build_train_config, ["lr_steps=100,200", "iterations=300", "amp=none", "base_lr=1e-3"],
                             "--train-set") == {"lr_steps": [100, 200], "iterations": 300, "amp": None,
                                                "base_lr": 0.001}
    # YAML reads 1e-3 as a string: a config file's values are parsed as their field's type
    assert coerce_fields(DataConfig, {"flip_prob": "0.25", "train_min_size": [640, 800]}) == {
        "flip_prob": 0.25, "train_min_size": (640, 800)}
    with pytest.raises(FieldError, match="--config num_workers='two': DataConfig.num_workers expects an int >= 0"):
        coerce_fields(DataConfig, {"num_workers": "two"}, option="--config")


@pytest.mark.parametrize("kwargs, message", [
    (dict(batch_size=2.5), "TrainConfig.batch_size=2.5: expected an int >= 1, got a float"),
    (dict(seed=True), "TrainConfig.seed=True: expected an int >= 0, got a bool"),
    (dict(amp="fp16"), "TrainConfig.amp='fp16': expected one of None, 'bf16'"),
    (dict(eval_backend="fast"), "TrainConfig.eval_backend='fast': expected one of None, 'pycocotools', 'faster'"),
    (dict(detector={"topk": 2.5}), "TrainConfig.detector: DetectorConfig.topk=2.5: expected an int >= 1"),
    (dict(detector={"topkk": 9}), "TrainConfig.detector: DetectorConfig has no field 'topkk'"),
    (dict(data={"num_workers": -1}), "TrainConfig.data: DataConfig.num_workers=-1: expected an int >= 0"),
    (dict(detector={"num_classes": "abc"}), "DetectorConfig.num_classes='abc': expected an int >= 1"),
])
def test_train_config_fields(kwargs, message):
    with pytest.raises(FieldError) as e:
        build_train_config(mlflow_enabled=False, **kwargs)
    assert message in str(e.value)


def test_describe_says_what_a_field_allows():
    assert describe(DetectorConfig, "topk") == "an int >= 1"
    assert describe(DetectorConfig, "score_thresh") == "a number in [0, 1)"
    assert describe(DataConfig, "cache_dir") == "a string or None"
    assert parse_value(DataConfig, "cache_dir", "") is None


# ---------------------------------------------------------------------------------------------
# pipeline.cli: one exit-code policy for every job
# ---------------------------------------------------------------------------------------------
def _job(behaviour):
    def main(argv=None):
        return behaviour()
    return main


def _raise(e):
    def f():
        raise e
    return f


def test_exit_codes(capsys):
    assert call_main(_job(lambda: 0)) == EXIT_OK and call_main(_job(lambda: None)) == EXIT_OK
    assert call_main(_job(_raise(UsageError("--device tpu: choose cpu or cuda")))) == EXIT_BAD_INPUT
    err = capsys.readouterr().err
    assert err == "error: --device tpu: choose cpu or cuda\n"  # one line, no traceback
    with pytest.raises(FieldError) as e:
        DetectorConfig(topk=2.5)
    assert call_main(_job(_raise(e.value))) == EXIT_BAD_INPUT
    assert capsys.readouterr().err == "error: DetectorConfig.topk=2.5: expected an int >= 1, got a float\n"
    assert call_main(_job(_raise(SystemExit("--tta-config is not JSON")))) == EXIT_BAD_INPUT
    assert capsys.readouterr().err == "error: --tta-config is not JSON\n"
    assert call_main(_job(_raise(SystemExit(0)))) == EXIT_OK
    # an unexpected error is an internal failure with its traceback, even a ValueError
    assert call_main(_job(_raise(ValueError("shape mismatch in the head")))) == EXIT_FAILURE
    err = capsys.readouterr().err
    assert "Traceback" in err and "shape mismatch in the head" in err
    # ... unless the job names it as its bad input
    assert call_main(_job(_raise(KeyError("x"))), errors=(KeyError,)) == EXIT_BAD_INPUT


def test_bad_input_block_names_the_file(capsys, tmp_path):
    def main(argv=None):
        with bad_input(prefix="--results: "):
            open(tmp_path / "missing.json")
    assert call_main(main) == EXIT_BAD_INPUT
    err = capsys.readouterr().err
    assert err.startswith("error: --results: ") and "missing.json" in err and err.count("\n") == 1

    def internal(argv=None):
        with bad_input(OSError):
            raise ValueError("not covered by this block")
    assert call_main(internal) == EXIT_FAILURE


def test_argparse_errors_exit_2_and_help_lists_exit_codes(capsys):
    import argparse

    p = add_exit_codes(argparse.ArgumentParser(prog="job"), "bad input (exit 2): --n below 1")
    p.add_argument("--n", type=int)
    assert call_main(lambda argv: p.parse_args(argv) and 0, ["--n", "x"]) == EXIT_BAD_INPUT
    assert "invalid int value: 'x'" in capsys.readouterr().err
    text = p.format_help()
    assert "exit codes:\n  0    success\n  1    internal failure" in text and "--n below 1" in text
    assert sys.modules["pipeline.cli"].EXIT_CODES in text
