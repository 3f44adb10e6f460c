"""The rehearsal config, feasibility checks and node plans of pipeline.cluster, without starting Ray:
the derived config passes Ray's own config checks and its bin packing puts every trial on a node of
its class; bad cluster configs are refused (exit 2) before anything starts."""
from __future__ import annotations

import os
import subprocess
import sys
from functools import partial
from pathlib import Path

import pytest
import yaml

from pipeline.cluster import (
    FAKE_HEAD_NODE_TYPE,
    THROUGHPUT,
    ClusterConfigError,
    ClusterSpec,
    InfeasibleTrialError,
    PlannedTrial,
    check_gpu_node_types,
    check_trials,
    node_plan,
    parse_node_prices,
    rehearsal_config,
    throughput_for,
)
from pipeline.resources import (
    NODE_CLASSES,
    all_gpu_plans,
    compute_device,
    cpu_plan,
    declared_cpu_scale,
    plan_for,
    torch_backend,
)

REPO = Path(__file__).resolve().parents[1]
CONFIGS = {"aws": REPO / "cluster" / "aws.yaml", "gcp": REPO / "cluster" / "gcp.yaml"}


def _spec(cloud: str, **kw) -> ClusterSpec:
    return ClusterSpec.from_yaml(CONFIGS[cloud], **kw)


def _edited(tmp_path: Path, cloud: str, edit) -> Path:
    config = yaml.safe_load(CONFIGS[cloud].read_text())
    config.pop("metadata")  # its prices name the node types an edit may remove
    edit(config)
    path = tmp_path / f"{cloud}-edited.yaml"
    path.write_text(yaml.safe_dump(config))
    return path


@pytest.mark.parametrize("cloud", sorted(CONFIGS))
def test_rehearsal_keeps_the_node_types_and_scales_only_cpus(cloud):
    spec = _spec(cloud)
    r = rehearsal_config(spec, gcs_address="127.0.0.1:6379", cores=2, idle_timeout_s=20)
    types = r.config["available_node_types"]
    assert set(types) == {FAKE_HEAD_NODE_TYPE, *spec.workers}
    assert r.cpu_scale == pytest.approx(2 / max(t.cpus for t in spec.workers.values()))
    for name, real in spec.workers.items():
        local = types[name]
        assert local["max_workers"] == real.max_workers and local["min_workers"] == real.min_workers
        assert local.get("priority") == real.priority
        for key, value in real.resources.items():
            if key != "CPU":  # GPUs, gpu_1x/gpu_8x, accelerator_type:* exactly as in the cloud config
                assert local["resources"][key] == value, (name, key)
        assert 1 <= local["resources"]["CPU"] <= 2
        assert local["resources"]["CPU"] >= real.cpus * r.cpu_scale
        if real.idle_timeout_s is not None:  # gpu8: half the global timeout in both
            assert local["idle_timeout_s"] / (r.config["idle_timeout_minutes"] * 60) == pytest.approx(
                real.idle_timeout_s / (spec.idle_timeout_minutes * 60), rel=0.1)
    assert r.config["idle_timeout_minutes"] * 60 == pytest.approx(20)
    assert r.config["max_workers"] == spec.max_workers
    assert r.env == {"ATSS_TRIAL_DEVICE": "gpu", "ATSS_COMPUTE_DEVICE": "cpu", "ATSS_CPU_SCALE": repr(r.cpu_scale)}
    # Ray's own checks of an autoscaling config (what the autoscaler runs at start).
    from ray.autoscaler._private.util import prepare_config, validate_config

    validate_config(prepare_config(r.config))


def _ray_places(types: dict, head: str, demand: list[dict]) -> dict:
    """Ray's autoscaler bin packing: which node types it launches for a demand."""
    from ray.autoscaler._private.node_provider_availability_tracker import NodeAvailabilitySummary
    from ray.autoscaler._private.resource_demand_scheduler import _default_utilization_scorer, get_nodes_for

    scorer = partial(_default_utilization_scorer,
                     node_availability_summary=NodeAvailabilitySummary(node_availabilities={}))
    to_add, unfulfilled = get_nodes_for(types, {}, head, 10, demand, scorer)
    assert not unfulfilled, f"no node type can hold {unfulfilled}"
    return dict(to_add)


@pytest.mark.parametrize("cloud", sorted(CONFIGS))
def test_every_scaled_trial_lands_on_a_node_of_its_class_in_the_rehearsal(cloud):
    r = rehearsal_config(_spec(cloud), gcs_address="127.0.0.1:6379")
    types = r.config["available_node_types"]
    for label, plan in all_gpu_plans().items():
        scaled = plan.scale_cpus(r.cpu_scale)
        assert scaled.num_workers == plan.num_workers and scaled.resources_per_worker()["GPU"] == 1
        launched = _ray_places(types, FAKE_HEAD_NODE_TYPE, scaled.node_demand())
        assert sum(launched.values()) == 1, (label, launched)
        (name,) = launched
        token = NODE_CLASSES[plan.node_class].custom_resource
        assert token in types[name]["resources"], (label, name)
        assert name.endswith("_spot"), f"{label}: spot first (priority), got {name}"


def test_scale_cpus_keeps_a_trials_share_of_its_node():
    big = plan_for("X-64x4d-DCN")
    scaled = big.scale_cpus(2 / 96)
    assert scaled.cpus_per_worker == pytest.approx(10 * 2 / 96, abs=1e-4)
    assert scaled.cpus_per_worker * 1e4 == int(round(scaled.cpus_per_worker * 1e4))  # Ray's 1e-4 unit
    assert scaled.cpus_per_worker >= 10 * 2 / 96  # rounded up, never down
    assert scaled.node_demand()[0]["CPU"] <= 2
    assert big.scale_cpus(1) is big
    with pytest.raises(ValueError, match="CPU scale"):
        big.scale_cpus(0)
    assert declared_cpu_scale({}) == 1.0
    assert declared_cpu_scale({"ATSS_CPU_SCALE": "0.25"}) == 0.25
    with pytest.raises(ValueError, match="ATSS_CPU_SCALE"):
        declared_cpu_scale({"ATSS_CPU_SCALE": "two"})


def test_compute_device_is_explicit_never_a_silent_fallback():
    assert compute_device(use_gpu=True, cuda_available=True, env={}) == "cuda"
    assert compute_device(use_gpu=False, cuda_available=False, env={}) == "cpu"
    assert compute_device(use_gpu=True, cuda_available=False, env={"ATSS_COMPUTE_DEVICE": "cpu"}) == "cpu"
    with pytest.raises(RuntimeError, match="ATSS_COMPUTE_DEVICE=cpu"):
        compute_device(use_gpu=True, cuda_available=False, env={})
    with pytest.raises(ValueError, match="ATSS_COMPUTE_DEVICE"):
        compute_device(use_gpu=True, cuda_available=True, env={"ATSS_COMPUTE_DEVICE": "tpu"})
    assert torch_backend(True, env={}) == "nccl"
    assert torch_backend(True, env={"ATSS_COMPUTE_DEVICE": "cpu"}) == "gloo"
    assert torch_backend(False, env={}) == "gloo"


# ----------------------------------------------------------------------------------------------
# bad cluster configs
# ----------------------------------------------------------------------------------------------
def test_no_gpu_node_type_is_refused(tmp_path):
    path = _edited(tmp_path, "aws", lambda c: c.update(available_node_types={
        "head": c["available_node_types"]["head"],
        "cpu": {"resources": {"CPU": 16}, "node_config": {}, "max_workers": 4}}))
    with pytest.raises(ClusterConfigError, match=r"no GPU node type.*cpu \(CPU 16\)"):
        check_gpu_node_types(ClusterSpec.from_yaml(path))


def test_a_node_type_too_small_for_the_largest_trial_is_refused_by_name(tmp_path):
    def shrink(c):
        c["available_node_types"]["gpu8_ondemand"]["resources"]["CPU"] = 64
    path = _edited(tmp_path, "aws", shrink)
    with pytest.raises(ClusterConfigError, match=r"node type gpu8_ondemand .*CPU 64.*cannot hold the largest "
                                                 r"gpu8 trial .*CPU 80, GPU 8, gpu_8x 8"):
        rehearsal_config(ClusterSpec.from_yaml(path), gcs_address="127.0.0.1:1")


def test_a_node_class_without_node_type_is_refused(tmp_path):
    path = _edited(tmp_path, "gcp", lambda c: [c["available_node_types"].pop(k) for k in ("gpu8_spot", "gpu8_ondemand")])
    with pytest.raises(ClusterConfigError, match=r"no node type of class gpu8 \(resource gpu_8x\)"):
        check_gpu_node_types(ClusterSpec.from_yaml(path))


def test_bad_prices_and_files_name_what_is_wrong(tmp_path):
    with pytest.raises(ClusterConfigError, match="no such file"):
        ClusterSpec.from_yaml(tmp_path / "missing.yaml")
    with pytest.raises(ClusterConfigError, match=r"node price for \['gpu9'\]"):
        _spec("aws", prices={"gpu9": 1.0})
    with pytest.raises(ClusterConfigError, match="--node-price 'gpu8_spot'"):
        parse_node_prices(["gpu8_spot"])
    assert parse_node_prices(["gpu8_spot=12.5"]) == {"gpu8_spot": 12.5}


def _module(*args) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "pipeline.cluster", *args], cwd=REPO, capture_output=True,
                          text=True, timeout=120)


def test_module_cli_exit_codes(tmp_path):
    out = tmp_path / "cfg.yaml"
    bad = _module("rehearsal", "--like", "azure", "--gcs-address", "127.0.0.1:1", "--out", str(out))
    assert bad.returncode == 2 and "--like 'azure': unknown; use one of aws, gcp" in bad.stderr
    assert not out.exists()
    good = _module("rehearsal", "--like", "gcp", "--gcs-address", "127.0.0.1:1", "--out", str(out))
    assert good.returncode == 0, good.stderr
    assert "ATSS_COMPUTE_DEVICE=cpu" in good.stdout.splitlines()
    assert yaml.safe_load(out.read_text())["available_node_types"]["gpu8_spot"]["resources"]["GPU"] == 8


@pytest.mark.parametrize("like, message", [
    ("azure", "--like 'azure': unknown"),
    ("NOGPU", "no GPU node type"),
])
def test_local_sh_refuses_bad_like_before_starting(tmp_path, like, message):
    if like == "NOGPU":
        like = str(_edited(tmp_path, "aws", lambda c: c.update(available_node_types={
            "head": c["available_node_types"]["head"]})))
    state = Path("/tmp") / f"atss-bad-{os.getpid()}"
    env = {**os.environ, "ATSS_RAY_STATE_DIR": str(state)}
    try:
        done = subprocess.run([str(REPO / "cluster" / "local.sh"), "start", "--like", like], env=env,
                              capture_output=True, text=True, timeout=120)
        assert done.returncode == 2, done.stdout + done.stderr
        assert message in done.stderr
        assert not (state / "ray.pid").exists(), "nothing may start"
    finally:
        subprocess.run(["rm", "-rf", str(state)])


# ----------------------------------------------------------------------------------------------
# trials against node types, node plans
# ----------------------------------------------------------------------------------------------
def test_infeasible_trial_names_the_trial_its_ask_and_the_largest_node_type():
    spec = _spec("aws")
    too_big = plan_for("X-64x4d-DCN", cpus_per_worker=12)  # 96 CPUs fit; now make the node smaller
    assert check_trials({"ok": too_big}, spec)["ok"].name == "gpu8_spot"
    small = ClusterSpec.from_dict({
        "head_node_type": "head", "available_node_types": {
            "head": {"resources": {"CPU": 8}, "node_config": {}},
            "gpu8_spot": {"resources": {"CPU": 64, "GPU": 8, "gpu_8x": 8, "accelerator_type:A100": 1},
                          "node_config": {}, "max_workers": 2}}}, source="small.yaml")
    with pytest.raises(InfeasibleTrialError) as e:
        check_trials({"t03_x101": plan_for("X-64x4d-DCN")}, small)
    msg = str(e.value)
    assert "trial t03_x101" in msg and "8 worker(s) x (CPU 10, GPU 1, gpu_8x 1)" in msg
    assert "CPU 80, GPU 8, gpu_8x 8" in msg and "largest node type is gpu8_spot" in msg and "CPU 64" in msg


def test_node_plan_counts_peak_nodes_gpu_hours_and_cost():
    spec = _spec("aws")
    trials = [PlannedTrial(f"k{k}", plan_for("R-50"), 1000) for k in range(14)]
    trials.append(PlannedTrial("x101", plan_for("X-101-64x4d"), 1000))
    plan = node_plan(trials, spec)
    # 12 spot gpu1 nodes (max_workers), the other 2 R-50 trials on on-demand; one gpu8 node.
    assert plan.peak_nodes["gpu1_spot"] == 12 and plan.peak_nodes["gpu1_ondemand"] == 2
    assert plan.peak_nodes["gpu8_spot"] == 1 and plan.peak_nodes["gpu8_ondemand"] == 0
    r50 = throughput_for("resnet50", False, "L40S")
    hours = 1000 * 16 / r50.images_per_s_per_gpu / 3600
    row = next(r for r in plan.rows if r["trial"] == "k0")
    assert row["hours"] == pytest.approx(hours) and row["gpu_hours"] == pytest.approx(hours)
    assert row["cost"] == pytest.approx(hours * spec.workers["gpu1_spot"].price_per_hour)
    idle = 12 * 600 / 3600 + 2 * 600 / 3600 + 300 / 3600
    assert plan.idle_hours == pytest.approx(idle)
    assert plan.cost == pytest.approx(sum(h * spec.workers[n].price_per_hour for n, h in plan.node_hours.items()))
    assert plan.gpu_hours == pytest.approx(sum(h * spec.workers[n].gpus for n, h in plan.node_hours.items()))
    text = plan.render()
    assert "peak nodes: gpu1_spot 12, gpu1_ondemand 2, gpu8_spot 1" in text and "(estimate)" in text
    # At most 2 trials at a time: 2 gpu1 nodes, reused wave after wave.
    limited = node_plan(trials, spec, max_concurrent=2)
    assert limited.peak_nodes["gpu1_spot"] == 2 and limited.peak_nodes["gpu1_ondemand"] == 0
    assert limited.wall_hours > plan.wall_hours
    # A flag price replaces the config's; no price at all makes the cost unknown, not zero.
    flagged = node_plan(trials[:1], _spec("aws", prices={"gpu1_spot": 100.0}))
    assert flagged.cost == pytest.approx(100.0 * sum(flagged.node_hours.values()))
    config = yaml.safe_load(CONFIGS["aws"].read_text())
    config.pop("metadata")
    unpriced = node_plan(trials[:1], ClusterSpec.from_dict(config, "aws-no-prices"))
    assert unpriced.cost is None and unpriced.missing_prices == ["gpu1_spot"]
    assert "--node-price" in unpriced.render()


def test_throughput_table_covers_every_plan_with_a_source():
    for cloud in CONFIGS:
        spec = _spec(cloud)
        for label, plan in all_gpu_plans().items():
            node = check_trials({label: plan}, spec)[label]
            fig = throughput_for(plan.backbone, plan.dcn, node.accelerator)
            assert fig.images_per_s_per_gpu > 0 and fig.source
    assert all(row.source and (row.estimate or "measured" in row.source) for row in THROUGHPUT)
    assert all("estimate" in row.source for row in THROUGHPUT if row.estimate)
    with pytest.raises(ValueError, match="no throughput figure for resnet50 on H100"):
        throughput_for("resnet50", False, "H100")


def test_cpu_plans_fit_the_head_or_any_worker():
    spec = _spec("aws")
    assert check_trials({"cpu": cpu_plan(num_workers=2)}, spec)["cpu"].name


def _ablation(*args) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "jobs/ablation.py", "--dry-run", *args], cwd=REPO, capture_output=True,
                          text=True, timeout=600)


def test_ablation_dry_run_with_cluster_prints_the_node_plan():
    done = _ablation("--cluster", "cluster/aws.yaml", "--table", "backbone", "--preset", "atss_r50",
                     "--node-price", "gpu1_spot=1.0")
    assert done.returncode == 0, done.stderr[-3000:]
    out = done.stdout
    assert "node plan on cluster/aws.yaml:" in out
    assert "t00_R-101_s0: gpu1_spot x1" in out and "t01_X-101-32x8d_s0: gpu8_spot x1" in out
    # Two gpu8 spot nodes at most (max_workers): the other two big trials go on-demand at once.
    assert "peak nodes: gpu1_spot 1, gpu8_spot 2, gpu8_ondemand 2" in out
    assert "GPU-h" in out and "cost $" in out and "throughput sources:" in out and "(estimate)" in out


def test_ablation_refuses_a_trial_no_node_type_holds(tmp_path):
    def shrink(c):
        for name in ("gpu8_spot", "gpu8_ondemand"):
            c["available_node_types"][name]["resources"]["CPU"] = 48
    small = _edited(tmp_path, "aws", shrink)
    done = _ablation("--cluster", str(small), "--table", "backbone", "--preset", "atss_r50")
    assert done.returncode == 2
    assert "trial t01_X-101-32x8d_s0" in done.stderr and "8 worker(s) x (CPU 10, GPU 1, gpu_8x 1)" in done.stderr
    assert "largest node type is gpu8_spot" in done.stderr
    no_cluster = _ablation("--node-price", "gpu8_spot=3", "--smoke")
    assert no_cluster.returncode == 2 and "--node-price needs --cluster" in no_cluster.stderr
