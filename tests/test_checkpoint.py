"""Checkpoint format: weights-only loadable, atomic, exact RNG restore, detector round trip."""
import random

import numpy as np
import pytest
import torch

from pipeline import checkpoint as ck


def _draws():
    return (random.random(), float(np.random.rand()), float(torch.rand(())))


def test_rng_state_round_trip_through_a_weights_only_file(tmp_path):
    torch.manual_seed(3)
    np.random.seed(3)
    random.seed(3)
    state = ck.build_state(torch.nn.Linear(2, 2), {"name": "x"}, [{"id": 5, "name": "cat"}], 7,
                           rng=ck.get_rng_state())
    ck.save_state(state, tmp_path / "c")
    expected = _draws()
    loaded = ck.load_state(tmp_path / "c")  # weights_only=True inside
    _draws()
    ck.set_rng_state(loaded["rng"])
    assert _draws() == expected
    assert loaded["iteration"] == 7 and loaded["data"]["categories"] == [{"id": 5, "name": "cat"}]
    assert [p.name for p in (tmp_path / "c").iterdir()] == ["state.pt"]  # no temp file left


def test_state_holds_unwrapped_model_optimizer_and_scheduler(tmp_path):
    model = torch.nn.Linear(2, 2)

    class Wrapped(torch.nn.Module):  # stands in for DDP: the weights live under .module
        def __init__(self):
            super().__init__()
            self.module = model

    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    model(torch.ones(1, 2)).sum().backward()
    opt.step()
    sched = torch.optim.lr_scheduler.StepLR(opt, 5)
    state = ck.build_state(Wrapped(), {"a": 1}, [], 1, optimizer=opt, scheduler=sched)
    assert set(state["model"]) == {"weight", "bias"}
    ck.save_state(state, tmp_path)
    back = ck.load_state(tmp_path / "state.pt")
    assert torch.equal(back["model"]["weight"], model.weight.detach())
    assert back["optimizer"]["state"][0]["momentum_buffer"].shape == (2, 2)
    assert back["scheduler"]["step_size"] == 5


def test_missing_corrupt_and_foreign_checkpoints_are_named(tmp_path):
    with pytest.raises(FileNotFoundError, match="no checkpoint at .*nowhere"):
        ck.load_state(tmp_path / "nowhere")
    bad = tmp_path / "bad" / "state.pt"
    bad.parent.mkdir()
    bad.write_bytes(b"not a torch file")
    with pytest.raises(ValueError, match="cannot read checkpoint .*bad/state.pt"):
        ck.load_state(bad.parent)
    torch.save({"weights": 1}, tmp_path / "other.pt")
    with pytest.raises(ValueError, match="not an atss-ray checkpoint"):
        ck.load_state(tmp_path / "other.pt")


def test_weights_that_do_not_match_the_config_are_refused_by_name(tmp_path):
    """Strict loading: another architecture's weights (or a resume after changing the detector
    config) fail with the project's error naming the checkpoint and keys, never a bare RuntimeError."""
    from detector import build_detector, get_preset

    cfg = get_preset("tiny", num_classes=3)
    model = build_detector(cfg)
    ck.save_state(ck.build_state(model, cfg, [{"id": i, "name": str(i)} for i in (1, 2, 3)], 0), tmp_path / "ok")
    loaded, loaded_cfg = ck.detector_from_state(ck.load_state(tmp_path / "ok"), source="ok")
    assert loaded_cfg == cfg and not loaded.training
    state = ck.load_state(tmp_path / "ok")
    state["detector_config"] = get_preset("tiny", num_classes=4).to_dict()  # shapes differ
    with pytest.raises(ValueError, match=r"ckpt-x: checkpoint weights do not match the detector config: "
                                         r"shape differs for .*cls_logits.*\(checkpoint \(3, 32, 3, 3\)"):
        ck.detector_from_state(state, source="ckpt-x")
    other = build_detector(get_preset("tiny", num_classes=3, num_convs=cfg.num_convs + 1))  # a changed architecture
    with pytest.raises(ValueError, match=r"resume: checkpoint weights do not match .*missing head.box_tower"):
        ck.load_weights(other, model.state_dict(), "resume")
    weights = dict(model.state_dict())
    weights.pop(next(iter(weights)))
    with pytest.raises(ValueError, match=r"missing"):
        ck.load_weights(build_detector(cfg), weights, "partial")
