"""Data on a DVC remote: every ingested version is pushed; a fresh clone pulls it and rebuilds the exact model."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

from helpers import make_project, sh, take_slice, write_dataset

pytestmark = pytest.mark.integration
FUSIONOPS = str(Path(sys.executable).with_name("fusionops"))


def test_clone_pull_repro_rebuilds_the_registered_model(tmp_path, slice_dir, demo_manifest):
    store = tmp_path / "dvc-store"
    project = make_project(tmp_path / "origin", slice_dir, model_name="remote-test",
                           remote={"url": str(store)},
                           registry={"tracking_uri": f"sqlite:///{tmp_path / 'mlflow.db'}"})
    batch = write_dataset(take_slice(demo_manifest, 2, skip_groups=20), tmp_path / "batch-1")
    sh(FUSIONOPS, "ingest", str(batch), cwd=project)  # appends, `dvc add`s and pushes the new version
    assert any(store.rglob("*")), "nothing was pushed"
    sh(sys.executable, "-m", "dvc", "repro", cwd=project)
    sh(FUSIONOPS, "register", cwd=project)
    sh("git", "add", "-A", cwd=project)
    sh("git", "-c", "user.name=t", "-c", "user.email=t@example.com", "commit", "-qm", "data v2 + model", cwd=project)

    clone = tmp_path / "clone"
    sh("git", "clone", "-q", str(project), str(clone), cwd=tmp_path)
    assert not (clone / "data/raw").exists()
    sh(sys.executable, "-m", "dvc", "pull", "-q", "data/raw.dvc", cwd=clone)
    sh(sys.executable, "-m", "dvc", "repro", cwd=clone)
    rebuilt = json.loads((clone / "reports/metrics.json").read_text())

    from mlflow import MlflowClient

    client = MlflowClient(tracking_uri=f"sqlite:///{tmp_path / 'mlflow.db'}")
    version = client.get_model_version_by_alias("remote-test", "champion")
    logged = client.get_run(version.run_id).data.metrics
    assert rebuilt["test"]["accuracy"] == logged["test.accuracy"]
    assert rebuilt["test"]["macro_f1"] == logged["test.macro_f1"]
    files = sorted(p.relative_to(project) for p in (project / "models").rglob("*") if p.is_file())
    assert "models/fusion/neighbours.safetensors" in map(str, files)
    for name in files:  # weights, config, neighbour index: every byte reproduced from the data version
        assert (clone / name).read_bytes() == (project / name).read_bytes(), name
    assert "Data and pipelines are up to date" in sh(sys.executable, "-m", "dvc", "status", cwd=clone)
