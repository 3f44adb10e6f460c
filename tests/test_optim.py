"""The paper's optimiser and schedule (spec section 5) and the linear scaling rule."""
import math

import pytest
import torch
from torch import nn

from pipeline.optim import WarmupMultiStepLR, build_optimizer, grad_norm, load_training_state, param_groups
from pipeline.schedule import Schedule, resolve_schedule


class _Head(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3)
        self.gn = nn.GroupNorm(2, 4)
        self.scale = nn.Parameter(torch.ones(()))  # per-level scalar: normal LR and decay
        self.frozen = nn.Linear(2, 2)
        self.frozen.requires_grad_(False)


def test_bias_gets_double_lr_and_no_decay_everything_else_the_base():
    sched = resolve_schedule(16, "1x")
    opt = build_optimizer(_Head(), sched)
    groups = {g["name"]: g for g in opt.param_groups}
    assert groups["weights"]["lr"] == pytest.approx(0.01)
    assert groups["weights"]["weight_decay"] == pytest.approx(1e-4)
    assert groups["biases"]["lr"] == pytest.approx(0.02)
    assert groups["biases"]["weight_decay"] == 0.0
    assert opt.defaults["momentum"] == 0.9
    m = _Head()
    ids = lambda ps: {id(p) for p in ps}  # noqa: E731
    g = {x["name"]: ids(x["params"]) for x in param_groups(m, 0.01)}
    assert g["weights"] == ids([m.conv.weight, m.gn.weight, m.scale])
    assert g["biases"] == ids([m.conv.bias, m.gn.bias])  # frozen Linear left out


@pytest.mark.parametrize("batch, name, lr, iters, steps, warmup", [
    (16, "1x", 0.01, 90_000, (60_000, 80_000), 500),
    (16, "2x", 0.01, 180_000, (120_000, 160_000), 500),
    (8, "1x", 0.005, 180_000, (120_000, 160_000), 1000),
    (32, "1x", 0.02, 45_000, (30_000, 40_000), 250),
])
def test_named_schedules_follow_the_linear_scaling_rule(batch, name, lr, iters, steps, warmup):
    s = resolve_schedule(batch, name)
    assert (s.base_lr, s.max_iter, s.steps, s.warmup_iters) == (pytest.approx(lr), iters, steps, warmup)
    assert s.warmup_factor == pytest.approx(1 / 3)
    text = s.describe()
    assert f"{iters} iterations" in text
    assert ("linear scaling" in text) == (batch != 16)


def test_explicit_iterations_keep_the_1x_proportions_unless_given():
    s = resolve_schedule(4, None, iterations=900)
    assert s.max_iter == 900 and s.steps == (600, 800) and s.warmup_iters == 5
    assert s.base_lr == pytest.approx(0.0025)
    s = resolve_schedule(4, None, iterations=900, steps=[100], warmup_iters=0, base_lr=0.04, scale_lr=False)
    assert s.steps == (100,) and s.warmup_iters == 0 and s.base_lr == pytest.approx(0.04)


@pytest.mark.parametrize("kwargs, match", [
    ({"batch_size": 16, "schedule": "3x"}, "unknown schedule '3x'"),
    ({"batch_size": 0}, "batch_size"),
    ({"batch_size": 16, "iterations": 0}, "iterations"),
    ({"batch_size": 16, "iterations": 10, "steps": [8, 4]}, "increasing"),
    ({"batch_size": 16, "base_lr": -1.0}, "base_lr"),
])
def test_bad_schedule_requests_name_the_problem(kwargs, match):
    with pytest.raises(ValueError, match=match):
        resolve_schedule(**kwargs)


def _lrs_over(schedule, n, start_state=None):
    model = nn.Linear(2, 2)
    opt = build_optimizer(model, schedule)
    sched = WarmupMultiStepLR(opt, schedule)
    if start_state is not None:
        opt.load_state_dict(start_state[0])
        sched.load_state_dict(start_state[1])
    out = []
    for _ in range(n):
        out.append(opt.param_groups[0]["lr"])
        opt.step()
        sched.step()
    return out, (opt.state_dict(), sched.state_dict())


def test_constant_warmup_then_steps_and_exact_resume():
    s = resolve_schedule(16, None, iterations=12, steps=[6, 9], warmup_iters=3)
    lrs, _ = _lrs_over(s, 12)
    expected = [0.01 / 3] * 3 + [0.01] * 3 + [0.001] * 3 + [0.0001] * 3
    assert lrs == pytest.approx(expected)
    for i, lr in enumerate(lrs):
        assert lr == pytest.approx(0.01 * s.lr_factor(i))
    # a scheduler restored at iteration 5 continues with the same LRs
    _, state = _lrs_over(s, 5)
    resumed, _ = _lrs_over(s, 7, start_state=state)
    assert resumed == pytest.approx(expected[5:])


def test_grad_norm_clips_and_reports_non_finite():
    p = nn.Parameter(torch.zeros(4))
    p.grad = torch.tensor([3.0, 4.0, 0.0, 0.0])
    assert float(grad_norm([p], None)) == pytest.approx(5.0)
    assert p.grad.tolist() == [3.0, 4.0, 0.0, 0.0]  # no clipping without a limit (the paper)
    assert float(grad_norm([p], 1.0)) == pytest.approx(5.0)
    assert float(p.grad.norm()) == pytest.approx(1.0, rel=1e-4)
    p.grad = torch.tensor([math.nan, 1.0, 0.0, 0.0])
    assert not math.isfinite(float(grad_norm([p], 1.0)))


def test_resume_keeps_momentum_and_position_but_takes_the_new_lr_and_steps():
    torch.manual_seed(0)
    model = _Head()
    old = resolve_schedule(4, None, iterations=10, base_lr=0.04, warmup_iters=2)
    opt = build_optimizer(model, old)
    sched = WarmupMultiStepLR(opt, old)
    for _ in range(5):
        opt.zero_grad()
        model.gn(model.conv(torch.randn(1, 3, 5, 5))).sum().mul(model.scale).backward()
        opt.step()
        sched.step()
    saved_opt, saved_sched = opt.state_dict(), sched.state_dict()

    # resubmitted with a lower LR and a longer run whose step is at 6: continue at iteration 5
    new = resolve_schedule(4, None, iterations=20, steps=[6], base_lr=0.008, warmup_iters=2)
    opt2 = build_optimizer(model, new, momentum=0.8)
    sched2 = WarmupMultiStepLR(opt2, new)
    load_training_state(opt2, sched2, new, saved_opt, saved_sched, 5, momentum=0.8)
    lrs = [g["lr"] for g in opt2.param_groups]
    assert lrs == pytest.approx([0.002, 0.004])  # 0.008 @ 16 -> 0.002 @ 4; biases x2; before the step at 6
    assert all(g["momentum"] == 0.8 for g in opt2.param_groups)
    buf = opt2.state[model.conv.weight]["momentum_buffer"]
    assert torch.equal(buf, opt.state[model.conv.weight]["momentum_buffer"])  # momentum kept
    sched2.step()  # iteration 6: the new step applies
    assert [g["lr"] for g in opt2.param_groups] == pytest.approx([0.0002, 0.0004])
    assert Schedule.from_dict(new.to_dict()) == new
