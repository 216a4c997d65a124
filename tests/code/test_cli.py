"""The console script as a person runs it: exit codes and messages, never a traceback for a user mistake."""

import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pandas as pd
import pytest
import yaml

from fusionops.config import DataParams
from helpers import free_port

FUSIONOPS = str(Path(sys.executable).with_name("fusionops"))
ROOT = Path(__file__).resolve().parents[2]


def run(*args, cwd=None, env=None):
    return subprocess.run([FUSIONOPS, *args], cwd=cwd, capture_output=True, text=True, timeout=300,
                          env=None if env is None else {**os.environ, **env})


def test_help_lists_every_stage():
    result = run("--help")
    assert result.returncode == 0
    for command in ("prepare", "validate", "features", "train", "evaluate", "register", "predict"):
        assert command in result.stdout
    # bracketed notes are text, not markup that swallows them
    options = run("platform", "up", "--help", env={"COLUMNS": "200"}).stdout
    assert "[default: the nearest" in options and "[params: platform.mlflow_port]" in options


def test_help_paragraphs_are_not_cut_mid_sentence():
    """Typer prints a help paragraph's line breaks as written (the command list cuts the first paragraph at one): each
    paragraph is one line in the source."""
    import click
    import typer

    from fusionops.cli import app

    def commands(group):
        for command in group.commands.values():
            yield command
            if isinstance(command, click.Group):
                yield from commands(command)

    for command in commands(typer.main.get_command(app)):
        for paragraph in (command.help or "").strip().split("\n\n"):
            assert "\n" not in paragraph.strip(), f"{command.name}: {paragraph!r}"


def test_dvc_stages_are_cli_commands():
    stages = yaml.safe_load((ROOT / "dvc.yaml").read_text())["stages"]
    assert {name: stage["cmd"] for name, stage in stages.items()} == {n: f"fusionops {n}" for n in stages}


@pytest.fixture()
def project(tmp_path, slice_dir):
    shutil.copytree(slice_dir, tmp_path / "data/raw")
    shutil.copyfile(ROOT / "params.yaml", tmp_path / "params.yaml")
    return tmp_path


def test_prepare_refuses_a_bad_row_or_skips_it_by_policy(project):
    manifest = project / "data/raw/manifest.csv"
    lines = manifest.read_text().splitlines()
    first_id = lines[1].split(",")[0]
    lines[1] = lines[1].replace(".png", "-gone.png", 1)
    manifest.write_text("\n".join(lines) + "\n")
    result = run("prepare", cwd=project)
    assert result.returncode == 2
    assert f"row {first_id!r}, column image" in result.stderr and "nothing was written" in result.stderr
    assert "Traceback" not in result.stderr + result.stdout
    assert not (project / "data/prepared").exists()

    params = yaml.safe_load((project / "params.yaml").read_text())
    params["validate"]["on_bad_rows"] = "skip"
    (project / "params.yaml").write_text(yaml.safe_dump(params))
    result = run("prepare", cwd=project)
    assert result.returncode == 0, result.stderr
    assert f"skipped row {first_id!r}, column image" in result.stderr
    prepared = pd.read_csv(project / "data/prepared/manifest.csv")
    assert first_id not in set(prepared["item_id"]) and len(prepared) == len(lines) - 2
    assert pd.read_csv(project / "data/prepared/rejected.csv")["item_id"].tolist() == [first_id]


def test_prepare_refuses_to_prepare_nothing(project):
    manifest = project / "data/raw/manifest.csv"
    lines = manifest.read_text().splitlines()
    manifest.write_text(lines[0] + "\n")  # the header only
    result = run("prepare", cwd=project)
    assert result.returncode == 2 and "nothing to train on, it has no rows" in result.stderr
    manifest.write_text("\n".join(lines) + "\n")
    params = yaml.safe_load((project / "params.yaml").read_text())
    params["split"]["min_groups_per_label"] = 1000
    (project / "params.yaml").write_text(yaml.safe_dump(params))
    result = run("prepare", cwd=project)
    assert result.returncode == 2 and f"none of its {len(lines) - 1} rows is left" in result.stderr
    assert "Traceback" not in result.stderr and not (project / "data/prepared").exists()


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


def test_validate_a_manifest_lists_every_bad_row_once(zoo, tmp_path):
    folder, manifest, bad, odd = zoo
    report = tmp_path / "report.json"
    result = run("validate", "--manifest", str(manifest), "--images-root", str(folder), "--report", str(report),
                 cwd=ROOT)
    assert result.returncode == 2, result.stderr
    assert "Traceback" not in result.stderr + result.stdout
    lines = [line for line in result.stderr.splitlines() if line.startswith("  row ")]
    named = DataParams().columns  # each column as the manifest names it: the label column is `category`
    for item_id, column in bad.items():
        assert any(f"row {item_id!r}, column {named[column]}:" in line and " -> " in line for line in lines), item_id
    assert not any(item_id in result.stderr for item_id in odd)
    import json

    assert {p["item_id"] for p in json.loads(report.read_text())["problems"]} >= set(bad)


def test_validate_batch_mode(zoo, tmp_path):
    folder, manifest, _, odd = zoo
    params = yaml.safe_load((ROOT / "params.yaml").read_text())
    params["data"].update(manifest=str(manifest), prepared=str(tmp_path / "none.csv"))  # the current dataset
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(params))
    rows = pd.read_csv(manifest, dtype=str, keep_default_na=False)
    batch = rows[rows["item_id"].isin(odd)].assign(item_id=lambda d: "new-" + d["item_id"])
    batch.to_csv(tmp_path / "batch.csv", index=False)
    args = ("validate", "--manifest", str(tmp_path / "batch.csv"), "--images-root", str(folder), "--mode", "batch")
    ok = run(*args, cwd=tmp_path)
    assert ok.returncode == 0, ok.stderr
    batch.assign(category="Spaceships").to_csv(tmp_path / "batch.csv", index=False)
    refused = run(*args, cwd=tmp_path)
    assert refused.returncode == 2 and "unknown label 'Spaceships'" in refused.stderr
    # Items the dataset already has are not new data: each is named by its id, as ingest would refuse it.
    again = rows[rows["item_id"].isin(odd)]
    again.to_csv(tmp_path / "batch.csv", index=False)
    refused = run(*args, cwd=tmp_path)
    assert refused.returncode == 2 and refused.stderr.count("id already in the dataset") == len(again), refused.stderr
    alone = run("validate", "--images-root", str(folder), cwd=tmp_path)  # not silently ignored
    assert alone.returncode == 1 and "--images-root goes with --manifest" in alone.stderr


@pytest.mark.parametrize("content, needle", [
    (b"item_id,image,text\n1,a.png,x\n",
     "data.label_column 'category' is not a column; data.group_column 'emoji_id' is not"),
    (b"item_id,emoji_id,image,text,category\n1,1,a.png,caf\xe9,c\n", "not valid UTF-8 (line 2"),
])
def test_unusable_manifest_is_one_clear_line(tmp_path, content, needle):
    (tmp_path / "m.csv").write_bytes(content)
    result = run("validate", "--manifest", str(tmp_path / "m.csv"), "--images-root", str(tmp_path), cwd=ROOT)
    assert result.returncode == 2 and needle in result.stderr and "Traceback" not in result.stderr


def test_doctor_passes_here_and_names_what_to_fix(project, tmp_path_factory):
    subprocess.run([sys.executable, "-m", "dvc", "init", "--no-scm", "-q"], cwd=project, check=True)
    ok = run("doctor", cwd=project)
    assert ok.returncode == 0, ok.stdout + ok.stderr
    for check in ("packages", "encoders", "folders", "disk", "device", "mlflow", "project"):
        assert check in ok.stdout
    assert not (project / "mlflow.db").exists()  # looking at the store does not create it
    params = yaml.safe_load((project / "params.yaml").read_text())
    params["features"]["image"]["weights"] = "weights/missing.pth"
    params["train"]["head"] = "concatt"
    (project / "params.yaml").write_text(yaml.safe_dump(params))
    broken = run("doctor", cwd=project)
    assert broken.returncode == 1 and "FAIL" in broken.stdout and "encoders, project" in broken.stderr
    dead = f"127.0.0.1:{free_port()}"  # the team engines configured, and not there
    (project / "params.yaml").write_text(yaml.safe_dump(
        params | {"features": {**params["features"], "executor": "dask", "dask_address": f"tcp://{dead}"}}))
    away = run("doctor", cwd=project, env={"PREFECT_API_URL": f"http://{dead}/api"})
    assert away.returncode == 1 and "encoders, prefect, dask, project" in away.stderr, away.stdout + away.stderr
    assert re.search(r"dask\s*│\s*FAIL\s*│\s*no Dask scheduler answers", away.stdout), away.stdout
    assert re.search(r"prefect\s*│\s*FAIL\s*│\s*http://127.0.0.1:\d+/api does not answer", away.stdout), away.stdout
    (project / "params.yaml").write_text(yaml.safe_dump(params))
    assert re.search(r"encoders\s*│\s*FAIL", broken.stdout) and "UserError" in broken.stdout
    assert "train.head 'concatt' is not one of attention, concat, gated" in broken.stdout
    misspelt = params | {"train": {**params["train"], "head": "concat", "batch_szie": 8}}
    (project / "params.yaml").write_text(yaml.safe_dump(misspelt))
    mistake = run("doctor", cwd=project)  # the machine is still checked; the mistake is one of the rows
    assert mistake.returncode == 1 and re.search(r"packages\s*│\s*ok", mistake.stdout), mistake.stderr
    assert re.search(r"params\s*│\s*FAIL", mistake.stdout) and "did you mean batch_size?" in mistake.stdout
    (project / "params.yaml").write_text(yaml.safe_dump(params))
    inside = run("doctor", cwd=project / "data/raw")  # a subfolder: the project's params.yaml, as git finds its repo
    assert inside.returncode == 1 and "encoders, project" in inside.stderr, inside.stdout + inside.stderr
    assert "train.head 'concatt'" in inside.stdout
    elsewhere = tmp_path_factory.mktemp("elsewhere")
    outside = run("doctor", cwd=elsewhere)
    assert outside.returncode == 1 and "params.yaml not found" in outside.stderr
    assert not any(elsewhere.iterdir()) and not (project / "data/raw/mlflow.db").exists()


def test_commands_read_the_project_params_from_a_subfolder(tmp_path):
    (tmp_path / "params.yaml").write_text("platform: {mlflow_port: 5999, dir: .team}\n")
    (tmp_path / ".git").mkdir()  # the project's top folder
    (tmp_path / "data/raw").mkdir(parents=True)
    inside = run("platform", "env", cwd=tmp_path / "data/raw")
    assert inside.returncode == 0 and "MLFLOW_TRACKING_URI=http://127.0.0.1:5999" in inside.stdout, inside.stderr
    assert "note: not answering now: mlflow" in inside.stderr  # the exports are printed all the same, for `eval`
    given = run("platform", "env", "--params", "./params.yaml", cwd=tmp_path / "data/raw")  # as given: not searched
    assert given.returncode == 1 and f"{tmp_path / 'data/raw/params.yaml'} not found" in given.stderr
    assert not (tmp_path / "data/raw/.team").exists() and not (tmp_path / "data/raw/mlflow.db").exists()


def test_a_missing_images_root_is_one_error_not_one_per_row(project):
    for command in (["validate", "--mode", "batch"], ["predict", "--model", "models/fusion", "--out", "out.csv"]):
        result = run(*command, "--manifest", "data/raw/manifest.csv", "--images-root", "nope", cwd=project)
        assert result.returncode == 2 and "Traceback" not in result.stderr, result.stderr
        assert result.stderr.strip() == (f"error: images root {project / 'nope'} is not a folder: the manifest's "
                                         "image paths are relative to it (--images-root, or data.images_root in "
                                         "params.yaml)")


def _commands(group, path=()):
    import click

    for name, command in group.commands.items():
        yield (*path, name)
        if isinstance(command, click.Group):
            yield from _commands(command, (*path, name))


def test_every_help_shows_an_example_and_no_type_on_a_flag():
    import typer
    from typer.testing import CliRunner

    from fusionops.cli import app

    runner = CliRunner()
    for path in [(), *_commands(typer.main.get_command(app))]:
        result = runner.invoke(app, [*path, "--help"], env={"COLUMNS": "120"})
        assert result.exit_code == 0 and "Example: " in result.output, (path, result.output)
        assert "<bool>" not in result.output, (path, result.output)
        assert " ".join(("fusionops", *path)) in result.output.split("Example: ", 1)[1], (path, result.output)


@pytest.mark.parametrize("flow", ["training_pipeline", "retrain", "deploy"])
def test_the_flows_help_looks_like_the_cli(flow):
    result = subprocess.run([sys.executable, str(ROOT / "flows" / f"{flow}.py"), "--help"], capture_output=True,
                            text=True, timeout=300, env={**os.environ, "COLUMNS": "120"})
    assert result.returncode == 0 and "--project-dir" in result.stdout and "Example: " in result.stdout
    assert "╭─ Options" in result.stdout and "<bool>" not in result.stdout  # typer's panels, as `fusionops --help`


def test_a_flow_started_without_the_offline_environment_sets_it_itself():
    """`python flows/...` from a plain shell: no telemetry (Prefect reads its setting when imported), no hub."""
    from fusionops.offline import OFFLINE_ENV

    env = {k: v for k, v in os.environ.items() if k not in OFFLINE_ENV}
    code = ("import sys, os; sys.path.insert(0, 'flows'); import training_pipeline; "
            "from prefect.settings import get_current_settings; "
            "print(get_current_settings().server.analytics_enabled, os.environ['HF_HUB_OFFLINE'], "
            "os.environ['MLFLOW_DISABLE_TELEMETRY'])")
    result = subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=env, capture_output=True, text=True,
                            timeout=300)
    assert result.stdout.split() == ["False", "1", "true"], result.stderr
