"""The console script as a person runs it: exit codes and messages, never a traceback for a user mistake."""

import shutil
import subprocess
import sys
from pathlib import Path

import pytest

FUSIONOPS = str(Path(sys.executable).with_name("fusionops"))
ROOT = Path(__file__).resolve().parents[2]


def run(*args, cwd=None):
    return subprocess.run([FUSIONOPS, *args], cwd=cwd, capture_output=True, text=True, timeout=300)


def test_help_lists_every_stage():
    result = run("--help")
    assert result.returncode == 0
    for command in ("prepare", "validate", "features", "train", "evaluate", "register", "predict"):
        assert command in result.stdout


def test_dvc_stages_are_cli_commands():
    import yaml

    stages = yaml.safe_load((ROOT / "dvc.yaml").read_text())["stages"]
    assert {name: stage["cmd"] for name, stage in stages.items()} == {n: f"fusionops {n}" for n in stages}


@pytest.fixture()
def project(tmp_path, slice_dir):
    shutil.copytree(slice_dir, tmp_path / "data/raw")
    shutil.copyfile(ROOT / "params.yaml", tmp_path / "params.yaml")
    return tmp_path


def test_validate_names_bad_rows_and_exits_2(project):
    manifest = project / "data/raw/manifest.csv"
    lines = manifest.read_text().splitlines()
    first_id = lines[1].split(",")[0]
    lines[1] = lines[1].replace(".png", "-gone.png", 1)
    manifest.write_text("\n".join(lines) + "\n")
    assert run("prepare", cwd=project).returncode == 0
    result = run("validate", cwd=project)
    assert result.returncode == 2
    assert f"row {first_id!r}, column image" in result.stderr
    assert "Traceback" not in result.stderr + result.stdout
    assert (project / "reports/validation.json").is_file()


def test_bad_params_is_a_message_not_a_traceback(project):
    (project / "params.yaml").write_text("train: {epochs: 3}\n")
    result = run("train", cwd=project)
    assert result.returncode == 1
    assert "train.epochs" in result.stderr and "Traceback" not in result.stderr


@pytest.mark.parametrize("command, advice", [
    ("validate", "run `fusionops prepare` first"),
    ("train", "run `fusionops features` first"),
    ("evaluate", "run `fusionops features` first"),
    ("register", "run the pipeline"),
])
def test_stage_out_of_order_says_what_to_run(project, command, advice):
    if command != "validate":
        assert run("prepare", cwd=project).returncode == 0
    result = run(command, cwd=project)
    assert result.returncode == 1, result.stderr
    assert advice in result.stderr and "Traceback" not in result.stderr
