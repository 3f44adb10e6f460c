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
