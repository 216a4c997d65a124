"""Shared fixtures: the offline environment, a small real slice of the demo data, the real encoders."""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

import pandas as pd
import pytest

# Offline and isolated before anything imports prefect, mlflow or transformers: no telemetry, no hub lookups, and a
# Prefect home of the test session's own so tests never touch the user's database.
from fusionops.offline import OFFLINE_ENV

os.environ.update({
    **OFFLINE_ENV,
    "PREFECT_HOME": tempfile.mkdtemp(prefix="fusionops-prefect-"),
    "MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR": "false",
})
for leaked in ("MLFLOW_TRACKING_URI", "MLFLOW_LOGGING_LEVEL", "PREFECT_API_URL"):  # a shell's platform env, etc.
    os.environ.pop(leaked, None)

from helpers import DEMO, take_slice, write_dataset  # noqa: E402 - after the environment above


@pytest.fixture(scope="session")
def demo_dir() -> Path:
    return DEMO


@pytest.fixture(scope="session")
def demo_manifest() -> pd.DataFrame:
    return pd.read_csv(DEMO / "manifest.csv", dtype=str, keep_default_na=False)


@pytest.fixture(scope="session")
def slice_dir(tmp_path_factory, demo_manifest) -> Path:
    """120 real items: 15 emoji x 2 vendors in each of 4 categories."""
    return write_dataset(take_slice(demo_manifest, 15), tmp_path_factory.mktemp("slice"))


@pytest.fixture(scope="session")
def image_encoder():
    from fusionops.config import ImageEncoderParams
    from fusionops.features.image import build_image_encoder

    return build_image_encoder(ImageEncoderParams())


@pytest.fixture(scope="session")
def text_encoder():
    from fusionops.config import TextEncoderParams
    from fusionops.features.text import build_text_encoder

    return build_text_encoder(TextEncoderParams())


@pytest.fixture(scope="session")
def prefect_harness():
    """One Prefect test server for the whole session (it takes ~20 s to start)."""
    from prefect.testing.utilities import prefect_test_harness

    with prefect_test_harness(server_startup_timeout=120):
        yield


@pytest.fixture(scope="session")
def team_platform(tmp_path_factory, slice_dir):
    """`fusionops platform up` for real: PostgreSQL, MLflow and Prefect servers on it, a worker, the deployments.

    Stopped with `fusionops platform down` after the session; `down` must leave none of its processes behind.
    """
    import shutil
    import subprocess
    import sys

    from helpers import free_port, make_project

    project = make_project(tmp_path_factory.mktemp("team") / "project", slice_dir, model_name="team-test",
                           flows=True)
    # PostgreSQL runs as an unprivileged user when the tests run as root: its folder must be reachable by it.
    root = Path(tempfile.mkdtemp(prefix="fusionops-platform-"))
    root.chmod(0o755)
    fusionops = str(Path(sys.executable).with_name("fusionops"))
    ports = {"postgres": free_port(), "mlflow": free_port(), "prefect": free_port()}
    flags = ["--dir", str(root)]
    command = [fusionops, "platform", "up", *flags, *(f"--{k}-port={v}" for k, v in ports.items())]
    # A worker that polls, and a scheduler that loops, every few seconds rather than every 10 and 60.
    env = {**os.environ, "PREFECT_WORKER_QUERY_SECONDS": "2", "PREFECT_SERVER_SERVICES_SCHEDULER_LOOP_SECONDS": "5",
           "PATH": f"{Path(sys.executable).parent}:"
           f"{os.environ['PATH']}"}
    try:
        started = subprocess.run(command, cwd=project, env=env, capture_output=True, text=True, timeout=900)
        assert started.returncode == 0, started.stdout + started.stderr
        yield {"root": root, "project": project, "ports": ports, "flags": flags, "up": started.stdout, "env": env,
               "mlflow": f"http://127.0.0.1:{ports['mlflow']}", "api": f"http://127.0.0.1:{ports['prefect']}/api"}
    finally:
        groups = [int(p.read_text().split()[0]) for p in (root / "run").glob("*.pid")]
        down = subprocess.run([fusionops, "platform", "down", *flags], cwd=project, env=env, capture_output=True,
                              text=True, timeout=300)
        left = [pid for pid in groups if _group_runs(pid)]
        shutil.rmtree(root, ignore_errors=True)
        assert down.returncode == 0 and len(groups) == 4 and not left, f"{down.stdout}{down.stderr}; left: {left}"


def _group_runs(pgid: int) -> bool:
    """Whether a process of the group (or the process, for PostgreSQL's postmaster) is still running."""
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            pid = int(stat.parent.name)
            state, _, pgrp = stat.read_text().rsplit(")", 1)[1].split()[:3]
        except (OSError, ValueError):
            continue
        if (int(pgrp) == pgid or pid == pgid) and state != "Z":
            return True
    return False


@pytest.fixture(scope="session")
def slice_prepared(slice_dir):
    """The slice through prepare (stable grouped split)."""
    from fusionops.config import DataParams, SplitParams
    from fusionops.data.manifest import read_manifest
    from fusionops.data.prepare import prepare_manifest

    return prepare_manifest(read_manifest(slice_dir / "manifest.csv"), DataParams(), SplitParams())


@pytest.fixture(scope="session")
def slice_features(slice_dir, slice_prepared, tmp_path_factory):
    """Real vectors of the slice (both encoders), aligned with slice_prepared."""
    from fusionops.config import FeaturesParams
    from fusionops.features import extract_features, load_features

    root = tmp_path_factory.mktemp("slice-features")
    params = FeaturesParams(out_dir=root / "out", cache_dir=root / "cache", num_workers=0)
    extract_features(slice_prepared, slice_dir, params)
    return load_features(params.out_dir)


@pytest.fixture(scope="session")
def zoo(tmp_path_factory, demo_manifest):
    """(folder, manifest, {bad id: column}, [odd-but-valid ids]): 48 real items plus every broken and odd row."""
    from helpers import make_zoo

    folder = tmp_path_factory.mktemp("zoo") / "data"
    return folder, *make_zoo(folder, take_slice(demo_manifest, 6))


@pytest.fixture(autouse=True)
def _tracking_uri_does_not_leak():
    """mlflow.set_tracking_uri exports MLFLOW_TRACKING_URI, and the CLI run in-process (CliRunner) or a flow module
    sets MLFLOW_LOGGING_LEVEL: one test's settings must not become the next one's."""
    before = {key: os.environ.get(key) for key in ("MLFLOW_TRACKING_URI", "MLFLOW_LOGGING_LEVEL")}
    yield
    for key, value in before.items():
        if value is None:
            os.environ.pop(key, None)
        else:
            os.environ[key] = value
