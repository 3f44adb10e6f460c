"""Cluster configs: the launcher YAMLs pass Ray's own `ray up` checks, the KubeRay manifests turn into
the autoscaling config Ray derives from them, and both offer exactly the node classes that
pipeline.resources asks for. No cloud is contacted."""
from __future__ import annotations

import shlex
from functools import partial
from pathlib import Path

import pytest
import yaml

from pipeline.ablation.plan import TrialConfig
from pipeline.resources import NODE_CLASSES, cpu_plan, plan_for, table8_plans

REPO = Path(__file__).resolve().parents[1]
CLUSTER = REPO / "cluster"
LAUNCHER_CONFIGS = {"aws": CLUSTER / "aws.yaml", "gcp": CLUSTER / "gcp.yaml"}
BUCKET_SCHEME = {"aws": "s3://", "gcp": "gs://"}
TOKENS = {c.custom_resource: c for c in NODE_CLASSES.values()}


def _prepared(path: Path) -> dict:
    """What `ray up` does before it contacts the cloud: merge defaults, then the schema check."""
    from ray.autoscaler._private.util import prepare_config, validate_config

    config = prepare_config(yaml.safe_load(path.read_text()))
    validate_config(config)
    return config


def _class_of(node_type: dict) -> str | None:
    tokens = [t for t in TOKENS if t in node_type["resources"]]
    assert len(tokens) <= 1, f"a node type advertises two node classes: {tokens}"
    return TOKENS[tokens[0]].name if tokens else None


def _plan_demand(plan) -> dict:
    """The autoscaler's view of a trial: STRICT_PACK placement groups become one summed bundle."""
    per_worker = plan.resources_per_worker()
    if plan.scaling_config_kwargs()["placement_strategy"] == "STRICT_PACK":
        return [{k: v * plan.num_workers for k, v in per_worker.items()}]
    return [dict(per_worker) for _ in range(plan.num_workers)]


def _node_types_to_launch(node_types: dict, head: str, demand: list[dict]) -> dict:
    from ray.autoscaler._private.node_provider_availability_tracker import NodeAvailabilitySummary
    from ray.autoscaler._private.resource_demand_scheduler import (
        _default_utilization_scorer,
        get_nodes_for,
    )

    scorer = partial(_default_utilization_scorer,
                     node_availability_summary=NodeAvailabilitySummary(node_availabilities={}))
    to_add, unfulfilled = get_nodes_for(node_types, {}, head, 10, demand, scorer)
    assert not unfulfilled, f"no node type can hold {unfulfilled}"
    return dict(to_add)


@pytest.mark.parametrize("cloud", sorted(LAUNCHER_CONFIGS))
def test_launcher_config_passes_rays_validation(cloud):
    config = _prepared(LAUNCHER_CONFIGS[cloud])
    assert config["provider"]["type"] == cloud
    types = config["available_node_types"]
    head = types[config["head_node_type"]]
    assert head["resources"].get("GPU", 0) == 0, "the head is a CPU node"
    assert _class_of(head) is None
    workers = {name: t for name, t in types.items() if name != config["head_node_type"]}
    assert workers and all(t["min_workers"] == 0 for t in workers.values())
    assert all(t["max_workers"] >= 1 for t in workers.values())
    assert config["max_workers"] >= max(t["max_workers"] for t in workers.values())
    assert 0 < config["idle_timeout_minutes"] <= 30


@pytest.mark.parametrize("cloud", sorted(LAUNCHER_CONFIGS))
def test_launcher_offers_every_node_class_as_spot_and_on_demand(cloud):
    config = _prepared(LAUNCHER_CONFIGS[cloud])
    types = config["available_node_types"]
    for node_class in NODE_CLASSES.values():
        members = {n: t for n, t in types.items() if _class_of(t) == node_class.name}
        spot = {n: t for n, t in members.items() if _is_spot(cloud, t["node_config"])}
        on_demand = {n: t for n, t in members.items() if n not in spot}
        assert spot and on_demand, f"{node_class.name}: needs spot and on-demand types, got {sorted(members)}"
        for t in members.values():
            res = t["resources"]
            assert res["GPU"] == node_class.gpus_per_node
            assert res[node_class.custom_resource] == node_class.gpus_per_node
            assert res["CPU"] >= node_class.cpus_per_node
            if node_class.accelerator_type:
                assert res[f"accelerator_type:{node_class.accelerator_type}"] == 1
        # Spot first: the v2 autoscaler ranks equal shapes by priority.
        assert min(t["priority"] for t in spot.values()) > max(t["priority"] for t in on_demand.values())


def _is_spot(cloud: str, node_config: dict) -> bool:
    if cloud == "aws":
        return node_config.get("InstanceMarketOptions", {}).get("MarketType") == "spot"
    return node_config.get("scheduling", {}).get("provisioningModel") == "SPOT"


@pytest.mark.parametrize("cloud", sorted(LAUNCHER_CONFIGS))
def test_autoscaler_launches_the_right_node_class_for_each_backbone(cloud):
    """Ray's own bin packing over the node types: big models -> gpu8 only, R-50/101 -> gpu1."""
    config = _prepared(LAUNCHER_CONFIGS[cloud])
    types, head = config["available_node_types"], config["head_node_type"]
    for row, plan in {**table8_plans(), "R-50": plan_for("R-50")}.items():
        launched = _node_types_to_launch(types, head, _plan_demand(plan))
        assert sum(launched.values()) == 1, (row, launched)
        (name,) = launched
        assert _class_of(types[name]) == plan.node_class, (row, launched)
        # ...and no node type of another class could have held it.
        for other, t in types.items():
            if _class_of(t) != plan.node_class:
                assert not _fits(t["resources"], _plan_demand(plan)[0]), (row, other)


def _fits(node: dict, demand: dict) -> bool:
    return all(node.get(k, 0) >= v for k, v in demand.items())


@pytest.mark.parametrize("cloud", sorted(LAUNCHER_CONFIGS))
def test_launcher_commands(cloud):
    config = _prepared(LAUNCHER_CONFIGS[cloud])
    scheme = BUCKET_SCHEME[cloud]
    # The project is installed on every node from the checkout `ray up` syncs.
    assert config["file_mounts"]["~/atss-ray"] == "."
    assert any(shlex.split(c)[:2] == ["pip", "install"] and "~/atss-ray" in c
               for c in config["setup_commands"])
    assert ".gitignore" in config["rsync_filter"]
    # MLflow server on the head: SQLite backend on the head's disk, artifacts in the bucket.
    head_cmds = " ".join(config["head_start_ray_commands"])
    assert "mlflow server" in head_cmds
    assert "--backend-store-uri sqlite:////home/ray/mlflow/mlflow.db" in head_cmds
    assert f"--artifacts-destination {scheme}" in head_cmds
    assert "/home/ray/mlflow" in " ".join(config["docker"]["head_run_options"])
    # Ray head: autoscaler, token auth, dashboard on loopback, GPU plans declared for jobs.
    ray_start = next(c for c in config["head_start_ray_commands"] if "ray start --head" in c)
    for needle in ("--autoscaling-config=~/ray_bootstrap_config.yaml", "RAY_AUTH_MODE=token",
                   "--dashboard-host=127.0.0.1", "ATSS_TRIAL_DEVICE=gpu", "MLFLOW_TRACKING_URI=http://",
                   "RAY_TRAIN_WORKER_GROUP_START_TIMEOUT_S="):
        assert needle in ray_start, needle
    worker_start = next(c for c in config["worker_start_ray_commands"] if "ray start" in c)
    assert "--address=$RAY_HEAD_IP:6379" in worker_start
    assert "RAY_AUTH_MODE=token" in worker_start
    assert "MLFLOW_TRACKING_URI=http://$RAY_HEAD_IP:5000" in worker_start
    # Every node gets the same auth token file the user's CLI uses.
    assert config["file_mounts"]["~/.ray/auth_token"] == "~/.ray/auth_token"
    # Python 3.11 and the Ray version the project pins.
    import ray

    for image in (config["docker"]["head_image"], config["docker"]["worker_image"]):
        assert image.startswith(f"rayproject/ray:{ray.__version__}-py311"), image


def _kuberay_docs() -> dict:
    docs = {}
    for path in sorted((CLUSTER / "kuberay").glob("*.yaml")):
        for doc in yaml.safe_load_all(path.read_text()):
            assert doc and "kind" in doc and "apiVersion" in doc, path
            docs[(doc["kind"], doc["metadata"]["name"])] = doc
    return docs


def test_kuberay_raycluster_gives_the_autoscaler_the_same_node_classes():
    from ray.autoscaler._private.kuberay.autoscaling_config import (
        _derive_autoscaling_config_from_ray_cr,
    )

    docs = _kuberay_docs()
    cr = docs[("RayCluster", "atss-ray")]
    assert cr["apiVersion"] == "ray.io/v1" and cr["spec"]["enableInTreeAutoscaling"] is True
    # Token auth as on the launcher's cluster; KubeRay gives the token to every Ray container.
    assert cr["spec"]["authOptions"] == {"mode": "token", "secretName": "atss-ray-auth"}
    # Ray's own translation of the CR (runs validate_config too).
    config = _derive_autoscaling_config_from_ray_cr(cr)
    types = config["available_node_types"]
    assert types["headgroup"]["resources"].get("GPU", 0) == 0
    assert {_class_of(types[g]) for g in ("gpu1", "gpu8")} == {"gpu1", "gpu8"}
    for group in ("gpu1", "gpu8"):
        node_class = NODE_CLASSES[group]
        res = types[group]["resources"]
        assert res["GPU"] == node_class.gpus_per_node
        assert res[node_class.custom_resource] == node_class.gpus_per_node
        assert types[group]["min_workers"] == 0 and types[group]["max_workers"] >= 1
    assert 0 < config["idle_timeout_minutes"] <= 30
    for row, plan in {**table8_plans(), "R-50": plan_for("R-50")}.items():
        launched = _node_types_to_launch(types, "headgroup", _plan_demand(plan))
        assert list(launched) == [plan.node_class], (row, launched)
    # The MLflow server runs beside the Ray head and is reachable through the head service.
    head_pod = cr["spec"]["headGroupSpec"]["template"]["spec"]
    mlflow = next(c for c in head_pod["containers"] if c["name"] == "mlflow")
    assert "mlflow server" in " ".join(mlflow["args"])
    assert "--artifacts-destination s3://" in " ".join(mlflow["args"])
    assert head_pod["containers"][0]["name"] == "ray-head"  # KubeRay: Ray container first
    assert 5000 in [p["containerPort"] for p in head_pod["containers"][0]["ports"]]
    head_env = {e["name"]: e.get("value") for e in head_pod["containers"][0]["env"]}
    assert head_env["ATSS_TRIAL_DEVICE"] == "gpu"
    assert head_env["MLFLOW_TRACKING_URI"] == "http://atss-ray-head-svc:5000"
    # Every volume claim the pods mount is part of the manifests.
    claims = {name for kind, name in docs if kind == "PersistentVolumeClaim"}
    for spec in [head_pod] + [g["template"]["spec"] for g in cr["spec"]["workerGroupSpecs"]]:
        for vol in spec.get("volumes", []):
            if "persistentVolumeClaim" in vol:
                assert vol["persistentVolumeClaim"]["claimName"] in claims


def test_kuberay_rayjob_runs_the_k_ablation_on_that_cluster():
    docs = _kuberay_docs()
    job = docs[("RayJob", "atss-k-ablation")]
    assert job["apiVersion"] == "ray.io/v1"
    assert job["spec"]["clusterSelector"] == {"ray.io/cluster": "atss-ray"}
    argv = shlex.split(job["spec"]["entrypoint"])
    assert argv[:2] == ["python", "/home/ray/atss-ray/jobs/ablation.py"]
    assert argv[argv.index("--table") + 1] == "k"
    assert [int(v) for v in argv[argv.index("--values") + 1].split(",")] == [3, 5, 7, 9, 11, 13, 15, 17, 19]
    assert argv[argv.index("--storage-path") + 1].startswith("s3://")
    # A reclaimed spot node restarts the trial from its last checkpoint instead of failing it.
    assert int(argv[argv.index("--max-failures") + 1]) >= 1
    env = yaml.safe_load(job["spec"]["runtimeEnvYAML"])["env_vars"]
    assert float(env["RAY_TRAIN_WORKER_GROUP_START_TIMEOUT_S"]) >= 600


def _coco_root(root: Path) -> Path:
    """A COCO-layout root with a tiny annotation file per split (the dry run parses them)."""
    import json

    (root / "annotations").mkdir(parents=True)
    for split in ("train2017", "val2017"):
        (root / split).mkdir()
        (root / "annotations" / f"instances_{split}.json").write_text(json.dumps({
            "images": [{"id": 1, "file_name": "1.jpg", "height": 480, "width": 640}],
            "annotations": [{"id": 1, "image_id": 1, "category_id": 1, "bbox": [10, 10, 50, 40], "area": 2000,
                             "iscrowd": 0}],
            "categories": [{"id": 1, "name": "person"}, {"id": 3, "name": "car"}]}))
    return root


def test_rayjob_entrypoint_is_accepted_by_the_job_and_plans_gpu1_trials(tmp_path):
    """The RayJob's command line, dry-run by the real jobs/ablation.py on a declared GPU cluster (its COCO
    root, which only the cluster has, replaced by a small one here: the dry run checks the data)."""
    import json
    import os
    import subprocess
    import sys

    job = _kuberay_docs()[("RayJob", "atss-k-ablation")]
    argv = shlex.split(job["spec"]["entrypoint"])
    argv[:2] = [sys.executable, str(REPO / "jobs" / "ablation.py")]
    data = argv.index("--data") + 1
    assert argv[data].startswith("coco:")
    argv[data] = f"coco:{_coco_root(tmp_path / 'coco')}"
    env = {**os.environ, "ATSS_TRIAL_DEVICE": "gpu"}
    out = subprocess.run([*argv, "--dry-run", "--json"], cwd=REPO, env=env, capture_output=True,
                         text=True, timeout=300)
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    trials = json.loads(out.stdout.strip().splitlines()[-1])
    assert len(trials) == 9
    for trial in trials:
        res = TrialConfig.from_dict(trial).resources  # what the trial will ask Ray for
        assert res.node_class == "gpu1" and res.global_batch == 16
        assert res.resources_per_worker() == plan_for("R-50").resources_per_worker()

def test_runtime_env_file_is_a_valid_ray_runtime_env():
    from ray.runtime_env import RuntimeEnv

    env = yaml.safe_load((CLUSTER / "runtime_env.yaml").read_text())
    RuntimeEnv(**env)  # raises on unknown fields
    assert set(env) == {"excludes", "env_vars"}
    assert all(isinstance(v, str) for v in env["env_vars"].values())


def test_cpu_plan_never_needs_a_gpu_node():
    demand = _plan_demand(cpu_plan(num_workers=2))
    config = _prepared(LAUNCHER_CONFIGS["aws"])
    assert all("GPU" not in d and not set(TOKENS) & set(d) for d in demand)
    assert _fits(config["available_node_types"]["head"]["resources"], demand[0])

