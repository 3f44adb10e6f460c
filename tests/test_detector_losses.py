"""Losses against values computed by hand on three anchors; zero-positive batches; normalisers."""
from __future__ import annotations

import math

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from detector import build_detector, get_preset
from detector.anchors import AnchorSet
from detector.losses import centerness_targets, giou_loss, reduce_mean_counts


# Three 10 px anchors in a row; GT 0 = [0, 0, 12, 10] (label 2) takes anchor 0 (IoU 0.833 >= mean + std
# = 0.766), GT 1 = [19, 0, 30, 10] (label 1) takes anchor 2 (IoU 0.909 >= 0.831); anchor 1 is background.
ANCHORS = [[0.0, 0, 10, 10], [10.0, 0, 20, 10], [20.0, 0, 30, 10]]
GTS = [[0.0, 0, 12, 10], [19.0, 0, 30, 10]]
LABELS = [2, 1]
CLS = [[0.0, 1.0], [-1.0, 0.5], [-2.0, -3.0]]
REG = [[0.5, 0.0, 0.2, 0.0], [0.3, 0.1, 0.0, 0.0], [-0.4, 0.2, 0.1, -0.1]]
CTR = [0.3, -0.2, 1.1]


def _sigmoid(x):
    return 1 / (1 + math.exp(-x))


def _focal(x, t, alpha=0.25, gamma=2.0):
    p = _sigmoid(x)
    ce = -(t * math.log(p) + (1 - t) * math.log(1 - p))
    p_t = p * t + (1 - p) * (1 - t)
    return (alpha * t + (1 - alpha) * (1 - t)) * ce * (1 - p_t) ** gamma


def _decode(d, a):
    aw, ah = a[2] - a[0], a[3] - a[1]
    cx, cy = a[0] + aw / 2 + d[0] / 10 * aw, a[1] + ah / 2 + d[1] / 10 * ah
    w, h = aw * math.exp(d[2] / 5), ah * math.exp(d[3] / 5)
    return [cx - w / 2, cy - h / 2, cx + w / 2, cy + h / 2]


def _giou(p, t):
    inter = max(0, min(p[2], t[2]) - max(p[0], t[0])) * max(0, min(p[3], t[3]) - max(p[1], t[1]))
    union = (p[2] - p[0]) * (p[3] - p[1]) + (t[2] - t[0]) * (t[3] - t[1]) - inter
    enclose = (max(p[2], t[2]) - min(p[0], t[0])) * (max(p[3], t[3]) - min(p[1], t[1]))
    return inter / union - (enclose - union) / enclose


def _centerness(a, g):
    cx, cy = (a[0] + a[2]) / 2, (a[1] + a[3]) / 2
    l, t, r, b = cx - g[0], cy - g[1], g[2] - cx, g[3] - cy
    return math.sqrt(min(l, r) / max(l, r) * min(t, b) / max(t, b))


def _bce(x, t):
    p = _sigmoid(x)
    return -(t * math.log(p) + (1 - t) * math.log(1 - p))


def _smooth_l1(x, beta=1 / 9):
    x = abs(x)
    return 0.5 * x * x / beta if x < beta else x - 0.5 * beta


def _encode(g, a):
    aw, ah = a[2] - a[0], a[3] - a[1]
    gw, gh = g[2] - g[0], g[3] - g[1]
    return [10 * ((g[0] + gw / 2) - (a[0] + aw / 2)) / aw, 10 * ((g[1] + gh / 2) - (a[1] + ah / 2)) / ah,
            5 * math.log(gw / aw), 5 * math.log(gh / ah)]


def _three_anchor_losses(**overrides):
    model = build_detector(get_preset("tiny", num_classes=2, **overrides)).train()
    anchors = AnchorSet(torch.tensor(ANCHORS), torch.full((3,), 8.0), torch.zeros(3, dtype=torch.long), [3, 0, 0, 0, 0])
    cls = torch.tensor([CLS], requires_grad=True)
    reg = torch.tensor([REG], requires_grad=True)
    ctr = torch.tensor([CTR], requires_grad=True) if model.cfg.centerness else None
    targets = [{"boxes": torch.tensor(GTS), "labels": torch.tensor(LABELS)}]
    return model, model.compute_losses(cls, reg, ctr, anchors, targets), (cls, reg, ctr)


def test_losses_match_hand_computation():
    model, losses, _ = _three_anchor_losses()
    assigned = {0: 0, 2: 1}  # anchor -> GT
    num_pos = 2
    cls_sum = 0.0
    for i in range(3):
        for c in range(2):
            t = 1.0 if i in assigned and LABELS[assigned[i]] == c + 1 else 0.0
            cls_sum += _focal(CLS[i][c], t)
    weights = {i: _centerness(ANCHORS[i], GTS[g]) for i, g in assigned.items()}
    reg_sum = sum(w * (1 - _giou(_decode(REG[i], ANCHORS[i]), GTS[assigned[i]])) for i, w in weights.items())
    ctr_sum = sum(_bce(CTR[i], w) for i, w in weights.items())
    assert losses["loss_cls"].item() == pytest.approx(cls_sum / num_pos, rel=1e-5)
    assert losses["loss_reg"].item() == pytest.approx(2.0 * reg_sum / sum(weights.values()), rel=1e-5)
    assert losses["loss_centerness"].item() == pytest.approx(ctr_sum / num_pos, rel=1e-5)
    stats = model.assign_stats
    assert stats["num_pos"] == 2 and stats["num_gt"] == 2 and stats["gt_without_pos"] == 0
    assert stats["pos_per_gt"] == 1.0 and stats["pos_level_0"] == 1.0


def test_smooth_l1_without_centerness_matches_hand_computation():
    _, losses, _ = _three_anchor_losses(reg_loss="smooth_l1", centerness=False, reg_loss_weight=1.0)
    assigned = {0: 0, 2: 1}
    expected = sum(_smooth_l1(REG[i][j] - _encode(GTS[g], ANCHORS[i])[j]) for i, g in assigned.items() for j in range(4))
    assert losses["loss_reg"].item() == pytest.approx(expected / 2, rel=1e-5)
    assert losses["loss_centerness"].item() == 0.0


def test_point_regression_giou_matches_hand_computation():
    _, losses, _ = _three_anchor_losses(regression="point")
    # (l, t, r, b) in strides (8 px) around each anchor centre.
    assigned = {0: 0, 2: 1}
    weights, total = {}, 0.0
    for i, g in assigned.items():
        cx, cy = (ANCHORS[i][0] + ANCHORS[i][2]) / 2, (ANCHORS[i][1] + ANCHORS[i][3]) / 2
        l, t, r, b = (8 * v for v in REG[i])
        box = [cx - l, cy - t, cx + r, cy + b]
        box[2], box[3] = max(box[2], box[0]), max(box[3], box[1])
        weights[i] = _centerness(ANCHORS[i], GTS[g])
        total += weights[i] * (1 - _giou(box, GTS[g]))
    assert losses["loss_reg"].item() == pytest.approx(2.0 * total / sum(weights.values()), rel=1e-5)


def test_giou_and_centerness_targets_by_hand():
    pred = torch.tensor([[0.0, 0, 2, 2], [3.0, 3, 1, 1]])  # the second has x2 < x1: forced to a point
    target = torch.tensor([[1.0, 1, 3, 3], [1.0, 1, 3, 3]])
    # inter 1, union 7, enclosure 9 -> GIoU = 1/7 - 2/9; the degenerate one: 0 - (4 - 4)/4 ... area 0
    expected0 = 1 - (1 / 7 - 2 / 9)
    out = giou_loss(pred, target)
    assert out[0].item() == pytest.approx(expected0, rel=1e-5)
    assert out[1].item() == pytest.approx(1 - (0 - (4 - 4) / 4), abs=1e-5)  # enclosure 2x2 = union 4
    ct = centerness_targets(torch.tensor([[1.0, 1.0], [2.0, 1.0]]), torch.tensor([[0.0, 0, 4, 2], [0.0, 0, 4, 2]]))
    assert ct.tolist() == pytest.approx([math.sqrt(1 / 3), 1.0])


def test_zero_positives_keep_the_graph_and_give_zero_box_losses():
    torch.manual_seed(0)
    model = build_detector(get_preset("tiny", num_classes=3)).train()
    images = torch.randn(2, 3, 64, 64)
    empty = [{"boxes": torch.zeros(0, 4), "labels": torch.zeros(0, dtype=torch.long)}] * 2
    losses = model(images, empty)
    assert losses["loss_reg"].item() == 0.0 and losses["loss_centerness"].item() == 0.0
    assert losses["loss_cls"].item() > 0
    assert all(v.requires_grad for v in losses.values())
    sum(losses.values()).backward()
    assert model.head.cls_logits.weight.grad.abs().sum() > 0
    assert model.head.bbox_pred.weight.grad is not None and model.head.bbox_pred.weight.grad.abs().sum() == 0
    assert model.assign_stats["num_pos"] == 0 and model.assign_stats["num_gt"] == 0
    # A GT with no positive at all (too thin for any anchor centre) behaves the same way.
    thin = [{"boxes": torch.tensor([[1.0, 1.0, 2.0, 60.0]]), "labels": torch.tensor([1])}] * 2
    losses = model(images, thin)
    assert losses["loss_reg"].item() == 0.0 and model.assign_stats["gt_without_pos"] == 2


def test_ignored_anchors_leave_the_classification_loss():
    # max-IoU assignment: IoU in [neg, pos) is ignored. Anchor 1 (best IoU 0.1) is background at
    # 0.5 / 0.4 and ignored at 0.8 / 0.05, which removes its focal term; anchors 0 and 2 stay positive.
    _, base, _ = _three_anchor_losses(assigner="max_iou", centerness=False, in_gt_box=False)
    _, ign, _ = _three_anchor_losses(assigner="max_iou", centerness=False, in_gt_box=False, iou_neg_thr=0.05,
                                     iou_pos_thr=0.8)
    dropped = sum(_focal(CLS[1][c], 0.0) for c in range(2))
    assert base["loss_cls"].item() - ign["loss_cls"].item() == pytest.approx(dropped / 2, rel=1e-4)


def _reduce_worker(rank, world, path, queue):
    dist.init_process_group("gloo", init_method=f"file://{path}", rank=rank, world_size=world)
    num_pos, ctr = reduce_mean_counts(torch.tensor(float(3 * rank)), torch.tensor(1.5 + rank))
    queue.put((rank, num_pos.item(), ctr.item()))
    dist.destroy_process_group()


def test_normalisers_are_averaged_over_workers(tmp_path):
    ctx = mp.get_context("fork")  # spawn would re-import torch in each child (slow on 2 busy cores)
    queue = ctx.SimpleQueue()
    procs = [ctx.Process(target=_reduce_worker, args=(r, 2, str(tmp_path / "store"), queue)) for r in range(2)]
    for p in procs:
        p.start()
    results = sorted(queue.get() for _ in procs)
    for p in procs:
        p.join(timeout=60)
    # rank 0 has no positive, rank 1 has 3: both normalise by the mean, 1.5 (spec 3.6-3.7).
    assert results == [(0, 1.5, 2.0), (1, 1.5, 2.0)]
    assert all(p.exitcode == 0 for p in procs)
