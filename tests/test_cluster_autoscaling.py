"""The rehearsal cluster on this machine (`cluster/local.sh start --like aws`): Ray's real autoscaler
launches the AWS config's node types for a sweep's trials, each trial lands on a node of its class,
idle nodes go away, and a trial survives losing its node. Asserted from Ray's state API, the job
API and MLflow (queried in a subprocess that holds the cluster's token), never from log text.

Needs about 10 GB of free memory for the gpu8-class trial (8 Train workers)."""
from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path

import pytest
import yaml

REPO = Path(__file__).resolve().parents[1]
LOCAL_SH = REPO / "cluster" / "local.sh"
RAY = REPO / ".venv" / "bin" / "ray"
if not RAY.exists():
    RAY = Path(shutil.which("ray") or RAY)
IDLE_TIMEOUT_S = 15

pytestmark = [
    pytest.mark.ray,
    pytest.mark.slow,
    pytest.mark.skipif(not RAY.exists(), reason="the ray CLI is not installed (make setup installs it)"),
]


def _free_ports(n: int) -> list[int]:
    socks = []
    try:
        for _ in range(n):
            s = socket.socket()
            s.bind(("127.0.0.1", 0))
            socks.append(s)
        return [s.getsockname()[1] for s in socks]
    finally:
        for s in socks:
            s.close()


def _session_pids(sid: str) -> list[str]:
    out = subprocess.run(["ps", "-e", "-o", "pid=,sid="], capture_output=True, text=True).stdout
    return [line.split()[0] for line in out.splitlines() if line.split()[1:] == [sid]]


@pytest.fixture(scope="module")
def rehearsal():
    state_dir = Path(tempfile.mkdtemp(prefix="atssreh-", dir="/tmp"))
    gcs, dashboard, agent, client = _free_ports(4)
    env = {k: v for k, v in os.environ.items() if k not in ("RAY_ADDRESS", "RAY_API_SERVER_ADDRESS")}
    env.update(ATSS_RAY_STATE_DIR=str(state_dir), RAY=str(RAY))
    t0 = time.monotonic()
    start = subprocess.run(
        [str(LOCAL_SH), "start", "--like", "aws", "--idle-timeout", str(IDLE_TIMEOUT_S), "--port", str(gcs),
         "--dashboard-port", str(dashboard), "--agent-port", str(agent), "--client-port", str(client),
         "--object-store-mb", "200", "--timeout", "240"],
        env=env, capture_output=True, text=True, timeout=300)
    sid = (state_dir / "ray.pid").read_text().split()[0] if (state_dir / "ray.pid").exists() else None
    try:
        assert start.returncode == 0, start.stdout + start.stderr
        out = subprocess.run([str(LOCAL_SH), "env"], env=env, capture_output=True, text=True, check=True).stdout
        cli = dict(env)
        for line in out.splitlines():
            key, value = line[len("export "):].split("=", 1)
            cli[key] = value.replace("$PATH", cli.get("PATH", ""))
        print(f"[rehearsal] head up in {time.monotonic() - t0:.0f} s")
        yield {"state_dir": state_dir, "env": cli, "dashboard": dashboard, "gcs": gcs,
               "config": yaml.safe_load((state_dir / "autoscaling.yaml").read_text())}
    finally:
        stop = subprocess.run([str(LOCAL_SH), "stop"], env=env, capture_output=True, text=True, timeout=180)
        left = _session_pids(sid) if sid else []
        if not os.environ.get("ATSS_KEEP_REHEARSAL_STATE"):  # logs for a post-mortem
            shutil.rmtree(state_dir, ignore_errors=True)
        assert stop.returncode == 0, stop.stdout + stop.stderr
        assert not left, f"processes of the rehearsal cluster still running: {left}"


_QUERY = r"""
import json, sys
from ray.job_submission import JobSubmissionClient
from ray.util.state import list_nodes
address, what = sys.argv[1], sys.argv[2]
if what == "nodes":
    print(json.dumps([{"node_id": n.node_id, "state": n.state, "resources": n.resources_total,
                       "start_ms": n.start_time_ms, "end_ms": n.end_time_ms, "message": n.state_message}
                      for n in list_nodes(address=address, detail=True, limit=1000)]))
else:
    info = JobSubmissionClient(address).get_job_info(sys.argv[3])
    print(json.dumps({"status": str(info.status.value), "start_ms": info.start_time, "end_ms": info.end_time}))
"""


def _query(cluster, what: str, *args) -> object:
    done = subprocess.run([sys.executable, "-c", _QUERY, f"http://127.0.0.1:{cluster['dashboard']}", what, *args],
                          env=cluster["env"], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-3000:]
    return json.loads(done.stdout.strip().splitlines()[-1])


def _submit(cluster, tmp_path: Path, name: str, *args) -> tuple[str, str]:
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    submission = f"{name}-{uuid.uuid4().hex[:6]}"
    done = subprocess.run(
        [str(RAY), "job", "submit", "--no-wait", "--submission-id", submission, "--working-dir", ".",
         "--runtime-env", "cluster/runtime_env.yaml", "--",
         "python", "jobs/ablation.py", "--smoke", "--quiet", "--storage-path", str(tmp_path / "results"),
         "--mlflow-uri", uri, "--experiment", name, "--name", name, *args],
        cwd=REPO, env=cluster["env"], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stdout + done.stderr
    return submission, uri


def _wait_job(cluster, submission: str, timeout_s: float = 900) -> dict:
    deadline = time.monotonic() + timeout_s
    while True:
        info = _query(cluster, "job", submission)
        if info["status"] in ("SUCCEEDED", "FAILED", "STOPPED") or time.monotonic() > deadline:
            return info
        time.sleep(5)


def _job_logs(cluster, submission: str) -> str:
    return subprocess.run([str(RAY), "job", "logs", submission], env=cluster["env"], capture_output=True,
                          text=True, timeout=120).stdout[-6000:]


def _children(uri: str, experiment: str) -> list:
    import mlflow

    mlflow.set_tracking_uri(uri)
    runs = mlflow.search_runs(experiment_names=[experiment], output_format="list")
    parents = [r for r in runs if "mlflow.parentRunId" not in r.data.tags]
    assert len(parents) == 1, [r.info.run_name for r in runs]
    return [r for r in runs if r.data.tags.get("mlflow.parentRunId") == parents[0].info.run_id]


def test_trials_land_on_their_node_class_and_idle_nodes_go(rehearsal, tmp_path):
    # One R-50 trial (gpu1: 1 worker x 1 GPU) and one R-50 with DCN (gpu8: 8 workers x 1 GPU,
    # STRICT_PACK), the plans the real sweep makes on AWS; one at a time to bound memory.
    submission, uri = _submit(rehearsal, tmp_path, "rehearsal-e2e", "--space",
                              '{"backbone": "resnet50", "dcn_in_tower": [false, true]}',
                              "--max-concurrent-trials", "1")
    info = _wait_job(rehearsal, submission)
    assert info["status"] == "SUCCEEDED", f"{info}\n{_job_logs(rehearsal, submission)}"

    children = _children(uri, "rehearsal-e2e")
    assert len(children) == 2 and all(r.info.status == "FINISHED" for r in children), \
        [(r.info.run_name, r.info.status) for r in children]
    nodes = {n["node_id"]: n for n in _query(rehearsal, "nodes")}
    types = rehearsal["config"]["available_node_types"]
    seen = {}
    for run in children:
        tags = run.data.tags
        dcn = run.data.params.get("detector.dcn_in_tower") == "True"
        node = nodes[tags["ray.node_id"]]
        assert tags["atss.compute_device"] == "cpu"
        expected = "gpu8" if dcn else "gpu1"
        assert tags["ray.node_type"].startswith(expected + "_"), (run.info.run_name, tags["ray.node_type"])
        # The node Ray knows under that id has the resources of that node type of the config.
        config_resources = {k: float(v) for k, v in types[tags["ray.node_type"]]["resources"].items()}
        for key in ("CPU", "GPU", "gpu_1x", "gpu_8x", "accelerator_type:L40S", "accelerator_type:A100"):
            assert node["resources"].get(key, 0.0) == config_resources.get(key, 0.0), (key, node["resources"])
        seen[expected] = node
    assert set(seen) == {"gpu1", "gpu8"}

    # Both worker nodes go after the idle timeout (Ray's state: DEAD, terminated as idle).
    deadline = time.monotonic() + 8 * IDLE_TIMEOUT_S + 120
    while time.monotonic() < deadline:
        now = {n["node_id"]: n for n in _query(rehearsal, "nodes")}
        if all(now[n["node_id"]]["state"] == "DEAD" for n in seen.values()):
            break
        time.sleep(5)
    for node in seen.values():
        final = now[node["node_id"]]
        assert final["state"] == "DEAD", final
        assert "idle" in (final["message"] or "").lower(), final
    alive_workers = [n for n in now.values() if n["state"] == "ALIVE" and n["resources"].get("GPU")]
    assert not alive_workers

    job_start = info["start_ms"] / 1000
    for cls, node in sorted(seen.items()):
        run = next(r for r in children if r.data.tags["ray.node_id"] == node["node_id"])
        first_step = _metric_history(uri, run.info.run_id, "train/lr")[0].timestamp / 1000
        print(f"[rehearsal] {cls}: trial run created {run.info.start_time / 1000 - job_start:.0f} s after the job "
              f"started, its node up {(node['start_ms'] - run.info.start_time) / 1000:.0f} s later, first "
              f"training iteration {first_step - node['start_ms'] / 1000:.0f} s after that; node ended "
              f"{(node['end_ms'] - node['start_ms']) / 1000:.0f} s after it started")


def _node_pids(node_id: str) -> list[int]:
    """Processes of one simulated node: its raylet, agents and workers all carry its node id
    (the fake provider starts the raylet with RAY_OVERRIDE_NODE_ID_FOR_TESTING=<id>)."""
    marker = f"RAY_OVERRIDE_NODE_ID_FOR_TESTING={node_id}".encode()
    pids = []
    for proc in Path("/proc").iterdir():
        if proc.name.isdigit():
            try:
                if marker in (proc / "environ").read_bytes().split(b"\0"):
                    pids.append(int(proc.name))
            except OSError:
                continue
    return pids


def _metric_history(uri: str, run_id: str, key: str) -> list:
    from mlflow import MlflowClient

    return sorted(MlflowClient(uri).get_metric_history(run_id, key), key=lambda m: (m.timestamp, m.step))


def test_trial_survives_losing_its_node(rehearsal, tmp_path):
    """A 2-worker gpu8-class trial loses its node mid-run, the way a reclaimed spot instance does."""
    from mlflow import MlflowClient

    checkpoint_every, iterations = 4, 24
    submission, uri = _submit(rehearsal, tmp_path, "rehearsal-spot", "--space",
                              '{"backbone": "resnet50", "dcn_in_tower": [true]}', "--workers-per-trial", "2",
                              "--iterations", str(iterations), "--max-failures", "3",
                              "--train-set", f"checkpoint_period={checkpoint_every}")
    client = MlflowClient(uri)
    # Wait until the trial is past its second checkpoint, then kill its node.
    deadline, run, before = time.monotonic() + 600, None, []
    while time.monotonic() < deadline:
        info = _query(rehearsal, "job", submission)
        assert info["status"] in ("PENDING", "RUNNING"), f"{info}\n{_job_logs(rehearsal, submission)}"
        try:
            runs = _children(uri, "rehearsal-spot")
        except Exception:  # the experiment does not exist yet
            runs = []
        if runs and "ray.node_id" in runs[0].data.tags:
            run = runs[0]
            before = _metric_history(uri, run.info.run_id, "train/lr")
            if before and max(m.step for m in before) >= 2 * checkpoint_every + 1:
                break
        time.sleep(2)
    assert run is not None and before, "the trial never started training"
    lost_node = run.data.tags["ray.node_id"]
    assert run.data.tags["ray.node_type"] == "gpu8_spot"
    pids = _node_pids(lost_node)
    assert pids, f"no process of node {lost_node}"
    reached = max(m.step for m in _metric_history(uri, run.info.run_id, "train/lr"))
    killed_at = time.time()
    for pid in pids:
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass

    info = _wait_job(rehearsal, submission)
    assert info["status"] == "SUCCEEDED", f"{info}\n{_job_logs(rehearsal, submission)}"
    final = client.get_run(run.info.run_id)
    assert final.info.status == "FINISHED"
    resumed = _metric_history(uri, run.info.run_id, "resumed_from_iteration")
    assert resumed, "the restart is visible as the resumed_from_iteration metric"
    resumed_from = int(resumed[-1].value)
    lost = reached - resumed_from
    assert 0 <= lost <= checkpoint_every, (reached, resumed_from)
    new_node = final.data.tags["ray.node_id"]
    assert new_node != lost_node and final.data.tags["ray.node_type"].startswith("gpu8_")
    nodes = {n["node_id"]: n for n in _query(rehearsal, "nodes")}
    assert nodes[lost_node]["state"] == "DEAD"
    assert nodes[new_node]["resources"].get("gpu_8x") == 8.0
    after = [m for m in _metric_history(uri, run.info.run_id, "train/lr") if m.timestamp / 1000 > killed_at]
    assert after and max(m.step for m in after) == iterations
    recovered = min(m.timestamp for m in after) / 1000 - killed_at
    replaced = nodes[new_node]["start_ms"] / 1000 - killed_at
    print(f"[rehearsal] node lost at iteration {reached}; resumed from {resumed_from} (lost {lost} iterations, "
          f"checkpoint every {checkpoint_every}); replacement node up {replaced:.0f} s and training again "
          f"{recovered:.0f} s after the loss")
