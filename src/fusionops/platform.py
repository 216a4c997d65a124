"""The team platform, on this machine: PostgreSQL, an MLflow server and a Prefect server on it, a process work pool
with one worker, and the deployments of prefect.yaml.

`fusionops platform up | status | down`. Every service is the engine's own program (`initdb`/`pg_ctl`,
`mlflow server`, `prefect server start`, `prefect worker start`, `prefect deploy --all`); this module only starts
them in order, waits until each answers, and records what it started (pid files and platform.json in the platform
folder) so that `down` stops only that. Pointing the pipeline at the platform is two environment variables
(`fusionops platform env`): MLFLOW_TRACKING_URI and PREFECT_API_URL.
"""

from __future__ import annotations

import contextlib
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
from fusionops.offline import OFFLINE_ENV

log = logging.getLogger(__name__)
BIN = Path(sys.executable).parent
DB_USER = "fusionops"


class PlatformError(UserError):
    """A service did not come up, or the platform folder is not usable."""


@dataclass(frozen=True)
class Platform:
    """Where the services live and listen. The database password is made once, kept in `<dir>/password` (mode 600);
    `<dir>/platform.json` (readable by all) records where a running platform listens."""

    root: Path
    host: str
    postgres_port: int
    mlflow_port: int
    prefect_port: int
    work_pool: str
    postgres_bin: Path
    run_as: str

    @property
    def mlflow_url(self) -> str:
        return f"http://{self.host}:{self.mlflow_port}"

    @property
    def prefect_api_url(self) -> str:
        return f"http://{self.host}:{self.prefect_port}/api"

    @property
    def password(self) -> str:
        path = self.root / "password"
        if not path.is_file():
            raise PlatformError(f"{path} is gone, and the cluster in {self.pgdata} was made with the password it held: "
                                f"restore it, or remove {self.pgdata} to start afresh (its data is lost)")
        return path.read_text().strip()

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


SERVICES = ("postgres", "mlflow", "prefect", "worker")
_WHERE = ("host", "postgres_port", "mlflow_port", "prefect_port", "work_pool")


def resolve(params: PlatformParams, **overrides) -> Platform:
    """Flags (or their environment variables) first, then params.yaml; while the platform runs, where it runs.

    Asking a running platform for other ports or another pool is an error: `down` first (else `up` would start a
    second copy beside the first, which `down` could no longer stop).
    """
    settings = params.model_dump()
    root = Path(overrides.get("dir") or settings["dir"]).resolve()
    state_file = root / "platform.json"
    try:
        state = json.loads(state_file.read_text()) if state_file.is_file() else {}
    except (OSError, ValueError) as err:
        raise PlatformError(f"{state_file} is unreadable ({err}): remove it; `fusionops platform up` writes it "
                            f"again") from None
    running = [service for service in SERVICES if _recorded_pid(root / "run" / f"{service}.pid") is not None]
    for key in _WHERE:
        requested = overrides.get(key)
        if running and key in state:
            if requested is not None and requested != state[key]:
                raise PlatformError(f"the platform in {root} runs with {key.replace('_', '-')} {state[key]} "
                                    f"({', '.join(running)} up): `fusionops platform down` first to change it")
            settings[key] = state[key]
        elif requested is not None:
            settings[key] = requested
    return Platform(root=root, host=settings["host"], postgres_port=settings["postgres_port"],
                    mlflow_port=settings["mlflow_port"], prefect_port=settings["prefect_port"],
                    work_pool=settings["work_pool"], postgres_bin=Path(settings["postgres_bin"]),
                    run_as=settings["run_as"])


def _save_state(platform: Platform) -> None:
    write_json(platform.root / "platform.json", {key: getattr(platform, key) for key in _WHERE})


def _write_private(path: Path, text: str) -> None:
    """Write a file only its owner can read, atomically, never readable by others even for a moment."""
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    try:
        os.write(fd, text.encode())
        os.fsync(fd)
    finally:
        os.close(fd)
    os.replace(tmp, path)


# --- processes -----------------------------------------------------------------------------------------------------


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _started_at(pid: int) -> str | None:
    """The boot and the process's start time (ticks since boot, /proc/PID/stat field 22): with the pid, they name
    one process for good, so a pid reused after a crash or a reboot is never taken for ours."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
        boot = Path("/proc/sys/kernel/random/boot_id").read_text().strip()
    except OSError:
        return None
    return f"{boot}:{stat.rsplit(')', 1)[1].split()[19]}"


def _record_pid(platform: Platform, service: str, pid: int) -> None:
    write_text(platform.pid_file(service), f"{pid} {_started_at(pid)}\n")


def _recorded_pid(path: Path) -> int | None:
    """The pid in a pid file `up` wrote, if that very process still runs."""
    try:
        pid, started = path.read_text().split()
        pid = int(pid)
    except (OSError, ValueError):
        return None  # no file, or not one of ours
    return pid if _alive(pid) and _started_at(pid) == started else None


def _our_pid(platform: Platform, service: str) -> int | None:
    return _recorded_pid(platform.pid_file(service))


def _port_free(host: str, port: int) -> bool:
    with socket.socket() as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind((host, port))
        except OSError:
            return False
    return True


def _spawn(platform: Platform, service: str, args: list[str], env: dict[str, str]) -> subprocess.Popen:
    """Start a service in its own session (so `down` stops it with its children) and record its pid."""
    logfile = platform.log_file(service)
    logfile.parent.mkdir(parents=True, exist_ok=True)
    platform.pid_file(service).parent.mkdir(parents=True, exist_ok=True)
    with open(logfile, "ab") as out:
        process = subprocess.Popen(args, env=env, stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                   start_new_session=True)
    _record_pid(platform, service, process.pid)
    return process


def _tail(path: Path, lines: int = 15) -> str:
    return "\n".join(path.read_text(errors="replace").splitlines()[-lines:]) if path.is_file() else "(no log)"


def _wait(platform: Platform, service: str, ready, process: subprocess.Popen | None, timeout: float) -> None:
    """Until `ready()`; a service that exits meanwhile is an error showing the end of its log."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if ready():
            return
        if process is not None and process.poll() is not None:
            platform.pid_file(service).unlink(missing_ok=True)
            raise PlatformError(f"{service} stopped while starting (exit {process.returncode}); the end of "
                                f"{platform.log_file(service)}:\n{_tail(platform.log_file(service))}")
        time.sleep(0.5)
    raise PlatformError(f"{service} did not answer within {timeout:.0f} s (it keeps starting: `fusionops platform "
                        f"status`, or `down`); see {platform.log_file(service)}:\n{_tail(platform.log_file(service))}")


def silent_servers(platform: Platform) -> list[str]:
    """The platform's servers that do not answer their health check now (of mlflow and prefect)."""
    return [name for name, url in (("mlflow", f"{platform.mlflow_url}/health"),
                                   ("prefect", f"{platform.prefect_api_url}/health")) if not _http_ok(url)]


def _http_ok(url: str) -> bool:
    import requests

    try:
        return requests.get(url, timeout=2).status_code == 200
    except requests.RequestException:
        return False


def _processes() -> dict[int, tuple[str, int, int]]:
    """Every process: pid -> (state, parent pid, process group), from /proc."""
    found = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            state, ppid, pgrp = stat.read_text().rsplit(")", 1)[1].split()[:3]
            found[int(stat.parent.name)] = (state, int(ppid), int(pgrp))
        except (OSError, ValueError):
            continue
    return found


def _group_alive(pgid: int) -> bool:
    """Whether a process of the group still runs (a zombie waiting for its parent to reap it does not count)."""
    return any(pgrp == pgid and state != "Z" for state, _, pgrp in _processes().values())


def _descendants(pid: int) -> list[int]:
    """The processes started by `pid`, and by them, in whatever session: a worker's flow runs have their own."""
    children: dict[int, list[int]] = {}
    for child, (_, parent, _) in _processes().items():
        children.setdefault(parent, []).append(child)
    found, todo = [], [pid]
    while todo:
        for child in children.get(todo.pop(), []):
            found.append(child)
            todo.append(child)
    return found


def _terminate(pids: list[int], timeout: float) -> None:
    """SIGTERM, then SIGKILL after `timeout`, the processes of `pids` that still run."""
    for sig in (signal.SIGTERM, signal.SIGKILL):
        for pid in pids:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, sig)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            running = _processes()
            if not any(pid in running and running[pid][0] != "Z" for pid in pids):
                return
            time.sleep(0.2)


def _stop(platform: Platform, service: str, timeout: float = 30) -> bool:
    """SIGTERM the service's whole process group, SIGKILL what is left after `timeout`; True when it was running.
    The pid file goes only once the group is gone, so an interrupted `down` can be run again."""
    pid = _our_pid(platform, service)
    if pid is None:
        platform.pid_file(service).unlink(missing_ok=True)
        return False
    started = [p for p in _descendants(pid) if _processes().get(p, ("", 0, pid))[2] != pid]  # own sessions
    try:
        os.killpg(pid, signal.SIGTERM)
        deadline = time.monotonic() + timeout
        while _group_alive(pid) and time.monotonic() < deadline:
            _reap(pid)
            time.sleep(0.2)
        if _group_alive(pid):
            os.killpg(pid, signal.SIGKILL)
            while _group_alive(pid):
                _reap(pid)
                time.sleep(0.1)
    except ProcessLookupError:
        pass
    except PermissionError:
        raise PlatformError(f"{service} (pid {pid}) belongs to another user: run `fusionops platform down` as the "
                            f"user who ran `up`") from None
    _terminate(started, timeout)  # what it started in sessions of their own (a worker's flow runs) goes too
    platform.pid_file(service).unlink(missing_ok=True)
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
    """Whether anything answers as PostgreSQL on the platform's port."""
    result = subprocess.run([_pg(platform, "pg_isready"), "-q", "-h", platform.host, "-p",
                             str(platform.postgres_port)], capture_output=True)
    return result.returncode == 0


def _our_cluster_pid(platform: Platform) -> int | None:
    """The postmaster of the platform's own cluster, if it runs (whatever answers on the port)."""
    pidfile = platform.pgdata / "postmaster.pid"
    try:
        pid = int(pidfile.read_text().split()[0])
    except (OSError, ValueError, IndexError):
        return None
    return pid if _alive(pid) else None


def _initdb(platform: Platform) -> None:
    data = platform.pgdata
    if data.exists() and any(data.iterdir()):
        raise PlatformError(f"{data} is not empty and holds no PostgreSQL cluster: empty it or choose another "
                            f"platform.dir")
    password = platform.root / "password"
    if not password.is_file():
        _write_private(password, secrets.token_urlsafe(18) + "\n")
    data.mkdir(parents=True, exist_ok=True)
    data.chmod(0o700)
    secret = platform.root / "run" / "pwfile"  # initdb's copy, readable by the user it runs as
    secret.parent.mkdir(parents=True, exist_ok=True)
    _write_private(secret, platform.password + "\n")
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


def _postgres_up(platform: Platform) -> str:
    _check_reachable(platform)
    data = platform.pgdata
    if not (data / "PG_VERSION").is_file():
        _initdb(platform)
    platform.password  # noqa: B018 — a cluster whose password file is gone is an error now, not after starting it
    pid = _our_cluster_pid(platform)
    if pid is not None:
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
        # TCP on the platform's address only: no Unix socket (its path could be too long or hold spaces).
        options = f"-c listen_addresses={platform.host} -p {platform.postgres_port} -c unix_socket_directories=''"
        result = subprocess.run(_as_postgres_user(platform, [
            _pg(platform, "pg_ctl"), "-D", str(data), "-l", str(logfile), "-o", options, "-w", "-t", "60", "start"]),
            capture_output=True, text=True)
        pid = _our_cluster_pid(platform)
        if result.returncode != 0 or pid is None:
            raise PlatformError(f"PostgreSQL did not start: {result.stderr.strip()[-400:]}\n{_tail(logfile)}")
        state = "started"
    _record_pid(platform, "postgres", pid)
    _create_databases(platform, ["mlflow", "prefect"])
    return state


def _create_databases(platform: Platform, names: list[str]) -> None:
    import psycopg2

    try:
        connection = psycopg2.connect(platform.database_url("postgres"), connect_timeout=10)
    except psycopg2.Error as err:
        raise PlatformError(f"cannot log in to the platform's PostgreSQL on port {platform.postgres_port} "
                            f"({str(err).strip()[:300]}): is {platform.root / 'password'} the one it was made "
                            f"with?") from None
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
    return {**os.environ, **OFFLINE_ENV, "PATH": f"{BIN}{os.pathsep}{os.environ.get('PATH', '')}", **extra}


def _prefect_env(platform: Platform) -> dict[str, str]:
    """The Prefect settings of every process that talks to the platform's server."""
    return _service_env(platform, PREFECT_HOME=str(platform.root / "prefect"),
                        PREFECT_API_URL=platform.prefect_api_url)


def _start_http(platform: Platform, service: str, port: int, health: str, args: list[str], env: dict[str, str],
                timeout: float) -> str:
    if _our_pid(platform, service) is not None:  # ours, perhaps still starting: never a second copy
        _wait(platform, service, lambda: _http_ok(health), None, timeout)
        return "already running"
    if not _port_free(platform.host, port):
        raise PlatformError(f"port {port} ({service}) is taken by another program: stop it or choose another port "
                            f"(fusionops platform up --help)")
    process = _spawn(platform, service, args, env)
    _wait(platform, service, lambda: _http_ok(health), process, timeout)
    return "started"


def _mlflow_up(platform: Platform) -> str:
    artifacts = platform.root / "mlartifacts"
    artifacts.mkdir(parents=True, exist_ok=True)
    # The store URI holds the password: pass it in the environment (readable by this user only), not in argv (ps).
    # A server's log keeps MLflow's INFO lines (the CLI quiets them for people at a terminal).
    env = _service_env(platform, MLFLOW_BACKEND_STORE_URI=platform.database_url("mlflow"), MLFLOW_LOGGING_LEVEL="INFO")
    return _start_http(platform, "mlflow", platform.mlflow_port, f"{platform.mlflow_url}/health", [
        str(BIN / "mlflow"), "server", "--artifacts-destination", str(artifacts), "--host", platform.host,
        "--port", str(platform.mlflow_port), "--workers", "2"], env, timeout=180)


def _prefect_up(platform: Platform) -> str:
    env = _prefect_env(platform)
    env.pop("PREFECT_API_URL")  # the server itself
    env["PREFECT_API_DATABASE_CONNECTION_URL"] = platform.database_url("prefect", "postgresql+asyncpg")
    return _start_http(platform, "prefect", platform.prefect_port, f"{platform.prefect_api_url}/health", [
        str(BIN / "prefect"), "server", "start", "--host", platform.host, "--port", str(platform.prefect_port)],
        env, timeout=240)


def _prefect(platform: Platform, *args: str, cwd: Path | None = None, env: dict | None = None) -> str:
    try:
        result = subprocess.run([str(BIN / "prefect"), "--no-prompt", *args], cwd=cwd,
                                env={**_prefect_env(platform), **(env or {})}, capture_output=True, text=True,
                                timeout=600)
    except subprocess.TimeoutExpired:
        raise PlatformError(f"`prefect {' '.join(args)}` did not finish in 600 s") from None
    if result.returncode != 0:
        raise PlatformError(f"`prefect {' '.join(args)}` failed:\n{(result.stdout + result.stderr).strip()[-1500:]}")
    return result.stdout


def _worker_online(platform: Platform, since: float = 0.0) -> bool:
    """Whether the platform's worker is online, with a heartbeat newer than `since` (a timestamp)."""
    from prefect.client.orchestration import get_client

    async def read() -> bool:
        async with get_client() as client:
            workers = await client.read_workers_for_work_pool(platform.work_pool)
            return any(w.name == _worker_name(platform) and w.status.value == "ONLINE" and w.last_heartbeat_time
                       and w.last_heartbeat_time.timestamp() > since for w in workers)

    try:
        return _with_prefect_api(platform, read)
    except Exception:  # noqa: BLE001 — no pool, another server on the port, a server going down: not online
        return False


def _worker_name(platform: Platform) -> str:
    return f"{platform.work_pool}-worker-1"


def _with_prefect_api(platform: Platform, coroutine_fn):
    """Run a Prefect client coroutine against the platform's API, whatever this process was pointed at."""
    import asyncio

    from prefect.settings import PREFECT_API_URL, temporary_settings

    with temporary_settings({PREFECT_API_URL: platform.prefect_api_url}):
        return asyncio.run(coroutine_fn())


def _pool_exists(platform: Platform) -> bool:
    from prefect.client.orchestration import get_client
    from prefect.exceptions import ObjectNotFound

    async def read() -> bool:
        async with get_client() as client:
            try:
                await client.read_work_pool(platform.work_pool)
            except ObjectNotFound:
                return False
            return True

    return _with_prefect_api(platform, read)


def _worker_up(platform: Platform) -> str:
    if not _pool_exists(platform):  # an existing pool keeps what the team set on it (concurrency, job template)
        _prefect(platform, "work-pool", "create", platform.work_pool, "--type", "process")
    if _our_pid(platform, "worker") is not None:
        return "already running"
    # The worker's flow runs inherit its environment: they log to the platform's MLflow.
    env = _prefect_env(platform)
    env["MLFLOW_TRACKING_URI"] = platform.mlflow_url
    env.setdefault("PREFECT_WORKER_QUERY_SECONDS", "5")
    started = time.time()
    process = _spawn(platform, "worker", [str(BIN / "prefect"), "worker", "start", "--pool", platform.work_pool,
                                          "--type", "process", "--name", _worker_name(platform),
                                          "--install-policy", "never"], env)
    _wait(platform, "worker", lambda: _worker_online(platform, since=started), process, timeout=120)
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


def deployment_problems(platform: Platform, nightly: str) -> list[str]:
    """What keeps the deployments from running on the platform's worker: one paused, or the nightly one missing or
    taken off the work pool (`flows/deploy.py` against this server serves it itself, and pauses it when it stops)."""
    from prefect.client.orchestration import get_client

    async def read() -> list[str]:
        async with get_client() as client:
            flows = {f.id: f.name for f in await client.read_flows()}
            return [(f"{flows.get(d.flow_id, '?')}/{d.name}", d.paused, d.work_pool_name)
                    for d in await client.read_deployments()]

    found = {name: (paused, pool) for name, paused, pool in _with_prefect_api(platform, read)}
    problems = [f"{name} is paused" for name, (paused, _) in sorted(found.items()) if paused]
    wanted = f"retrain/{nightly}"
    if wanted not in found:
        problems.append(f"{wanted} is not deployed")
    elif found[wanted][1] != platform.work_pool:
        problems.append(f"{wanted} is not on work pool {platform.work_pool} (served by flows/deploy.py?)")
    return problems


# --- the commands ----------------------------------------------------------------------------------------------------


def _check_ports(platform: Platform) -> None:
    """The port of every service still to start must be free before any starts: a taken one is an error now, not
    after PostgreSQL was started (and left running) for an MLflow server that cannot start."""
    ports = {"postgres": platform.postgres_port, "mlflow": platform.mlflow_port, "prefect": platform.prefect_port}
    if len(set(ports.values())) < len(ports):
        raise PlatformError(f"each service needs a port of its own, not {ports}: choose other ports; nothing was "
                            "started")
    taken = [f"{port} ({service}: --{service}-port)" for service, port, ours in (
        ("postgres", platform.postgres_port, _our_cluster_pid(platform)),
        ("mlflow", platform.mlflow_port, _our_pid(platform, "mlflow")),
        ("prefect", platform.prefect_port, _our_pid(platform, "prefect")),
    ) if ours is None and not _port_free(platform.host, port)]
    if taken:
        raise PlatformError(f"port(s) {', '.join(taken)} taken by another program: stop it or choose other ports "
                            "(flags, FUSIONOPS_<SERVICE>_PORT or platform.* in params.yaml); nothing was started")


def up(platform: Platform, project_dir: Path, params) -> dict[str, str]:
    """Start what is not running yet, in dependency order, then (re)deploy prefect.yaml; safe to run again."""
    if not (project_dir / "prefect.yaml").is_file():
        raise PlatformError(f"{project_dir / 'prefect.yaml'} not found: run from the fusionops project folder")
    if platform.host not in ("127.0.0.1", "localhost", "::1"):
        log.warning("the platform's servers have no authentication: on %s anyone who reaches them can run code as "
                    "this user (docs/scaling.md: put auth in front)", platform.host)
    platform.root.mkdir(parents=True, exist_ok=True)
    _check_ports(platform)
    states = {"postgres": _postgres_up(platform)}
    states["mlflow"] = _mlflow_up(platform)
    states["prefect"] = _prefect_up(platform)
    states["worker"] = _worker_up(platform)
    _save_state(platform)
    states["deployments"] = ", ".join(deploy(platform, project_dir, params))
    return states


@dataclass(frozen=True)
class ServiceStatus:
    name: str
    url: str
    pid: int | None
    answers: bool


def status(platform: Platform, nightly: str) -> list[ServiceStatus]:
    """Each service, and the deployments: all on the worker's pool and none paused (`up` deploys them again)."""
    postgres = f"postgresql://{DB_USER}@{platform.host}:{platform.postgres_port}"
    prefect_ok = _http_ok(f"{platform.prefect_api_url}/health")
    ours = _our_pid(platform, "postgres")
    problems = ["the Prefect server does not answer"]
    if prefect_ok:
        try:
            problems = deployment_problems(platform, nightly)
        except Exception as err:  # noqa: BLE001 - /health answers without its database: a status, not a traceback
            problems = [f"cannot read the deployments ({type(err).__name__})"]
    return [
        ServiceStatus("postgres", postgres, ours, ours is not None and _postgres_running(platform)),
        ServiceStatus("mlflow", platform.mlflow_url, _our_pid(platform, "mlflow"),
                      _http_ok(f"{platform.mlflow_url}/health")),
        ServiceStatus("prefect", platform.prefect_api_url, _our_pid(platform, "prefect"), prefect_ok),
        ServiceStatus("worker", f"work pool {platform.work_pool}", _our_pid(platform, "worker"),
                      prefect_ok and _worker_online(platform)),
        ServiceStatus("deployments", "; ".join(problems) or f"on work pool {platform.work_pool}, none paused", None,
                      not problems),
    ]


def down(platform: Platform) -> list[str]:
    """Stop, in reverse order, only the services whose pid files `up` wrote."""
    stopped = [name for name in ("worker", "prefect", "mlflow") if _stop(platform, name)]
    if _postgres_down(platform):
        stopped.append("postgres")
    return stopped
