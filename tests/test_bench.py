"""Smoke runs of bench/train_step.py and bench/accuracy.py at their smallest sizes, and the checks
their fairness rests on: the profiler-based peak memory and torchvision's skipped identity resize."""
from __future__ import annotations

import copy
import math
import sys
from pathlib import Path

import pytest
import torch

BENCH = Path(__file__).resolve().parents[1] / "bench"
sys.path.insert(0, str(BENCH))

import accuracy  # noqa: E402
import train_step  # noqa: E402


@pytest.fixture(autouse=True)
def _one_torch_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def test_peak_memory_is_the_running_peak_of_allocations():
    mib = 2 ** 20

    def work():
        a = torch.empty(4 * mib, dtype=torch.uint8)
        b = torch.empty(8 * mib, dtype=torch.uint8)  # a + b live: 12 MiB
        del a
        c = torch.empty(2 * mib, dtype=torch.uint8)  # b + c: 10 MiB
        return b.numel() + c.numel()

    peak = train_step.peak_memory(work, torch.device("cpu"))
    assert abs(peak - 12 * mib) < 0.1 * mib


def test_torchvision_peer_without_resize_computes_the_same():
    """Skipping torchvision's resize by exactly 1 must not change what the peer computes."""
    images, targets = train_step.make_inputs(1, 64, 96, num_gts=3, num_classes=5)
    torch.manual_seed(0)
    peer = train_step.build_tv_fcos("resnet18", 5, 0.05, (64, 96), targets, torch.device("cpu"))
    original = copy.deepcopy(peer.model)
    del original.transform.resize  # back to the class's resize (scale factor 1 here)
    peer.model.eval()
    original.eval()
    with torch.no_grad():
        ours, ref = peer.model(list(images)), original(list(images))
    assert ours[0]["boxes"].shape[0] > 0
    for k in ("boxes", "scores", "labels"):
        assert torch.equal(ours[0][k], ref[0][k])


def test_train_step_smallest_size():
    out = train_step.main(["--backbones", "resnet18", "--size", "64x64", "--batch", "1", "--warmup", "0",
                           "--rounds", "1", "--breakdown-steps", "1"])
    rows = out["results"][0]["rows"]
    assert [r["model"] for r in rows] == ["ATSS (ours)", "torchvision FCOS", "torchvision RetinaNet"]
    assert rows[0]["train_ratio"] == 1.0 and rows[0]["infer_ratio"] == 1.0
    for r in rows:
        assert r["train_step_s"] > 0 and math.isfinite(r["train_ratio_cpu"])
        assert r["train_peak_MB"] > r["infer_peak_MB"] > 0
        # the classifier prior 0.05 gives post-processing real work: every model fills its 100
        assert r["dets_per_img"] == 100
        assert all(v >= 0 for v in r["phases_s"].values()) and r["phases_s"]["backward"] > 0
        assert r["infer_phases_s"]["backbone_fpn"] > 0 and r["infer_phases_s"]["post"] > 0


def test_train_step_rejects_bad_arguments():
    with pytest.raises(SystemExit):
        train_step.parse_args(["--size", "100x64"])
    with pytest.raises(SystemExit):
        train_step.parse_args(["--models", "tv_fcos,atss"])
    with pytest.raises(SystemExit):
        train_step.parse_args(["--backbones", "resnet51"])


def test_accuracy_smallest_size(tmp_path):
    out = accuracy.main(["--models", "atss,fcos", "--iterations", "2", "--batch", "2", "--train-images", "8",
                         "--val-images", "4", "--image-size", "96", "--eval-batch", "4",
                         "--cache-dir", str(tmp_path / "cache"), "--storage", str(tmp_path / "runs")])
    assert [r["model"] for r in out["rows"]] == ["atss", "fcos"]
    for r in out["rows"]:
        assert 0.0 <= r["AP"] <= 1.0 and r["AP_per_seed"] == [r["AP"]]
    assert out["verdict"].startswith("paper ordering")
    assert (tmp_path / "runs" / "atss_seed0").is_dir()


def test_ordering_verdict():
    def row(m, *aps):
        return {"model": m, "AP_per_seed": list(aps)}

    # one seed: nothing to pair, so it cannot tell, but it says what that seed showed
    verdict = accuracy.ordering_verdict([row("retinanet_a1", 0.30), row("atss", 0.35), row("fcos", 0.32)])
    assert "cannot tell with one seed" in verdict and "it holds" in verdict
    verdict = accuracy.ordering_verdict([row("retinanet_a1", 0.33), row("atss", 0.35), row("fcos", 0.32)])
    assert "cannot tell with one seed" in verdict and "it does not" in verdict and "-1.0 AP" in verdict
    # paired per seed: seed 1 is hard for everyone, but ATSS wins both seeds
    verdict = accuracy.ordering_verdict([row("atss", 0.30, 0.10), row("fcos", 0.28, 0.05)])
    assert "holds in every seed" in verdict and "in 2/2 seeds" in verdict
    verdict = accuracy.ordering_verdict([row("atss", 0.30, 0.04), row("fcos", 0.28, 0.05)])
    assert "holds on the mean only" in verdict and "in 1/2 seeds" in verdict
    assert "does not hold" in accuracy.ordering_verdict([row("atss", 0.30, 0.02), row("fcos", 0.28, 0.05)])
    assert "needs at least two" in accuracy.ordering_verdict([row("atss", 0.3)])
