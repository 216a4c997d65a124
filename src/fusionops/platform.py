"""The team platform, on this machine: PostgreSQL, an MLflow server and a Prefect server on it, a process work pool
with one worker, and the deployments of prefect.yaml.

`fusionops platform up | status | down`. Every service is the engine's own program (`initdb`/`pg_ctl`,
`mlflow server`, `prefect server start`, `prefect worker start`, `prefect deploy --all`); this module only starts
them in order, waits until each answers, and records what it started (pid files and platform.json in the platform
folder) so that `down` stops only that. Pointing the pipeline at the platform is two environment variables
(`fusionops platform env`): MLFLOW_TRACKING_URI and PREFECT_API_URL.
"""

from __future__ import annotations

import json
import logging
import os
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

from fusionops.atomic import write_json, write_text
from fusionops.config import PlatformParams
from fusionops.errors import UserError

log = logging.getLogger(__name__)
BIN = Path(sys.executable).parent
OFFLINE = {"PREFECT_SERVER_ANALYTICS_ENABLED": "false", "DO_NOT_TRACK": "true", "MLFLOW_DISABLE_TELEMETRY": "true",
           "DVC_NO_ANALYTICS": "1", "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}
DB_USER = "fusionops"


class PlatformError(UserError):
    """A service did not come up, or the platform folder is not usable."""


@dataclass(frozen=True)
class Platform:
    """Where the services live and listen; the password is made once and kept in platform.json (mode 600)."""

    root: Path
    host: str
    postgres_port: int
    mlflow_port: int
    prefect_port: int
    work_pool: str
    postgres_bin: Path
    run_as: str
    password: str

    @property
    def mlflow_url(self) -> str:
        return f"http://{self.host}:{self.mlflow_port}"

    @property
    def prefect_api_url(self) -> str:
        return f"http://{self.host}:{self.prefect_port}/api"

    def database_url(self, database: str, driver: str = "postgresql") -> str:
        return f"{driver}://{DB_USER}:{self.password}@{self.host}:{self.postgres_port}/{database}"

    def env(self) -> dict[str, str]:
        """What points the CLI, the flows and the tests at this platform: nothing else changes."""
        return {"MLFLOW_TRACKING_URI": self.mlflow_url, "PREFECT_API_URL": self.prefect_api_url}

    @property
    def pgdata(self) -> Path:
        return self.root / "postgres"

    def pid_file(self, service: str) -> Path:
        return self.root / "run" / f"{service}.pid"

    def log_file(self, service: str) -> Path:
        return self.root / "logs" / f"{service}.log"


def resolve(params: PlatformParams, **overrides) -> Platform:
    """Flags (or their environment variables) first, then what an existing platform was made with, then params."""
    settings = params.model_dump()
    root = Path(overrides.get("dir") or settings["dir"]).resolve()
    state_file = root / "platform.json"
    state = json.loads(state_file.read_text()) if state_file.is_file() else {}
    for key in ("host", "postgres_port", "mlflow_port", "prefect_port", "work_pool"):
        settings[key] = overrides.get(key) or state.get(key) or settings[key]
    return Platform(root=root, host=settings["host"], postgres_port=settings["postgres_port"],
                    mlflow_port=settings["mlflow_port"], prefect_port=settings["prefect_port"],
                    work_pool=settings["work_pool"], postgres_bin=Path(settings["postgres_bin"]),
                    run_as=settings["run_as"], password=state.get("password") or secrets.token_urlsafe(18))


def _save_state(platform: Platform) -> None:
    platform.root.mkdir(parents=True, exist_ok=True)
    state = {"host": platform.host, "postgres_port": platform.postgres_port, "mlflow_port": platform.mlflow_port,
             "prefect_port": platform.prefect_port, "work_pool": platform.work_pool, "password": platform.password}
    write_json(platform.root / "platform.json", state)
    (platform.root / "platform.json").chmod(0o600)  # it holds the database password


# --- processes -----------------------------------------------------------------------------------------------------


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _our_pid(platform: Platform, service: str) -> int | None:
    """The pid `up` recorded for a service, if that process still runs."""
    path = platform.pid_file(service)
    if not path.is_file():
        return None
    pid = int(path.read_text().split()[0])
    return pid if _alive(pid) else None


def _port_free(host: str, port: int) -> bool:
    with socket.socket() as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind((host, port))
        except OSError:
            return False
    return True


def _spawn(platform: Platform, service: str, args: list[str], env: dict[str, str], cwd: Path | None = None) -> int:
    """Start a service in its own session (so `down` stops it with its children) and record its pid."""
    logfile = platform.log_file(service)
    logfile.parent.mkdir(parents=True, exist_ok=True)
    platform.pid_file(service).parent.mkdir(parents=True, exist_ok=True)
    with open(logfile, "ab") as out:
        process = subprocess.Popen(args, env=env, cwd=cwd, stdout=out, stderr=subprocess.STDOUT,
                                   stdin=subprocess.DEVNULL, start_new_session=True)
    write_text(platform.pid_file(service), f"{process.pid}\n")
    return process.pid


def _tail(path: Path, lines: int = 15) -> str:
    return "\n".join(path.read_text(errors="replace").splitlines()[-lines:]) if path.is_file() else "(no log)"


def _wait(platform: Platform, service: str, ready, pid: int | None, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if ready():
            return
        if pid is not None and not _alive(pid):
            raise PlatformError(f"{service} stopped while starting; the end of {platform.log_file(service)}:\n"
                                f"{_tail(platform.log_file(service))}")
        time.sleep(0.5)
    raise PlatformError(f"{service} did not answer within {timeout:.0f} s; see {platform.log_file(service)}:\n"
                        f"{_tail(platform.log_file(service))}")


def _http_ok(url: str) -> bool:
    import requests

    try:
        return requests.get(url, timeout=2).status_code == 200
    except requests.RequestException:
        return False


def _stop(platform: Platform, service: str, timeout: float = 30) -> bool:
    """SIGTERM the service's process group, SIGKILL it after `timeout`; True when something was stopped."""
    pid = _our_pid(platform, service)
    platform.pid_file(service).unlink(missing_ok=True)
    if pid is None:
        return False
    try:
        os.killpg(pid, signal.SIGTERM)
    except ProcessLookupError:
        return False
    deadline = time.monotonic() + timeout
    while _alive(pid) and time.monotonic() < deadline:
        _reap(pid)
        time.sleep(0.2)
    if _alive(pid):
        os.killpg(pid, signal.SIGKILL)
    _reap(pid)
    return True


def _reap(pid: int) -> None:
    try:
        os.waitpid(pid, os.WNOHANG)
    except ChildProcessError:
        pass


# --- PostgreSQL ------------------------------------------------------------------------------------------------------


def _as_postgres_user(platform: Platform, args: list[str]) -> list[str]:
    """PostgreSQL refuses to run as root: run its programs as `run_as` then."""
    if os.geteuid() != 0:
        return args
    return ["runuser", "-u", platform.run_as, "--", *args]


def _check_reachable(platform: Platform) -> None:
    """As root, the data folder must be reachable by the unprivileged user that runs the server."""
    if os.geteuid() != 0:
        return
    import pwd

    try:
        pwd.getpwnam(platform.run_as)
    except KeyError:
        raise PlatformError(f"PostgreSQL refuses to run as root and the user {platform.run_as!r} does not exist: "
                            f"create it (useradd -r {platform.run_as}) or set platform.run_as") from None
    for folder in [platform.root, *platform.root.parents]:
        probe = subprocess.run(["runuser", "-u", platform.run_as, "--", "test", "-x", str(folder)],
                               capture_output=True)
        if probe.returncode != 0:
            raise PlatformError(f"PostgreSQL runs as {platform.run_as!r}, who cannot enter {folder}: "
                                f"`chmod o+x {folder}` or put the platform elsewhere (--dir, platform.dir)")


def _pg(platform: Platform, program: str) -> str:
    path = platform.postgres_bin / program
    if not path.is_file():
        found = shutil.which(program)
        if found is None:
            raise PlatformError(f"{path} not found: install PostgreSQL (Debian: apt install postgresql) or set "
                                f"platform.postgres_bin to the folder holding initdb and pg_ctl")
        return found
    return str(path)


def _postgres_running(platform: Platform) -> bool:
    result = subprocess.run([_pg(platform, "pg_isready"), "-q", "-h", platform.host, "-p",
                             str(platform.postgres_port)], capture_output=True)
    return result.returncode == 0


def _postgres_up(platform: Platform) -> str:
    _check_reachable(platform)
    data = platform.pgdata
    if not (data / "PG_VERSION").is_file():
        if data.exists() and any(data.iterdir()):
            raise PlatformError(f"{data} is not empty and holds no PostgreSQL cluster: empty it or choose another "
                                f"platform.dir")
        data.mkdir(parents=True, exist_ok=True)
        data.chmod(0o700)
        secret = platform.root / "run" / "pwfile"
        secret.parent.mkdir(parents=True, exist_ok=True)
        secret.write_text(platform.password + "\n")
        secret.chmod(0o600)
        if os.geteuid() == 0:
            for path in (data, secret):
                shutil.chown(path, platform.run_as)
        try:
            result = subprocess.run(_as_postgres_user(platform, [
                _pg(platform, "initdb"), "-D", str(data), "-U", DB_USER, f"--pwfile={secret}", "-A", "scram-sha-256",
                "-E", "UTF8", "--locale=C", "--no-instructions"]), capture_output=True, text=True)
        finally:
            secret.unlink(missing_ok=True)
        if result.returncode != 0:
            shutil.rmtree(data, ignore_errors=True)
            raise PlatformError(f"initdb failed: {result.stderr.strip()[-800:]}")
        log.info("initialised a PostgreSQL cluster in %s", data)
    if _postgres_running(platform):
        state = "already running"
    else:
        if not _port_free(platform.host, platform.postgres_port):
            raise PlatformError(f"port {platform.postgres_port} is taken by another program: choose another "
                                f"(--postgres-port, platform.postgres_port)")
        logfile = platform.log_file("postgres")
        logfile.parent.mkdir(parents=True, exist_ok=True)
        if os.geteuid() == 0:
            logfile.touch()
            shutil.chown(logfile, platform.run_as)
        options = f"-c listen_addresses={platform.host} -p {platform.postgres_port} -k {data}"
        result = subprocess.run(_as_postgres_user(platform, [
            _pg(platform, "pg_ctl"), "-D", str(data), "-l", str(logfile), "-o", options, "-w", "-t", "60", "start"]),
            capture_output=True, text=True)
        if result.returncode != 0:
            raise PlatformError(f"PostgreSQL did not start: {result.stderr.strip()[-400:]}\n{_tail(logfile)}")
        pid = int((data / "postmaster.pid").read_text().split()[0])
        write_text(platform.pid_file("postgres"), f"{pid}\n")
        state = "started"
    _create_databases(platform, ["mlflow", "prefect"])
    return state


def _create_databases(platform: Platform, names: list[str]) -> None:
    import psycopg2

    connection = psycopg2.connect(platform.database_url("postgres"))
    connection.autocommit = True
    try:
        with connection.cursor() as cursor:
            for name in names:
                cursor.execute("SELECT 1 FROM pg_database WHERE datname = %s", (name,))
                if cursor.fetchone() is None:
                    cursor.execute(f'CREATE DATABASE "{name}"')
    finally:
        connection.close()


def _postgres_down(platform: Platform) -> bool:
    if _our_pid(platform, "postgres") is None:
        platform.pid_file("postgres").unlink(missing_ok=True)
        return False
    result = subprocess.run(_as_postgres_user(platform, [
        _pg(platform, "pg_ctl"), "-D", str(platform.pgdata), "-m", "fast", "-w", "-t", "60", "stop"]),
        capture_output=True, text=True)
    if result.returncode != 0:
        raise PlatformError(f"PostgreSQL did not stop: {result.stderr.strip()[-400:]}")
    platform.pid_file("postgres").unlink(missing_ok=True)
    return True


# --- MLflow, Prefect -------------------------------------------------------------------------------------------------


def _service_env(platform: Platform, **extra: str) -> dict[str, str]:
    return {**os.environ, **OFFLINE, "PATH": f"{BIN}{os.pathsep}{os.environ.get('PATH', '')}", **extra}


def _prefect_env(platform: Platform) -> dict[str, str]:
    """The Prefect settings of every process that talks to the platform's server."""
    return _service_env(platform, PREFECT_HOME=str(platform.root / "prefect"),
                        PREFECT_API_URL=platform.prefect_api_url)


def _start_http(platform: Platform, service: str, port: int, health: str, args: list[str], env: dict[str, str],
                timeout: float) -> str:
    if _our_pid(platform, service) is not None and _http_ok(health):
        return "already running"
    if not _port_free(platform.host, port):
        raise PlatformError(f"port {port} ({service}) is taken by another program: stop it or choose another port "
                            f"(fusionops platform up --help)")
    pid = _spawn(platform, service, args, env)
    _wait(platform, service, lambda: _http_ok(health), pid, timeout)
    return "started"


def _mlflow_up(platform: Platform) -> str:
    artifacts = platform.root / "mlartifacts"
    artifacts.mkdir(parents=True, exist_ok=True)
    return _start_http(platform, "mlflow", platform.mlflow_port, f"{platform.mlflow_url}/health", [
        str(BIN / "mlflow"), "server", "--backend-store-uri", platform.database_url("mlflow"),
        "--artifacts-destination", str(artifacts), "--host", platform.host, "--port", str(platform.mlflow_port),
        "--workers", "2"], _service_env(platform), timeout=180)


def _prefect_up(platform: Platform) -> str:
    env = _prefect_env(platform)
    env.pop("PREFECT_API_URL")  # the server itself
    env["PREFECT_API_DATABASE_CONNECTION_URL"] = platform.database_url("prefect", "postgresql+asyncpg")
    return _start_http(platform, "prefect", platform.prefect_port, f"{platform.prefect_api_url}/health", [
        str(BIN / "prefect"), "server", "start", "--host", platform.host, "--port", str(platform.prefect_port)],
        env, timeout=240)


def _prefect(platform: Platform, *args: str, cwd: Path | None = None, env: dict | None = None) -> str:
    result = subprocess.run([str(BIN / "prefect"), "--no-prompt", *args], cwd=cwd,
                            env={**_prefect_env(platform), **(env or {})}, capture_output=True, text=True,
                            timeout=600)
    if result.returncode != 0:
        raise PlatformError(f"`prefect {' '.join(args)}` failed:\n{(result.stdout + result.stderr).strip()[-1500:]}")
    return result.stdout


def _worker_online(platform: Platform) -> bool:
    from prefect.client.orchestration import get_client

    async def read() -> bool:
        async with get_client() as client:
            workers = await client.read_workers_for_work_pool(platform.work_pool)
            return any(w.status.value == "ONLINE" for w in workers)

    return _with_prefect_api(platform, read)


def _with_prefect_api(platform: Platform, coroutine_fn):
    """Run a Prefect client coroutine against the platform's API, whatever this process was pointed at."""
    import asyncio

    from prefect.settings import PREFECT_API_URL, temporary_settings

    with temporary_settings({PREFECT_API_URL: platform.prefect_api_url}):
        return asyncio.run(coroutine_fn())


def _worker_up(platform: Platform) -> str:
    _prefect(platform, "work-pool", "create", platform.work_pool, "--type", "process", "--overwrite")
    if _our_pid(platform, "worker") is not None:
        return "already running"
    # The worker's flow runs inherit its environment: they log to the platform's MLflow.
    env = _prefect_env(platform)
    env["MLFLOW_TRACKING_URI"] = platform.mlflow_url
    env.setdefault("PREFECT_WORKER_QUERY_SECONDS", "5")
    pid = _spawn(platform, "worker", [str(BIN / "prefect"), "worker", "start", "--pool", platform.work_pool,
                                      "--type", "process", "--name", f"{platform.work_pool}-worker-1",
                                      "--install-policy", "never"], env)
    _wait(platform, "worker", lambda: _worker_online(platform), pid, timeout=120)
    return "started"


def deploy(platform: Platform, project_dir: Path, params) -> list[str]:
    """`prefect deploy --all` from the project's prefect.yaml; its placeholders come from params.yaml."""
    project_dir = project_dir.resolve()
    if not (project_dir / "prefect.yaml").is_file():
        raise PlatformError(f"{project_dir / 'prefect.yaml'} not found: run from the fusionops project folder "
                            f"(--project-dir)")
    env = {"FUSIONOPS_PROJECT_DIR": str(project_dir), "FUSIONOPS_WORK_POOL": platform.work_pool,
           "FUSIONOPS_CRON": params.schedule.cron, "FUSIONOPS_TIMEZONE": params.schedule.timezone,
           "FUSIONOPS_NIGHTLY": params.schedule.deployment}
    _prefect(platform, "deploy", "--all", cwd=project_dir, env=env)
    return deployments(platform)


def deployments(platform: Platform) -> list[str]:
    from prefect.client.orchestration import get_client

    async def read() -> list[str]:
        async with get_client() as client:
            found = await client.read_deployments()
            flows = {f.id: f.name for f in await client.read_flows()}
            return sorted(f"{flows.get(d.flow_id, '?')}/{d.name}" for d in found)

    return _with_prefect_api(platform, read)


# --- the commands ----------------------------------------------------------------------------------------------------


def up(platform: Platform, project_dir: Path, params) -> dict[str, str]:
    """Start what is not running yet, in dependency order; idempotent."""
    _save_state(platform)
    states = {"postgres": _postgres_up(platform)}
    states["mlflow"] = _mlflow_up(platform)
    states["prefect"] = _prefect_up(platform)
    states["worker"] = _worker_up(platform)
    states["deployments"] = ", ".join(deploy(platform, project_dir, params))
    return states


@dataclass(frozen=True)
class ServiceStatus:
    name: str
    url: str
    pid: int | None
    answers: bool


def status(platform: Platform) -> list[ServiceStatus]:
    postgres = f"postgresql://{DB_USER}@{platform.host}:{platform.postgres_port}"
    prefect_ok = _http_ok(f"{platform.prefect_api_url}/health")
    return [
        ServiceStatus("postgres", postgres, _our_pid(platform, "postgres"), _postgres_running(platform)),
        ServiceStatus("mlflow", platform.mlflow_url, _our_pid(platform, "mlflow"),
                      _http_ok(f"{platform.mlflow_url}/health")),
        ServiceStatus("prefect", platform.prefect_api_url, _our_pid(platform, "prefect"), prefect_ok),
        ServiceStatus("worker", f"work pool {platform.work_pool}", _our_pid(platform, "worker"),
                      prefect_ok and _worker_online(platform)),
    ]


def down(platform: Platform) -> list[str]:
    """Stop, in reverse order, only the services whose pid files `up` wrote."""
    stopped = [name for name in ("worker", "prefect", "mlflow") if _stop(platform, name)]
    if _postgres_down(platform):
        stopped.append("postgres")
    return stopped
