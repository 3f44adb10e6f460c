"""Backbone -> trial resources mapping (pipeline.resources)."""
from __future__ import annotations

import pytest

from pipeline.resources import (
    HEAD_NODE_RESOURCE,
    NODE_CLASSES,
    TrialResources,
    cpu_plan,
    parse_backbone,
    plan_for,
    resolve_device,
    table8_plans,
)

# The paper's Table 8 ATSS rows -> (node class, workers, images per GPU, custom resource).
TABLE8 = {
    "R-101": ("gpu1", 1, 16, "gpu_1x"),
    "X-101-32x8d": ("gpu8", 8, 2, "gpu_8x"),
    "X-101-64x4d": ("gpu8", 8, 2, "gpu_8x"),
    "R-101-DCN": ("gpu8", 8, 2, "gpu_8x"),
    "X-32x8d-DCN": ("gpu8", 8, 2, "gpu_8x"),
    "X-64x4d-DCN": ("gpu8", 8, 2, "gpu_8x"),
}


@pytest.mark.parametrize("row", sorted(TABLE8))
def test_table8_backbones_get_their_node_class(row):
    node_class, workers, per_gpu, token = TABLE8[row]
    plan = table8_plans()[row]
    assert plan.node_class == node_class
    assert plan.num_workers == workers
    assert plan.batch_per_worker == per_gpu
    assert plan.global_batch == 16  # the paper's batch, whatever the GPU count (ATSS.md 5.1)
    kw = plan.scaling_config_kwargs()
    assert kw["num_workers"] == workers and kw["use_gpu"] is True
    assert kw["resources_per_worker"]["GPU"] == 1
    assert kw["resources_per_worker"][token] == 1
    other = {"gpu_1x", "gpu_8x"} - {token}
    assert not other & set(kw["resources_per_worker"])
    # All workers of a multi-GPU trial share one node.
    assert kw["placement_strategy"] == ("STRICT_PACK" if workers > 1 else "PACK")
    assert plan.total_resources()["GPU"] == workers
    assert plan.total_resources()[token] == workers


def test_big_models_only_fit_the_eight_gpu_node():
    """What the trial holds must fit one gpu8 node and not fit a gpu1 node."""
    gpu1, gpu8 = NODE_CLASSES["gpu1"], NODE_CLASSES["gpu8"]
    for row in ("X-64x4d-DCN", "X-101-32x8d", "R-101-DCN"):
        total = table8_plans()[row].total_resources()
        assert total["GPU"] == gpu8.gpus_per_node
        assert total["CPU"] <= gpu8.cpus_per_node
        assert total["gpu_8x"] <= gpu8.gpus_per_node
        assert total.get(gpu1.custom_resource, 0) == 0
    r50 = plan_for("resnet50").total_resources()
    assert r50["GPU"] == 1 and r50["gpu_1x"] == 1 and r50["CPU"] <= gpu1.cpus_per_node
    assert NODE_CLASSES["gpu8"].accelerator_type == "A100"
    assert plan_for("X-64x4d-DCN").min_gpu_memory_gb == 40
    assert plan_for("R-50").min_gpu_memory_gb == 48


@pytest.mark.parametrize("name, expected", [
    ("resnet50", ("resnet50", False)),
    ("R-50", ("resnet50", False)),
    ("R-101-DCN", ("resnet101", True)),
    ("dcnv2_R_101", ("resnet101", True)),
    ("X-101-64x4d", ("resnext101_64x4d", False)),
    ("X-32x8d-DCN", ("resnext101_32x8d", True)),
    ("resnext101_64x4d", ("resnext101_64x4d", False)),
    ("ResNeXt101_32x8d", ("resnext101_32x8d", False)),
])
def test_parse_backbone_accepts_paper_and_torchvision_names(name, expected):
    assert parse_backbone(name) == expected


def test_dcn_flag_and_small_backbones():
    assert plan_for("resnet50", dcn=True).node_class == "gpu8"
    assert plan_for("resnet50").node_class == "gpu1"
    for name in ("resnet18", "resnet34"):
        assert plan_for(name).node_class == "gpu1"
        assert plan_for(name, dcn=True).node_class == "gpu1"


@pytest.mark.parametrize("bad", ["resnet152", "vgg16", "", "X-101"])
def test_unknown_backbone_is_named_in_the_error(bad):
    with pytest.raises(ValueError, match="backbone"):
        plan_for(bad)


def test_invalid_plans_are_rejected_with_the_reason():
    with pytest.raises(ValueError, match="do not fit one gpu1 node"):
        plan_for("resnet50", num_workers=2)
    with pytest.raises(ValueError, match="exceed"):
        plan_for("X-64x4d-DCN", cpus_per_worker=16)
    with pytest.raises(ValueError, match="unknown node_class"):
        plan_for("resnet50", node_class="gpu4")
    with pytest.raises(ValueError, match="cannot ask for GPUs"):
        TrialResources("resnet18", False, 1, 1, 1, 2, node_class=None)
    with pytest.raises(ValueError, match="batch_per_worker"):
        plan_for("resnet50", batch_per_worker=0)
    # Overrides that stay valid are applied.
    assert plan_for("X-64x4d-DCN", batch_per_worker=1).global_batch == 8


def test_cpu_plan_has_no_gpu_and_no_node_class_token():
    plan = cpu_plan(num_workers=2, cpus_per_worker=0.5)
    kw = plan.scaling_config_kwargs()
    assert kw == {"num_workers": 2, "use_gpu": False, "resources_per_worker": {"CPU": 0.5},
                  "placement_strategy": "PACK"}
    assert plan.node_class is None and plan.accelerator_type is None


def test_trial_driver_is_pinned_to_the_head_without_holding_worker_resources():
    for plan in (*table8_plans().values(), cpu_plan()):
        req = plan.trial_resources()
        assert set(req) == {HEAD_NODE_RESOURCE} and 0 < req[HEAD_NODE_RESOURCE] < 1


def test_scaling_config_is_accepted_by_ray_train():
    sc = plan_for("X-64x4d-DCN").scaling_config()
    assert sc.num_workers == 8 and sc.use_gpu
    assert sc.total_resources["GPU"] == 8 and sc.total_resources["gpu_8x"] == 8
    assert cpu_plan().scaling_config().total_resources["CPU"] == 1


def test_resolve_device(monkeypatch):
    monkeypatch.delenv("ATSS_TRIAL_DEVICE", raising=False)
    assert resolve_device("gpu") == "gpu" and resolve_device("cpu") == "cpu"
    assert resolve_device("auto", cluster_resources={"CPU": 2.0}) == "cpu"
    assert resolve_device("auto", cluster_resources={"CPU": 8.0, "GPU": 1.0}) == "gpu"
    # An autoscaling cluster starts with no GPU node; its head declares the device.
    monkeypatch.setenv("ATSS_TRIAL_DEVICE", "gpu")
    assert resolve_device("auto", cluster_resources={"CPU": 8.0}) == "gpu"
    monkeypatch.setenv("ATSS_TRIAL_DEVICE", "tpu")
    with pytest.raises(ValueError, match="ATSS_TRIAL_DEVICE"):
        resolve_device("auto", cluster_resources={})
    with pytest.raises(ValueError, match="device"):
        resolve_device("cuda")


def test_to_dict_is_flat_and_complete():
    d = plan_for("X-64x4d-DCN").to_dict()
    assert d["backbone"] == "resnext101_64x4d" and d["dcn"] is True
    assert d["global_batch"] == 16 and d["accelerator_type"] == "A100"
    assert all(not isinstance(v, dict) for v in d.values())
