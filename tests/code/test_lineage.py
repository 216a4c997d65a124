"""Lineage read from git and DVC files: which uncommitted changes a rebuild from the commit could not restore."""

from __future__ import annotations

import subprocess
from pathlib import Path

import pytest

from fusionops.lineage import git_commit, uncommitted_code
from fusionops.registry import library_changes


def _git(*args: str, cwd: Path) -> None:
    subprocess.run(["git", "-c", "user.name=t", "-c", "user.email=t@example.com", *args], cwd=cwd, check=True,
                   capture_output=True)


DVC_YAML = """stages:
  train:
    cmd: fusionops train
    deps: [./src/model.py, src/features/, "${data.manifest}"]
"""
PARAMS = "data: {manifest: data/raw/manifest.csv}\n"


def _commit(root: Path, files: dict[str, str]) -> None:
    for name, text in files.items():
        (root / name).parent.mkdir(parents=True, exist_ok=True)
        (root / name).write_text(text)
    _git("init", "-q", cwd=root)
    _git("add", "-A", cwd=root)
    _git("commit", "-qm", "v1", cwd=root)


def test_only_code_changes_count_as_uncommitted_code(tmp_path):
    files = ["src/model.py", "src/features/text.py", "params.yaml", "dvc.lock", "data/raw.dvc", "data/.gitignore",
             ".dvc/config", "reports/metrics.json", "README.md", "tests/test_model.py", "src/serving.py", "dvc.yaml"]
    _commit(tmp_path, {name: DVC_YAML if name == "dvc.yaml" else PARAMS if name == "params.yaml" else "v1\n"
                       for name in files})
    assert uncommitted_code(tmp_path, [tmp_path / "reports"]) == [] and git_commit(tmp_path)[1] is False

    # what a run logs, DVC versions or configures, and files no stage runs (docs, tests, serving code)
    for name in files[2:-1]:
        (tmp_path / name).write_text(PARAMS + "# v2\n" if name == "params.yaml" else "v2\n")
    (tmp_path / "untracked.py").write_text("new\n")
    assert uncommitted_code(tmp_path, [tmp_path / "reports"]) == [] and git_commit(tmp_path)[1] is True

    (tmp_path / "src/model.py").write_text("v2\n")
    (tmp_path / "src/features/text.py").write_text("v2\n")
    assert uncommitted_code(tmp_path, [tmp_path / "reports"]) == ["src/features/text.py", "src/model.py"]
    (tmp_path / "dvc.yaml").write_text(DVC_YAML.replace("./src/model.py, ", ""))  # the stages' commands changed
    assert uncommitted_code(tmp_path, [tmp_path / "reports"]) == ["dvc.yaml", "src/features/text.py"]


EVERY = ["README.md", "conf/train.yaml", "lib/util.py", "src/params.yaml", "src/train.py"]


@pytest.mark.parametrize("dvc_yaml, counted", [
    # deps relative to the stage's wdir, another params file, a template filled from vars
    ("vars: [{code: lib}]\nstages:\n  train:\n    wdir: src\n    cmd: python train.py\n"
     "    deps: [train.py, '../${code}/util.py']\n    params: [{../conf/train.yaml: [lr]}, lr]\n",
     ["conf/train.yaml", "lib/util.py", "src/params.yaml", "src/train.py"]),  # `lr`: params.yaml of the wdir
    # foreach: `${item}` cannot be filled here, so every change counts
    ("stages:\n  train:\n    foreach: [a, b]\n    do:\n      cmd: python src/train.py ${item}\n"
     "      deps: [src/train.py, 'data/${item}']\n", EVERY),
    # the whole project as a dep, a malformed dvc.yaml: every change counts
    ("stages:\n  train:\n    cmd: make\n    deps: [.]\n",
     EVERY),
    ("stages: [train]\n", EVERY),
])
def test_stage_code_follows_how_dvc_reads_dvc_yaml(tmp_path, dvc_yaml, counted):
    files = ["src/train.py", "lib/util.py", "conf/train.yaml", "src/params.yaml", "README.md"]
    _commit(tmp_path, {"dvc.yaml": dvc_yaml, **{name: "v1\n" for name in files}})
    for name in files:
        (tmp_path / name).write_text("v2\n")
    assert uncommitted_code(tmp_path, []) == counted


def test_without_dvc_yaml_every_tracked_change_counts(tmp_path):
    for name in ("README.md", "src/model.py", "reports/metrics.json"):
        (tmp_path / name).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / name).write_text("v1\n")
    _git("init", "-q", cwd=tmp_path)
    _git("add", "-A", cwd=tmp_path)
    _git("commit", "-qm", "v1", cwd=tmp_path)
    for name in ("README.md", "src/model.py", "reports/metrics.json"):
        (tmp_path / name).write_text("v2\n")
    assert uncommitted_code(tmp_path, [tmp_path / "reports"]) == ["README.md", "src/model.py"]


def test_outside_a_git_repository_nothing_is_known(tmp_path):
    assert uncommitted_code(tmp_path, []) is None and git_commit(tmp_path) == (None, False)


def test_library_changes_name_each_library_that_differs_from_the_registered_version():
    from importlib.metadata import version

    torch, numpy = version("torch"), version("numpy")
    logged = {"torch": torch, "numpy": "0.0.1", "no-such-library-here": "1.0"}
    assert library_changes(logged) == ["no-such-library-here not installed (registered with 1.0)",
                                       f"numpy {numpy} (registered with 0.0.1)"]
    assert library_changes({"torch": torch, "mlflow": "0.0.1"}) == []  # mlflow serves the model, no part of its weights
    assert library_changes({"torch": f"{torch}+cu999"}) == [f"torch {torch} (registered with {torch}+cu999)"]
