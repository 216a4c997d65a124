"""Team mode on real services: PostgreSQL, `mlflow server` and `prefect server` on it, a process worker.

The platform is started by the `team_platform` fixture (`fusionops platform up`) and stopped after the session.
The flows, CLI and registry code are the same as in the embedded mode: only MLFLOW_TRACKING_URI and PREFECT_API_URL
differ.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest

pytestmark = pytest.mark.integration
FUSIONOPS = str(Path(sys.executable).with_name("fusionops"))


def _fusionops(*args: str, cwd: Path, env: dict | None = None) -> subprocess.CompletedProcess:
    return subprocess.run([FUSIONOPS, *args], cwd=cwd, env={**os.environ, **(env or {})}, capture_output=True,
                          text=True, timeout=600)


def test_status_shows_every_service_answering(team_platform):
    result = _fusionops("platform", "status", *team_platform["flags"], cwd=team_platform["project"])
    assert result.returncode == 0, result.stdout + result.stderr
    for service in ("postgres", "mlflow", "prefect", "worker", "deployments"):
        row = next(line for line in result.stdout.splitlines() if f" {service} " in line)
        assert "yes" in row
    env = _fusionops("platform", "env", *team_platform["flags"], cwd=team_platform["project"])
    exports = env.stdout
    assert "not answering" not in env.stderr, env.stderr
    assert f"export MLFLOW_TRACKING_URI={team_platform['mlflow']}" in exports
    assert f"export PREFECT_API_URL={team_platform['api']}" in exports


def test_up_again_starts_nothing(team_platform):
    pids = {p.name: p.read_text() for p in (team_platform["root"] / "run").glob("*.pid")}
    again = _fusionops("platform", "up", *team_platform["flags"], cwd=team_platform["project"],
                       env=team_platform["env"])
    assert again.returncode == 0, again.stdout + again.stderr
    for service in ("postgres", "mlflow", "prefect", "worker"):
        assert f"{service:12} already running" in again.stdout
    assert {p.name: p.read_text() for p in (team_platform["root"] / "run").glob("*.pid")} == pids
    # Asking the running platform for another port is refused: a second copy would escape `down`.
    moved = _fusionops("platform", "up", *team_platform["flags"], "--mlflow-port=1", cwd=team_platform["project"])
    assert moved.returncode == 1 and "platform down` first" in moved.stderr and "Traceback" not in moved.stderr


def test_stores_live_in_postgresql(team_platform):
    import psycopg2

    state = json.loads((team_platform["root"] / "platform.json").read_text())
    assert "password" not in state and (team_platform["root"] / "password").stat().st_mode & 0o077 == 0
    password = (team_platform["root"] / "password").read_text().strip()
    url = f"postgresql://fusionops:{password}@127.0.0.1:{state['postgres_port']}/"
    for database, table in (("mlflow", "registered_models"), ("prefect", "deployment")):
        with psycopg2.connect(url + database) as connection, connection.cursor() as cursor:
            cursor.execute("SELECT count(*) FROM information_schema.tables WHERE table_name = %s", (table,))
            assert cursor.fetchone()[0] == 1, f"{database} has no {table} table"
    # the server's log says it created them: MLflow's INFO lines stay in a server's log
    assert "INFO mlflow.store.db.utils: Creating initial MLflow database tables" in \
        (team_platform["root"] / "logs/mlflow.log").read_text()


async def _deployments_and_schedule():
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import DeploymentFilter, DeploymentFilterName

    async with get_client() as client:
        deployments = {d.name: d for d in await client.read_deployments()}
        nightly = await client.read_flow_runs(deployment_filter=DeploymentFilter(
            name=DeploymentFilterName(any_=["nightly"])))
        return deployments, nightly


def test_prefect_yaml_deployments_on_the_work_pool_and_the_nightly_schedule(team_platform):
    import asyncio

    from prefect.settings import PREFECT_API_URL, temporary_settings

    deadline = time.monotonic() + 120
    with temporary_settings({PREFECT_API_URL: team_platform["api"]}):
        deployments, nightly = asyncio.run(_deployments_and_schedule())
        while not nightly and time.monotonic() < deadline:  # the server's scheduler service runs in a loop
            time.sleep(2)
            deployments, nightly = asyncio.run(_deployments_and_schedule())
    assert set(deployments) == {"on-demand", "nightly"}
    project = str(team_platform["project"])
    for deployment in deployments.values():
        assert deployment.work_pool_name == "fusionops" and deployment.parameters == {"project_dir": project}
    assert deployments["nightly"].schedules[0].schedule.cron == "0 2 * * *"
    assert nightly and {run.state_type.value for run in nightly} == {"SCHEDULED"}


def test_the_nightly_deployment_stays_the_workers(team_platform):
    """flows/deploy.py against the platform's server refuses to serve retrain/nightly (its runner would take it off
    the pool and pause it on exit); a paused deployment fails `platform status`."""
    from prefect.client.orchestration import get_client
    from prefect.settings import PREFECT_API_URL, temporary_settings

    project = team_platform["project"]
    served = subprocess.run([sys.executable, str(Path(__file__).parents[2] / "flows/deploy.py"), "--project-dir",
                             str(project)], env={**os.environ, "PREFECT_API_URL": team_platform["api"]},
                            capture_output=True, text=True, timeout=300)
    assert served.returncode == 1 and "retrain/nightly runs on work pool 'fusionops'" in served.stderr, served.stderr
    assert "Traceback" not in served.stderr
    with temporary_settings({PREFECT_API_URL: team_platform["api"]}), get_client(sync_client=True) as client:
        nightly = client.read_deployment_by_name("retrain/nightly")
        assert nightly.work_pool_name == "fusionops" and not nightly.paused
        on_demand = client.read_deployment_by_name("training_pipeline/on-demand")  # unscheduled: pausing drops no run
        client.pause_deployment(on_demand.id)
        try:
            paused = _fusionops("platform", "status", *team_platform["flags"], cwd=project)
        finally:
            client.resume_deployment(on_demand.id)
    assert paused.returncode == 1 and "deployments (training_pipeline/on-demand is paused)" in paused.stderr, \
        paused.stderr
    assert _fusionops("platform", "status", *team_platform["flags"], cwd=project).returncode == 0


def test_training_pipeline_deployment_completes_on_the_worker(team_platform):
    """run_deployment → the process worker runs the flow in the project; it logs to the platform's MLflow."""
    import asyncio

    from mlflow import MlflowClient
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import ArtifactFilter, ArtifactFilterFlowRunId
    from prefect.deployments import run_deployment
    from prefect.settings import PREFECT_API_URL, temporary_settings

    project = team_platform["project"]
    with temporary_settings({PREFECT_API_URL: team_platform["api"]}):
        run = run_deployment("training_pipeline/on-demand", timeout=1200, poll_interval=3)

        async def artifacts():
            async with get_client() as client:
                return await client.read_artifacts(artifact_filter=ArtifactFilter(
                    flow_run_id=ArtifactFilterFlowRunId(any_=[run.id])))

        assert run.state.is_completed(), f"{run.state.type}: {run.state.message}\n" + \
            (team_platform["root"] / "logs/worker.log").read_text()[-3000:]
        report = {a.key: a for a in asyncio.run(artifacts())}["training-report"]
    metrics = json.loads((project / "reports/metrics.json").read_text())
    assert f"{metrics['test']['accuracy']:.4f}" in report.data

    client = MlflowClient(tracking_uri=team_platform["mlflow"])
    champion = client.get_model_version_by_alias("team-test", "champion")
    logged = client.get_run(champion.run_id).data.metrics
    assert logged["test.accuracy"] == metrics["test"]["accuracy"]
    # Proxied artifacts: clients upload through the server, which keeps them in its --artifacts-destination.
    assert client.get_run(champion.run_id).info.artifact_uri.startswith("mlflow-artifacts:")
    assert list((team_platform["root"] / "mlartifacts").rglob("model.safetensors"))


def test_up_on_a_taken_port_is_a_clear_error_and_down_stops_nothing_else(team_platform):
    import shutil

    root = Path(tempfile.mkdtemp(prefix="fusionops-platform-taken-"))
    root.chmod(0o755)
    free = []
    for _ in range(2):
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            free.append(s.getsockname()[1])
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        # MLflow's port is taken: refused before PostgreSQL starts, so nothing is left running.
        result = _fusionops("platform", "up", "--dir", str(root), f"--postgres-port={free[0]}",
                            f"--mlflow-port={port}", f"--prefect-port={free[1]}", cwd=team_platform["project"])
        assert result.returncode == 1 and "Traceback" not in result.stderr
        assert f"{port} (mlflow: --mlflow-port) taken" in result.stderr and "nothing was started" in result.stderr
        assert not list(root.rglob("postmaster.pid")) and not list(root.rglob("*.pid"))
        same = _fusionops("platform", "up", "--dir", str(root), f"--postgres-port={free[0]}",
                          f"--mlflow-port={free[1]}", f"--prefect-port={free[1]}", cwd=team_platform["project"])
        assert same.returncode == 1 and "a port of its own" in same.stderr and not list(root.rglob("*.pid"))
        # While it is down, status and env use the ports asked for (flags or FUSIONOPS_*_PORT), not params.yaml's.
        exports = _fusionops("platform", "env", "--dir", str(root), cwd=team_platform["project"],
                             env={"FUSIONOPS_MLFLOW_PORT": str(port)}).stdout
        assert f"export MLFLOW_TRACKING_URI=http://127.0.0.1:{port}" in exports
        # A pid file left from before a reboot, whose pid now belongs to another program: not ours to stop.
        other = subprocess.Popen(["sleep", "300"], start_new_session=True)
        (root / "run").mkdir(exist_ok=True)
        (root / "run/mlflow.pid").write_text(f"{other.pid} 12345\n")
        stopped = _fusionops("platform", "down", "--dir", str(root), cwd=team_platform["project"])
        assert stopped.returncode == 0 and "nothing of ours was running" in stopped.stdout
        assert other.poll() is None, "down stopped a process it did not start"
        other.kill()
        other.wait()
    shutil.rmtree(root)
    # the running platform was not touched
    assert _fusionops("platform", "status", *team_platform["flags"], cwd=team_platform["project"]).returncode == 0


def _session(pid: int) -> int | None:
    try:
        return os.getsid(pid)
    except ProcessLookupError:
        return None


def test_down_also_stops_what_a_service_started_in_a_session_of_its_own(tmp_path):
    """A process worker starts each flow run in a new session: stopping the worker's group alone would leave it."""
    from fusionops.config import PlatformParams
    from fusionops.platform import _descendants, _processes, _spawn, down, resolve

    platform = resolve(PlatformParams(dir=tmp_path))
    worker = _spawn(platform, "worker", ["bash", "-c", "setsid sleep 300 & wait"], dict(os.environ))
    deadline = time.monotonic() + 10
    runs = []
    # The child shows up as soon as bash forks it, and leaves the worker's session only once setsid runs in it.
    while not runs and time.monotonic() < deadline:
        time.sleep(0.05)
        runs = [p for p in _descendants(worker.pid) if _session(p) not in (None, os.getsid(worker.pid))]
    assert len(runs) == 1, f"no descendant of the worker in a session of its own: {_descendants(worker.pid)}"
    (run,) = runs
    assert down(platform) == ["worker"]
    worker.wait(timeout=5)
    assert _processes().get(run, ("Z",))[0] == "Z"  # gone, or dead and waiting for init to reap it
