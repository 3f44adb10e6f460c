"""Property: any value of any type for any config field (or KEY=VALUE option) either is an error
naming the field, or builds a config whose tiny model runs one forward and one backward pass.

Bounded for CI (about a minute in all on 2 cores): few examples per property, 64 px images,
integers drawn small so that a valid width or depth never builds a large network.
"""
from __future__ import annotations

import dataclasses
import math
import types
import typing

import pytest
import torch
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st

from detector import DetectorConfig, build_detector, get_preset
from detector.fields import FieldError, parse_assignments
from pipeline.data import DataConfig, build_dataset
from pipeline.data.batching import collate
from pipeline.optim import build_optimizer
from pipeline.training import TrainConfig, build_train_config

PROPERTY = settings(max_examples=20, deadline=None, derandomize=True, database=None,
                    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])

SMALL_INT = st.integers(min_value=-3, max_value=24)
NUMBER = st.one_of(st.floats(min_value=-2, max_value=20, allow_nan=False), st.sampled_from(
    [0.0, 0.5, 1.0, 1e-3, float("nan"), float("inf"), -float("inf")]))
WORD = st.one_of(st.text(max_size=5), st.sampled_from(["true", "none", "abc", "1:2", "0.5", ""]))


def of_type(hint) -> st.SearchStrategy:
    """Values of the annotated type (in range or not)."""
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if hint is bool:
        return st.booleans()
    if hint is int:
        return SMALL_INT
    if hint is float:
        return NUMBER
    if hint is str:
        return WORD
    if hint is type(None):
        return st.none()
    if origin in (typing.Union, types.UnionType):
        return st.one_of(*[of_type(a) for a in args])
    if origin in (tuple, list):
        if args and args[-1] is not Ellipsis:
            return st.tuples(*[of_type(a) for a in args])
        return st.lists(of_type(args[0] if args else int), max_size=4).map(tuple)
    return st.none()  # nested configs: drawn from the field's valid values


def any_value(cls, name: str, field_values: list) -> st.SearchStrategy:
    """A value valid in real use, one of the field's type (in range or not), or one of any other type."""
    anything = st.one_of(SMALL_INT, NUMBER, st.booleans(), WORD, st.none(),
                         st.lists(st.one_of(SMALL_INT, NUMBER, st.booleans()), max_size=5))
    return st.one_of(st.sampled_from(field_values), of_type(typing.get_type_hints(cls)[name]), anything)


def _text(value) -> str:
    return ",".join(map(str, value)) if isinstance(value, (list, tuple)) else str(value)


def option_text(cls, name: str, field_values: list) -> st.SearchStrategy:
    """What a user might type after ``KEY=``: a value valid in real use, any value, or any word."""
    valid = st.sampled_from(field_values).map(_text)
    return st.one_of(valid, any_value(cls, name, field_values).map(_text), WORD)


# Values the fields take in real use (so that the valid side of each property gets exercised).
def _valid(cls, extra: dict) -> dict[str, list]:
    out = {}
    for f in dataclasses.fields(cls):
        rule = cls.RULES.get(f.name)
        choices = list(rule.choices) if rule is not None and rule.choices is not None else []
        default = f.default if f.default is not dataclasses.MISSING else None
        out[f.name] = [v for v in [default, *choices, *extra.get(f.name, [])] if v is not None] or [None]
    return out


DETECTOR_VALUES = _valid(DetectorConfig, {"aspect_ratios": [(0.5, 1.0, 2.0), (2.0,)], "dcn_stages": [(5,), (4, 5)],
                                          "head_channels": [16, 24], "gn_groups": [4, 8]})
DATA_VALUES = _valid(DataConfig, {"train_min_size": [(48, 64)], "synthetic_image_size": [(48, 64)]})
TRAIN_SETTABLE = ["batch_size", "preset", "momentum", "weight_decay", "bias_lr_factor", "bias_weight_decay",
                  "max_grad_norm", "amp", "seed", "torch_threads", "log_period", "checkpoint_period",
                  "checkpoints_to_keep", "eval_period", "eval_at_end", "eval_batch_size", "eval_backend",
                  "report_period", "log_model", "register_model", "fail_at_iteration", "run_name", "storage_path",
                  "detector", "data", "schedule", "mlflow"]
TRAIN_VALUES = _valid(TrainConfig, {"amp": ["bf16"], "max_grad_norm": [1.0], "batch_size": [2]})


def _images(n: int = 2, size: int = 64) -> list[torch.Tensor]:
    return [torch.randn(3, size, size) for _ in range(n)]


def _targets(num_classes: int) -> list[dict]:
    boxes = torch.tensor([[4.0, 6.0, 40.0, 30.0], [20.0, 20.0, 60.0, 62.0]])
    labels = torch.tensor([1, min(2, num_classes)])
    return [{"boxes": boxes, "labels": labels}, {"boxes": boxes[:1], "labels": labels[:1]}]


def _forward_backward(cfg: DetectorConfig, images=None, targets=None, amp=None) -> None:
    event("valid: forward and backward")
    torch.manual_seed(0)
    model = build_detector(cfg).train()
    images = images if images is not None else _images()
    targets = targets if targets is not None else _targets(cfg.num_classes)
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=amp == "bf16"):
        losses = model(images, targets)
    loss = sum(losses.values())
    assert torch.isfinite(loss), losses
    loss.backward()
    assert any(p.grad is not None for p in model.parameters())


def _names(error: Exception, *names: str) -> bool:
    return any(n in str(error) for n in names)


TINY = get_preset("tiny", num_classes=3, head_channels=16, fpn_channels=16, gn_groups=4)


# ---------------------------------------------------------------------------------------------
@PROPERTY
@given(data=st.data())
def test_any_detector_field_value(data):
    name = data.draw(st.sampled_from(sorted(DETECTOR_VALUES)), label="field")
    value = data.draw(any_value(DetectorConfig, name, DETECTOR_VALUES[name]), label="value")
    try:
        cfg = TINY.replace(**{name: value})
    except ValueError as e:  # FieldError for the field alone, ValueError for a combination
        event(f"refused: {type(e).__name__}")
        assert _names(e, name), (name, value, str(e))
        return
    _build_and_run(cfg, name)


def _build_and_run(cfg: DetectorConfig, name: str) -> None:
    if name == "pretrained_path" and cfg.pretrained_path:
        # a path is a string; whether the file exists is checked where the weights are loaded
        with pytest.raises(FileNotFoundError, match=f"pretrained_path {cfg.pretrained_path!r}"):
            build_detector(cfg)
        return
    _forward_backward(cfg)


@PROPERTY
@given(data=st.data())
def test_any_detector_option(data):
    key = data.draw(st.one_of(st.sampled_from(sorted(DETECTOR_VALUES)), st.sampled_from(["k", "topK", ""])),
                    label="key")
    text = data.draw(option_text(DetectorConfig, key if key in DETECTOR_VALUES else "topk",
                                 DETECTOR_VALUES.get(key, [1])), label="text")
    try:
        overrides = parse_assignments(DetectorConfig, [f"{key}={text}"], "--detector")
    except FieldError as e:
        event("refused: FieldError")
        assert str(e).startswith(f"--detector ") and f"{key}=" in str(e), str(e)
        return
    try:
        cfg = TINY.replace(**overrides)
    except ValueError as e:
        event(f"refused: {type(e).__name__}")
        assert _names(e, key), (key, text, str(e))
        return
    _build_and_run(cfg, key)


# ---------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def data_base(tmp_path_factory) -> DataConfig:
    return DataConfig.tiny(synthetic_train_images=2, synthetic_val_images=1, synthetic_image_size=(48, 64),
                           train_min_size=64, test_min_size=64, max_size=96,
                           cache_dir=str(tmp_path_factory.mktemp("synthetic")))


# Fields that only say where files are or how a loader is run: a valid value is checked for its
# type and range here; the files themselves are checked by the data layer's own tests.
NOT_IN_A_BATCH = {"source", "train_ann", "train_images", "val_ann", "val_images", "test_ann", "test_images",
                  "cache_dir", "num_workers", "gpu_decode", "aspect_ratio_grouping", "synthetic_val_images",
                  "test_min_size", "max_bad_fraction"}


def _data_forward_backward(data_cfg: DataConfig) -> None:
    dataset = build_dataset(data_cfg, "train", train=True)
    images, targets = collate([dataset[0], dataset[len(dataset) - 1]], data_cfg.size_divisible)
    cfg = TINY.replace(num_classes=data_cfg.synthetic_num_classes)
    targets = [{"boxes": t["boxes"], "labels": t["labels"]} for t in targets]
    _forward_backward(cfg, [im for im in images], targets)


@PROPERTY
@given(data=st.data())
def test_any_data_field_value(data, data_base):
    in_batch = sorted(set(DATA_VALUES) - NOT_IN_A_BATCH)
    name = data.draw(st.one_of(st.sampled_from(in_batch), st.sampled_from(sorted(DATA_VALUES))), label="field")
    value = data.draw(any_value(DataConfig, name, DATA_VALUES[name]), label="value")
    if name in ("synthetic_train_images",) and isinstance(value, int) and not isinstance(value, bool):
        value = min(value, 4)  # each valid count generates that many images
    try:
        cfg = data_base.replace(**{name: value})
    except ValueError as e:
        event(f"refused: {type(e).__name__}")
        assert _names(e, name), (name, value, str(e))
        return
    if name not in NOT_IN_A_BATCH:
        _data_forward_backward(cfg)
    else:
        event("valid: config only")


@PROPERTY
@given(data=st.data())
def test_any_data_option(data, data_base):
    in_batch = sorted(set(DATA_VALUES) - NOT_IN_A_BATCH)
    key = data.draw(st.one_of(st.sampled_from(in_batch), st.sampled_from(sorted(DATA_VALUES)), st.just("min_size")),
                    label="key")
    text = data.draw(option_text(DataConfig, key if key in DATA_VALUES else "num_workers",
                                 DATA_VALUES.get(key, [1])), label="text")
    try:
        overrides = parse_assignments(DataConfig, [f"{key}={text}"], "--data-opt")
    except FieldError as e:
        event("refused: FieldError")
        assert str(e).startswith(f"--data-opt ") and f"{key}=" in str(e), str(e)
        return
    if overrides.get("synthetic_train_images", 0) > 4:
        overrides["synthetic_train_images"] = 4
    try:
        cfg = data_base.replace(**overrides)
    except ValueError as e:
        event(f"refused: {type(e).__name__}")
        assert _names(e, key), (key, text, str(e))
        return
    if key not in NOT_IN_A_BATCH:
        _data_forward_backward(cfg)
    else:
        event("valid: config only")


# ---------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def train_base(tmp_path_factory, data_base) -> TrainConfig:
    return build_train_config(preset="tiny", detector=dict(head_channels=16, fpn_channels=16, gn_groups=4),
                              data=data_base, batch_size=2, iterations=4, mlflow_enabled=False,
                              storage_path=str(tmp_path_factory.mktemp("runs")))


@settings(PROPERTY, max_examples=15)
@given(data=st.data())
def test_any_train_config_field_value(data, train_base):
    name = data.draw(st.sampled_from(TRAIN_SETTABLE), label="field")
    value = data.draw(any_value(TrainConfig, name, TRAIN_VALUES[name]), label="value")
    if name == "batch_size" and value == 2:
        value = train_base.batch_size
    try:
        cfg = train_base.replace(**{name: value})
    except ValueError as e:
        event(f"refused: {type(e).__name__}")
        assert _names(e, name), (name, value, str(e))
        return
    event("valid: forward, backward and step")
    model = build_detector(cfg.detector).train()
    optimizer = build_optimizer(model, cfg.schedule, cfg.momentum, cfg.weight_decay, cfg.bias_lr_factor,
                                cfg.bias_weight_decay)
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=cfg.amp == "bf16"):
        losses = model(_images(), _targets(cfg.detector.num_classes))
    loss = sum(losses.values())
    assert math.isfinite(float(loss.detach()))
    loss.backward()
    if cfg.max_grad_norm is not None:
        torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.max_grad_norm)
    optimizer.step()


@settings(PROPERTY, max_examples=12)
@given(data=st.data())
def test_any_training_setting_option(data, data_base, tmp_path_factory):
    """``--train-set KEY=VALUE``: the settings build_train_config takes."""
    keys = ["batch_size", "iterations", "lr_steps", "base_lr", "warmup_iters", "momentum", "weight_decay", "amp",
            "seed", "max_grad_norm", "eval_period", "log_period", "learning_rate"]
    key = data.draw(st.sampled_from(keys), label="key")
    text = data.draw(option_text(build_train_config, key if key != "learning_rate" else "base_lr",
                                 [2, 4, "bf16", [2, 3], 0.01]), label="text")
    try:
        settings_ = parse_assignments(build_train_config, [f"{key}={text}"], "--train-set")
    except FieldError as e:
        event("refused: FieldError")
        assert str(e).startswith(f"--train-set ") and f"{key}=" in str(e), str(e)
        return
    base = dict(preset="tiny", detector=dict(head_channels=16, fpn_channels=16, gn_groups=4), data=data_base,
                batch_size=2, iterations=4, mlflow_enabled=False, storage_path=str(tmp_path_factory.mktemp("r")))
    try:
        cfg = build_train_config(**{**base, **settings_})
    except ValueError as e:
        event(f"refused: {type(e).__name__}")
        assert _names(e, key), (key, text, str(e))
        return
    _forward_backward(cfg.detector, amp=cfg.amp)
