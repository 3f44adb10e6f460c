"""End to end on this machine: cluster/local.sh starts a single-node Ray cluster, `ray job submit`
runs the smoke k sweep of jobs/ablation.py on it, the runs land in MLflow, and `stop` leaves no
process behind. The cluster is our own (own ports, own temp dir), not the session `ray_cluster`."""
from __future__ import annotations

import os
import re
import shutil
import socket
import subprocess
import tempfile
import time
import uuid
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
LOCAL_SH = REPO / "cluster" / "local.sh"
RAY = REPO / ".venv" / "bin" / "ray"
if not RAY.exists():
    RAY = Path(shutil.which("ray") or RAY)
MAX_PACKAGE_BYTES = 5 * 1024 * 1024

pytestmark = [
    pytest.mark.ray,
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


def _session_processes(state_dir: Path) -> list[str]:
    pid_file = state_dir / "ray.pid"
    if not pid_file.exists():
        return []
    sid = pid_file.read_text().split()[0]
    out = subprocess.run(["ps", "-e", "-o", "pid=,sid="], capture_output=True, text=True).stdout
    return [line.split()[0] for line in out.splitlines() if line.split()[1:] == [sid]]


@pytest.fixture(scope="module")
def local_cluster():
    # Ray's unix socket paths live under the state dir: keep it short, in /tmp.
    state_dir = Path(tempfile.mkdtemp(prefix="atssray-", dir="/tmp"))
    gcs, dashboard, agent, client = _free_ports(4)
    env = {k: v for k, v in os.environ.items() if k not in ("RAY_ADDRESS", "RAY_API_SERVER_ADDRESS")}
    env.update(ATSS_RAY_STATE_DIR=str(state_dir), RAY=str(RAY))
    start = subprocess.run(
        [str(LOCAL_SH), "start", "--port", str(gcs), "--dashboard-port", str(dashboard),
         "--agent-port", str(agent), "--client-port", str(client), "--num-cpus", "2",
         "--object-store-mb", "300", "--timeout", "120"],
        env=env, capture_output=True, text=True, timeout=180)
    sid = (state_dir / "ray.pid").read_text().split()[0] if (state_dir / "ray.pid").exists() else None
    try:
        assert start.returncode == 0, start.stdout + start.stderr
        yield {"state_dir": state_dir, "env": env, "dashboard": dashboard, "gcs": gcs}
    finally:
        stop = subprocess.run([str(LOCAL_SH), "stop"], env=env, capture_output=True, text=True, timeout=120)
        leftover = subprocess.run(["ps", "-e", "-o", "pid=,sid="], capture_output=True, text=True).stdout
        left = [line for line in leftover.splitlines() if sid and line.split()[1:] == [sid]]
        shutil.rmtree(state_dir, ignore_errors=True)
        assert stop.returncode == 0, stop.stdout + stop.stderr
        assert not left, f"processes of the local cluster still running: {left}"


def _cli_env(cluster) -> dict:
    """The environment `eval "$(cluster/local.sh env)"` gives a shell."""
    out = subprocess.run([str(LOCAL_SH), "env"], env=cluster["env"], capture_output=True, text=True,
                         check=True).stdout
    env = dict(cluster["env"])
    for line in out.splitlines():
        assert line.startswith("export "), line
        key, value = line[len("export "):].split("=", 1)
        env[key] = value.replace("$PATH", env.get("PATH", ""))
    return env


def test_local_cluster_status_env_and_token_auth(local_cluster):
    state = local_cluster["state_dir"]
    env = _cli_env(local_cluster)
    assert env["RAY_AUTH_MODE"] == "token"
    assert env["RAY_AUTH_TOKEN_PATH"] == str(state / "auth_token")
    assert env["RAY_API_SERVER_ADDRESS"] == f"http://127.0.0.1:{local_cluster['dashboard']}"
    assert (state / "auth_token").stat().st_mode & 0o077 == 0, "the token file is private"
    status = subprocess.run([str(LOCAL_SH), "status"], env=local_cluster["env"], capture_output=True,
                            text=True, timeout=60)
    assert status.returncode == 0 and "running" in status.stdout, status.stdout + status.stderr
    assert "2.0 CPU" in status.stdout
    # Without the token the job server refuses the CLI.
    no_token = {k: v for k, v in env.items() if k not in ("RAY_AUTH_MODE", "RAY_AUTH_TOKEN_PATH")}
    no_token["RAY_AUTH_MODE"] = "disabled"
    denied = subprocess.run([str(RAY), "job", "list"], env=no_token, capture_output=True, text=True, timeout=60)
    assert denied.returncode != 0
    allowed = subprocess.run([str(RAY), "job", "list"], env=env, capture_output=True, text=True, timeout=60)
    assert allowed.returncode == 0, allowed.stderr
    # The dashboard listens on loopback only.
    listening = subprocess.run(["ss", "-ltnH"], capture_output=True, text=True).stdout \
        if shutil.which("ss") else ""
    for line in listening.splitlines():
        if line.split()[3].endswith(f":{local_cluster['dashboard']}"):
            assert line.split()[3].startswith("127.0.0.1:"), line
    # A second start on the same state dir is refused instead of starting a second head.
    again = subprocess.run([str(LOCAL_SH), "start", "--port", str(local_cluster["gcs"])],
                           env=local_cluster["env"], capture_output=True, text=True, timeout=60)
    assert again.returncode != 0 and "already running" in again.stderr


def test_submit_smoke_sweep_and_find_its_runs_in_mlflow(local_cluster, tmp_path):
    import mlflow

    env = _cli_env(local_cluster)
    out = tmp_path / "out"
    out.mkdir()
    uri = f"sqlite:///{out / 'mlflow.db'}"
    experiment = f"cluster-e2e-{uuid.uuid4().hex[:6]}"
    submission = f"atss-e2e-{uuid.uuid4().hex[:8]}"
    submit = subprocess.run(
        [str(RAY), "job", "submit", "--no-wait", "--submission-id", submission, "--working-dir", ".",
         "--runtime-env", "cluster/runtime_env.yaml", "--",
         "python", "jobs/ablation.py", "--smoke", "--quiet", "--storage-path", str(out / "results"),
         "--mlflow-uri", uri, "--experiment", experiment, "--name", "e2e"],
        cwd=REPO, env=env, capture_output=True, text=True, timeout=120)
    assert submit.returncode == 0, submit.stdout + submit.stderr

    # `ray job status` reports for people; its verdict line is "Job '<id>' succeeded|failed|was stopped".
    verdict = re.compile(rf"Job '{submission}' (succeeded|failed|was stopped)")
    found, deadline = None, time.monotonic() + 600
    while found is None and time.monotonic() < deadline:
        status = subprocess.run([str(RAY), "job", "status", submission], env=env, capture_output=True,
                                text=True, timeout=60)
        found = verdict.search(status.stdout + status.stderr)
        if found is None:
            time.sleep(3)
    logs = subprocess.run([str(RAY), "job", "logs", submission], env=env, capture_output=True, text=True,
                          timeout=60).stdout
    assert found and found.group(1) == "succeeded", \
        f"job {submission}: {found and found.group(0)}\n--- job logs (tail) ---\n{logs[-6000:]}"

    # The working dir went up small: Ray left out .venv/.git and what .gitignore lists.
    unpacked = local_cluster["state_dir"] / "ray" / "session_latest" / "runtime_resources" / "working_dir_files"
    packages = [p for p in unpacked.glob("_ray_pkg_*") if p.is_dir()]
    assert len(packages) == 1, packages
    files = [p for p in packages[0].rglob("*") if p.is_file()]
    size = sum(p.stat().st_size for p in files)
    assert size < MAX_PACKAGE_BYTES, f"working dir package is {size / 2**20:.1f} MiB"
    top = {p.relative_to(packages[0]).parts[0] for p in files}
    assert {"jobs", "pipeline", "detector"} <= top
    assert not top & {".venv", ".git", "data", "mlruns", "ray_results", "mlflow.db"}, top

    # Its runs are in MLflow: one parent for the sweep, one finished child per trial.
    mlflow.set_tracking_uri(uri)
    runs = mlflow.search_runs(experiment_names=[experiment], output_format="list")
    parents = [r for r in runs if "mlflow.parentRunId" not in r.data.tags]
    assert len(parents) == 1, [r.info.run_name for r in runs]
    children = [r for r in runs if r.data.tags.get("mlflow.parentRunId") == parents[0].info.run_id]
    assert len(children) == 2, [r.info.run_name for r in runs]
    assert all(r.info.status == "FINISHED" for r in children)
    assert all("eval/AP" in r.data.metrics for r in children)
    # Tune/Train state went to the storage path we gave.
    assert any((out / "results").iterdir())


_PROBE = """
import os, ray
from pipeline.training import connect_ray
connect_ray()

@ray.remote(num_cpus=0)
def address():
    return os.environ.get('RAY_ADDRESS')

print('driver', os.environ['RAY_ADDRESS'], 'task', ray.get(address.remote()), 'path', os.environ['PROBE_PATH'])
"""


def test_connect_ray_gives_every_task_of_a_job_the_cluster_address(local_cluster):
    """Ray Train's placement-group cleaner (an actor) finds its cluster through RAY_ADDRESS; a job's
    tasks and actors get it from connect_ray(), merged into the runtime env the job came with
    (with a plain ray.init() the task sees None)."""
    env = _cli_env(local_cluster)
    runtime_env = '{"env_vars": {"PYTHONPATH": "%s", "PROBE_PATH": "kept"}}' % REPO
    probe = subprocess.run(
        [str(RAY), "job", "submit", "--runtime-env-json", runtime_env, "--", "python", "-c", _PROBE],
        cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert probe.returncode == 0, probe.stdout[-3000:] + probe.stderr[-3000:]
    line = next(l for l in probe.stdout.splitlines() if l.startswith("driver "))
    _, driver, _, task, _, path = line.split()
    assert driver == task and driver.endswith(f":{local_cluster['gcs']}"), line
    assert path == "kept", "the job's own runtime env is kept"
