"""A user's own data in the first hour, as a new user runs it: a dataset unlike the demo (coloured shapes with
captions; columns uid, file, caption, shape, colour), `fusionops init`, `dvc repro`, the flow, a champion of its own
model. Then the same project with each mistake a new user makes: each gets exactly one message, naming the fix.

Real DVC in a tmp git repo, a real MLflow sqlite store, the flow as `python flows/training_pipeline.py` against the
session's Prefect test server.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from contextlib import contextmanager
from pathlib import Path

import pandas as pd
import pytest
import yaml

from fusionops.init import set_params
from helpers import ROOT, make_shapes, sh

pytestmark = pytest.mark.integration
FUSIONOPS = str(Path(sys.executable).with_name("fusionops"))
FLOW = ROOT / "flows" / "training_pipeline.py"
MODEL = "shapes"  # what init names the model: the project folder's name


def run(*args, cwd: Path, env: dict | None = None) -> subprocess.CompletedProcess:
    """A command as a person runs it (this interpreter's bin first on PATH); its output, whatever its exit code."""
    env = {**os.environ, "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}", **(env or {})}
    return subprocess.run(args, cwd=cwd, env=env, capture_output=True, text=True, timeout=900)


def said(result: subprocess.CompletedProcess) -> str:
    return result.stdout + result.stderr


def once(needle: str, result: subprocess.CompletedProcess) -> None:
    """`needle` (the fix) said exactly once, with no traceback."""
    text = said(result)
    assert text.count(needle) == 1 and "Traceback" not in text, text[-6000:]


@contextmanager
def params_set(project: Path, **values):
    """params.yaml with some keys set (`data__group_column="emoji_id"`), restored afterwards."""
    path = project / "params.yaml"
    before = path.read_text()
    path.write_text(set_params(before, {k.replace("__", "."): v for k, v in values.items()}))
    try:
        yield
    finally:
        path.write_text(before)


@pytest.fixture(scope="module")
def prefect_api(prefect_harness) -> dict:
    """The environment that points a flow run in a subprocess at the session's Prefect test server."""
    from prefect.settings import PREFECT_API_URL

    return {"PREFECT_API_URL": PREFECT_API_URL.value()}


@pytest.fixture(scope="module")
def fresh(tmp_path_factory) -> Path:
    """A project as a fresh clone has it (params.yaml as committed, the demo's), with the user's data as data/raw."""
    root = tmp_path_factory.mktemp("own") / MODEL
    root.mkdir()
    for name in ("dvc.yaml", ".dvcignore", ".gitignore"):
        shutil.copyfile(ROOT / name, root / name)
    for folder in ("src/fusionops", "plots"):
        shutil.copytree(ROOT / folder, root / folder, ignore=shutil.ignore_patterns("__pycache__"))
    # the committed params.yaml, shortened only in training time (the same for every variant)
    text = (ROOT / "params.yaml").read_text()
    (root / "params.yaml").write_text(set_params(text, {"train.max_epochs": 30, "train.patience": 5}))
    make_shapes(root / "data/raw")
    sh("git", "init", "-q", "-b", "main", cwd=root)
    sh(sys.executable, "-m", "dvc", "init", "-q", cwd=root)
    sh(sys.executable, "-m", "dvc", "config", "plots.html_template", "../plots/offline.html", cwd=root)
    sh(sys.executable, "-m", "dvc", "add", "-q", "data/raw", cwd=root)
    sh("git", "add", "-A", cwd=root)
    sh("git", "-c", "user.name=t", "-c", "user.email=t@example.com", "commit", "-qm", "my shapes", cwd=root)
    return root


@pytest.fixture(scope="module")
def initialised(fresh) -> dict:
    before = (fresh / "params.yaml").read_text()
    result = run(FUSIONOPS, "init", "--manifest", "data/raw/manifest.csv", "--images-root", "data/raw", cwd=fresh)
    assert result.returncode == 0, said(result)
    sh("git", "-c", "user.name=t", "-c", "user.email=t@example.com", "commit", "-qam", "fusionops init", cwd=fresh)
    return {"project": fresh, "before": before, "result": result}


@pytest.fixture(scope="module")
def repro(initialised) -> subprocess.CompletedProcess:
    result = run(sys.executable, "-m", "dvc", "repro", cwd=initialised["project"])
    assert result.returncode == 0, said(result)[-6000:]
    return result


@pytest.fixture(scope="module")
def flow_run(repro, initialised, prefect_api) -> subprocess.CompletedProcess:
    from fusionops.offline import OFFLINE_ENV

    # Started without the offline environment: the flow sets it itself (and its stages get it from it).
    env = {key: value for key, value in os.environ.items() if key not in OFFLINE_ENV} | prefect_api
    result = subprocess.run([sys.executable, str(FLOW)], cwd=initialised["project"], capture_output=True, text=True,
                            timeout=900, env={**env, "PATH": f"{Path(sys.executable).parent}{os.pathsep}{env['PATH']}"})
    assert result.returncode == 0, said(result)[-6000:]
    return result


def client(project: Path):
    from mlflow import MlflowClient

    return MlflowClient(tracking_uri=f"sqlite:///{project / 'mlflow.db'}")


# --- the first hour, done right -----------------------------------------------------------------------------------

def test_init_proposes_the_columns_and_edits_only_their_lines(initialised):
    project, before = initialised["project"], initialised["before"]
    out = initialised["result"].stdout
    for role, column in (("id", "uid"), ("image", "file"), ("text", "caption"), ("label", "shape"), ("group", "none")):
        assert any(line.split()[:2] == [role, column] for line in out.splitlines()), out
    assert "also possible: colour" in out  # the other label a person could mean
    after = (project / "params.yaml").read_text()
    changed = [(a, b) for a, b in zip(before.splitlines(), after.splitlines(), strict=True) if a != b]
    # id, image, text, label and group column, model name (manifest and images_root were data/raw's already)
    assert len(before.splitlines()) == len(after.splitlines()) and len(changed) == 7, changed
    for old, new in changed:  # each changed line keeps its comment, at its column
        assert old.split("#", 1)[1:] == new.split("#", 1)[1:] and old.find("#") == new.find("#")
    params = yaml.safe_load(after)
    assert params["data"] | {"manifest": "data/raw/manifest.csv", "images_root": "data/raw"} == {
        **yaml.safe_load(before)["data"], "id_column": "uid", "image_column": "file", "text_column": "caption",
        "label_column": "shape", "group_column": None}
    assert params["registry"]["model_name"] == MODEL


def test_dvc_repro_runs_on_the_first_try_and_flags_the_small_data_trap(repro, initialised):
    project = initialised["project"]
    prepared = pd.read_csv(project / "data/prepared/manifest.csv", dtype=str)
    assert len(prepared) == 80 and (prepared["group"] == prepared["item_id"]).all()  # no group: each item its own
    assert set(prepared["label"]) == {"circle", "square", "triangle", "star"}
    # The captions name the shape: the validation items are separated at any temperature, and the fit ends on its
    # bound. Said once, by evaluate.
    once("the temperature fit ended on its bound", repro)


def test_the_flow_makes_a_champion_of_its_own_model(flow_run, initialised):
    project = initialised["project"]
    out = flow_run.stdout
    assert f"models:/{MODEL}/1 (challenger, champion)" in out and "label 'shape'" in out
    assert "Failed to send telemetry" not in said(flow_run) and "Traceback" not in said(flow_run)
    assert "workflowType=machine_learning" in out  # the UI link opens the runs, not the GenAI view
    c = client(project)
    version = c.get_model_version_by_alias(MODEL, "champion")
    assert str(version.version) == "1" and version.tags["label_column"] == "shape"
    metrics = json.loads((project / "reports/metrics.json").read_text())
    assert f"test accuracy {metrics['test']['accuracy']:.4f}" in version.description
    assert "gate: made champion at registration" in version.description
    run_ = c.get_run(version.run_id)
    assert "test.items" not in run_.data.metrics and run_.data.params["test.items"] == str(metrics["test"]["items"])
    assert run_.data.params["calibration.bins"] == "15" and "calibration.bins" not in run_.data.metrics
    history = pd.read_csv(project / "reports/train_history/fusion.csv")
    steps = c.get_metric_history(version.run_id, "fusion/val_macro_f1")
    assert [m.step for m in steps] == history["epoch"].tolist()
    experiment = c.get_experiment(run_.info.experiment_id)
    assert experiment.tags["mlflow.experimentKind"] == "custom_model_development"


def test_predict_and_serve_speak_the_manifests_column_names(flow_run, initialised, tmp_path):
    project = initialised["project"]
    manifest = pd.read_csv(project / "data/raw/manifest.csv").head(6)
    manifest.to_csv(tmp_path / "new.csv", index=False)
    out = tmp_path / "predictions.csv"
    sh(FUSIONOPS, "predict", "--model", f"models:/{MODEL}@champion", "--manifest", str(tmp_path / "new.csv"),
       "--images-root", str(project / "data/raw"), "--out", str(out), cwd=project)
    predictions = pd.read_csv(out)
    assert list(predictions.columns) == ["uid", "prediction", "confidence", "modalities"]
    from fusionops.config import load_params
    from fusionops.registry import load_pyfunc

    model = load_pyfunc(f"models:/{MODEL}@champion", load_params(project / "params.yaml"))
    rows = pd.DataFrame({"file": [str(project / "data/raw" / f) for f in manifest["file"]],
                         "caption": manifest["caption"]})
    served = model.predict(rows)  # the manifest's own column names, through the model's signature
    assert (served["modalities"] == "image+text").all()
    assert served["label"].tolist() == predictions["prediction"].tolist()


def test_metrics_fit_a_terminal_and_plots_render_offline(flow_run, initialised, tmp_path):
    project = initialised["project"]
    shown = sh(sys.executable, "-m", "dvc", "metrics", "show", cwd=project)
    lines = [line for line in shown.splitlines() if line.strip()]
    assert len(lines) == 2 and max(map(len, lines)) <= 80, shown  # one file, no validation report
    assert "reports/scores.json" in shown and "validation" not in shown
    sh(sys.executable, "-m", "dvc", "plots", "show", "-o", str(tmp_path / "plots"), cwd=project)
    page = (tmp_path / "plots/index.html").read_text()
    assert "<script src=" not in page and "cdn.jsdelivr.net" not in page  # nothing to load from the network
    assert "vegaEmbed" in page and "validation macro-F1 per epoch" in page
    assert (project / "reports/plots/training_curves.png").read_bytes()[:4] == b"\x89PNG"
    assert "training_curves.png" in page  # beside the confusion matrix


# --- the same project, with each mistake a new user makes ----------------------------------------------------------

@pytest.fixture()
def copy_of(flow_run, initialised, tmp_path):
    """The project as `cp -r` copies it (its mlflow.db too)."""
    copy = tmp_path / "copy"
    shutil.copytree(initialised["project"], copy, symlinks=True)
    return copy


def test_the_demos_group_column_left_in_params_is_one_message(copy_of, prefect_api):
    with params_set(copy_of, data__group_column="emoji_id"):
        repro = run(sys.executable, "-m", "dvc", "repro", cwd=copy_of)
        assert repro.returncode != 0
        once("set data.group_column: null if items need no grouping", repro)
        flow = run(sys.executable, str(FLOW), cwd=copy_of, env=prefect_api)
    assert flow.returncode == 2, said(flow)[-4000:]
    once("set data.group_column: null if items need no grouping", flow)
    assert "Retry" not in said(flow)


def test_a_misspelt_column_gets_a_did_you_mean(initialised, flow_run):
    project = initialised["project"]
    with params_set(project, data__text_column="captoin"):
        result = run(FUSIONOPS, "prepare", cwd=project)
    assert result.returncode == 2
    once("data.text_column 'captoin' is not a column (did you mean 'caption'?)", result)


def test_a_model_name_holding_other_labels_is_refused_before_anything_runs(initialised, flow_run, prefect_api):
    """Still named like a model trained on another label column: refused before any stage and any version, once,
    with no retry."""
    project = initialised["project"]
    versions = len(client(project).search_model_versions(f"name='{MODEL}'"))
    with params_set(project, data__label_column="colour"):
        result = run(sys.executable, str(FLOW), cwd=project, env=prefect_api)
    assert result.returncode == 2, said(result)[-4000:]
    once(f"give this model its own name in params.yaml, registry.model_name: {MODEL}-colour", result)
    assert "Running stage" not in said(result) and "Retry" not in said(result)
    assert len(client(project).search_model_versions(f"name='{MODEL}'")) == versions


def doctor_row(result: subprocess.CompletedProcess, check: str) -> str:
    """The first line of a check's row in `fusionops doctor`'s table."""
    return next(line for line in result.stdout.splitlines()
                if line.split("│")[1:2] and line.split("│")[1].strip() == check)


def test_a_copied_project_never_writes_into_the_original(copy_of, initialised):
    original = initialised["project"] / "mlartifacts"
    files = sorted(original.rglob("*"))
    doctor = run(FUSIONOPS, "doctor", cwd=copy_of)
    assert doctor.returncode == 1 and "1 check(s) failed: mlflow" in doctor.stderr, said(doctor)
    assert "FAIL" in doctor_row(doctor, "mlflow") and "copied" in doctor.stdout
    assert "fusionops-copy" in doctor.stdout  # the fix (registry.experiment: fusionops-copy), in its "to fix" column
    registered = run(FUSIONOPS, "register", cwd=copy_of)
    assert registered.returncode == 1
    once("the project was copied or moved with its store", registered)
    assert sorted(original.rglob("*")) == files
    with params_set(copy_of, registry__experiment="fusionops-copy"):  # the fix it names
        assert " ok " in doctor_row(run(FUSIONOPS, "doctor", cwd=copy_of), "mlflow")


def test_promote_dry_run_and_rollback_to_a_version(initialised, flow_run):
    """A second version (another seed), the gate asked first with --dry-run, then champion moved by hand."""
    project = initialised["project"]
    with params_set(project, train__seed=1):
        sh(sys.executable, "-m", "dvc", "repro", cwd=project)
        sh(FUSIONOPS, "register", cwd=project)
        c = client(project)
        before = {a: str(c.get_model_version_by_alias(MODEL, a).version) for a in ("champion", "challenger")}
        assert before == {"champion": "1", "challenger": "2"}
        dry = sh(FUSIONOPS, "promote", "--dry-run", cwd=project)
        assert f"{MODEL}: dry run: version 2 would be " in dry and "nothing changed" in dry
        assert {a: str(c.get_model_version_by_alias(MODEL, a).version) for a in before} == before
        assert "promotion.decision" not in c.get_model_version(MODEL, "2").tags
        wrong = run(FUSIONOPS, "rollback", "--to", "9", cwd=project)
        assert wrong.returncode == 1
        once(f"--to 9: {MODEL} has no version 9 ({MODEL} has versions 1, 2", wrong)
        moved = sh(FUSIONOPS, "rollback", "--to", "2", cwd=project)
        assert "champion moved from version 1 to version 2 (--to 2)" in moved
        assert str(c.get_model_version_by_alias(MODEL, "champion").version) == "2"
        assert c.get_model_version(MODEL, "1").tags["promotion.blocked"].startswith("rolled back to version 2")
    sh(sys.executable, "-m", "dvc", "repro", cwd=project)  # seed 0 again: the project as the other tests left it
