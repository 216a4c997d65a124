"""The real flow on a slice: DVC in a temporary git repository, a real Prefect server, a real MLflow sqlite store."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pandas as pd
import pytest
import yaml

from helpers import sh

pytestmark = pytest.mark.integration

MODEL_NAME = "fusionops-test"


@pytest.fixture(scope="module")
def project(tmp_path_factory, slice_dir):
    """A git + DVC project like a fresh clone after `make data`, holding the slice as data/raw."""
    from helpers import make_project

    root = make_project(tmp_path_factory.mktemp("project"), slice_dir, model_name=MODEL_NAME)
    with pytest.MonkeyPatch.context() as env:  # the flows' own MLflow calls find the project's store
        env.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{root / 'mlflow.db'}")
        yield root


@pytest.fixture(scope="module")
def flow_module():
    from helpers import load_flow

    return load_flow("training_pipeline")


@pytest.fixture(scope="module")
def first_run(prefect_harness, project, flow_module):
    return flow_module.training_pipeline(project_dir=project)


@pytest.fixture(scope="module")
def second_run(first_run, project, flow_module):
    return flow_module.training_pipeline(project_dir=project)


def client():
    from mlflow import MlflowClient

    return MlflowClient(tracking_uri=os.environ["MLFLOW_TRACKING_URI"])


def test_flow_runs_every_stage_and_reports(first_run, project):
    assert first_run["stages"] == {s: "ran" for s in ("prepare", "validate", "features", "train", "evaluate")}
    metrics = json.loads((project / "reports/metrics.json").read_text())
    assert metrics == first_run["metrics"]
    assert set(metrics["ablation"]) == {"image_only", "text_only"}
    prepared = pd.read_csv(project / "data/prepared/manifest.csv")
    n_test = int((prepared["split"] == "test").sum())
    assert set(metrics["missing_modality"]) == {"no_text", "no_image"}
    for block in (metrics["test"], *metrics["ablation"].values(), *metrics["missing_modality"].values()):
        assert block["items"] == n_test
    assert metrics["test"]["accuracy"] > 0.5  # 4 classes: chance is 0.25
    assert metrics["fusion_gain_vs_best_single"] == pytest.approx(
        metrics["test"]["accuracy"] - max(m["accuracy"] for m in metrics["ablation"].values()), abs=1e-4)
    assert (project / "reports/plots/confusion_matrix.png").read_bytes()[:4] == b"\x89PNG"
    assert (project / "reports/plots/reliability.png").read_bytes()[:4] == b"\x89PNG"
    calibration = metrics["calibration"]
    assert calibration["temperature"] > 0 and 0 <= calibration["ece_after"] <= 1 and calibration["nll_after"] > 0
    # Wall-clock figures stay out of metrics.json and out of git (they change with the machine, not the data).
    assert "timing" not in metrics and "timing.json" in sh("git", "check-ignore", "reports/timing.json", cwd=project)
    timing = json.loads((project / "reports/timing.json").read_text())
    assert set(timing["train_seconds"]) == {"fusion", "image_only", "text_only"}
    assert all(s > 0 for s in timing["train_seconds"].values()) and timing["head_us_per_item"] > 0
    latency = timing["latency_ms_per_item"]
    assert 0 < latency["p50"] <= latency["p95"] and latency["items"] == min(32, n_test)
    # The test predictions' confidences are the temperature-scaled ones the served model gives.
    from fusionops.features import load_features
    from fusionops.labels import LabelTask
    from fusionops.models import load_model
    from fusionops.train import predict_logits, split_data

    model, config = load_model(project / "models/fusion")
    test = split_data(pd.read_csv(project / "data/prepared/manifest.csv", dtype=str, keep_default_na=False),
                      load_features(project / "data/features"), LabelTask.from_config(config), "test")
    logits = predict_logits(model, test.image, test.text)
    predictions = pd.read_csv(project / "reports/predictions.csv", dtype={"item_id": str}).set_index("item_id")
    confidence = predictions.loc[test.item_ids, "confidence"].to_numpy()
    assert confidence == pytest.approx((logits / config["temperature"]).softmax(1).amax(1).numpy(), abs=1e-4)
    if abs(config["temperature"] - 1) > 0.05:  # ...not the raw ones
        assert confidence != pytest.approx(logits.softmax(1).amax(1).numpy(), abs=1e-4)
    assert json.loads((project / "reports/validation.json").read_text())["success"] is True


def test_dvc_agrees_after_the_flow(first_run, project):
    assert "Data and pipelines are up to date" in sh(sys.executable, "-m", "dvc", "status", cwd=project)
    repro = sh(sys.executable, "-m", "dvc", "repro", cwd=project)
    assert "Running stage" not in repro and "Data and pipelines are up to date" in repro


def test_first_version_is_champion_with_lineage(first_run, project):
    registered = first_run["registered"]
    assert registered["version"] == "1" and registered["aliases"] == ["challenger", "champion"]
    c = client()
    champion = c.get_model_version_by_alias(MODEL_NAME, "champion")
    assert str(champion.version) == "1"
    raw_md5 = yaml.safe_load((project / "data/raw.dvc").read_text())["outs"][0]["md5"]
    head = sh("git", "rev-parse", "HEAD", cwd=project).strip()
    assert champion.tags["data_version"] == raw_md5
    assert champion.tags["git_commit"] == head
    run = c.get_run(registered["run_id"])
    assert run.data.tags["data_version"] == raw_md5
    assert run.data.metrics["test.accuracy"] == first_run["metrics"]["test"]["accuracy"]
    assert run.data.params["data.label_column"] == "category"
    logged = {a.path for a in c.list_artifacts(registered["run_id"], "reports")}
    assert {"reports/metrics.json", "reports/validation.json", "reports/dvc.lock"} <= logged
    # evaluate.breakdown: the test scores per vendor, as metrics and as a table
    by_vendor = first_run["metrics"]["breakdown"]["vendor"]
    assert set(by_vendor) == {"google", "twitter"}
    assert run.data.metrics["breakdown.vendor.google.accuracy"] == by_vendor["google"]["accuracy"]
    assert "breakdown/vendor.json" in {a.path for a in c.list_artifacts(registered["run_id"], "breakdown")}


def test_flow_publishes_a_markdown_report(first_run):
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.sorting import LogSort

    with get_client(sync_client=True) as prefect:
        artifacts = prefect.read_artifacts()
        logs = [log.message for log in prefect.read_logs(limit=200, sort=LogSort.TIMESTAMP_DESC)]
    reports = [a.data for a in artifacts if a.key == "training-report"]
    first = [r for r in reports if "version **1**" in r]
    assert first and "| fusion |" in first[0] and "Data version (DVC)" in first[0]
    # ...and the run's log says the outcome in a line (a deployment's run has no terminal to print to)
    assert any(m.startswith("test accuracy ") and "/1 (challenger, champion); gate nothing to compare" in m
               for m in logs), [m for m in logs if "accuracy" in m]


def test_the_summary_says_the_first_version_had_nothing_to_compare_with(first_run, second_run, project,
                                                                        flow_module, monkeypatch):
    first = flow_module._summary(project, first_run).splitlines()
    assert ("  gate          nothing to compare: version 1 is the first, champion since its registration"
            in first)
    again = flow_module._summary(project, second_run).splitlines()
    assert ("  gate          unchanged: version 1 is already the champion (made champion at registration: there "
            "was none)" in again)
    monkeypatch.chdir(project / "data")  # started from a subfolder: paths as typed from there
    assert any(line.startswith("  reports       ../reports/metrics.json")
               for line in flow_module._summary(project, second_run).splitlines())


def test_the_report_gives_a_promoted_version_its_champion_alias(flow_module):
    """Registration makes a version challenger; a promotion in the same run makes it champion too."""
    registered = {"name": "m", "version": "3", "new": True, "aliases": ["challenger"]}
    assert flow_module._registered(registered, {"decision": "promoted", "champion": "3"}) == "challenger, champion"
    assert flow_module._registered(registered, {"decision": "unchanged", "champion": "2"}) == "challenger"
    assert flow_module._registered(registered | {"new": False}, {}) == "already registered: same weights"


def test_second_run_skips_stages_and_registers_nothing_new(second_run):
    """Nothing changed: DVC runs no stage, the same weights are not registered twice, the gate has nothing to do."""
    assert set(second_run["stages"].values()) == {"skipped (up to date)"}
    assert second_run["registered"]["version"] == "1" and second_run["registered"]["new"] is False
    assert second_run["promotion"]["decision"] == "unchanged"
    assert second_run["promotion"]["reason"] == ("version 1 is already the champion "
                                                 "(made champion at registration: there was none)")
    assert len(client().search_model_versions(f"name='{MODEL_NAME}'")) == 1


def test_predict_with_the_champion_on_unseen_items(first_run, project, demo_manifest, tmp_path):
    from helpers import take_slice, write_dataset

    unseen = take_slice(demo_manifest, 3, skip_groups=40)
    seen = set(pd.read_csv(project / "data/raw/manifest.csv")["item_id"])
    assert not set(unseen["item_id"]) & seen
    folder = write_dataset(unseen, tmp_path / "unseen")
    out = tmp_path / "predictions.csv"
    sh(str(Path(sys.executable).with_name("fusionops")), "predict", "--model", f"models:/{MODEL_NAME}@champion",
       "--manifest", str(folder / "manifest.csv"), "--images-root", str(folder), "--out", str(out), cwd=project)
    predictions = pd.read_csv(out)
    assert list(predictions.columns) == ["item_id", "prediction", "confidence", "modalities"]
    assert (predictions["modalities"] == "image+text").all()
    assert predictions["item_id"].tolist() == unseen["item_id"].tolist()
    assert predictions["confidence"].between(0, 1).all()
    assert (predictions["prediction"] == unseen["category"].to_numpy()).mean() > 0.5


def test_served_model_agrees_with_evaluate(first_run, project, tmp_path):
    """The pyfunc (images decoded again, encoders rebuilt) predicts what evaluate predicted from cached vectors."""
    prepared = pd.read_csv(project / "data/prepared/manifest.csv", dtype=str)
    test = prepared[prepared["split"] == "test"]
    manifest = tmp_path / "test.csv"
    test.to_csv(manifest, index=False)
    out = tmp_path / "out.csv"
    sh(str(Path(sys.executable).with_name("fusionops")), "predict", "--model", f"models:/{MODEL_NAME}/1",
       "--manifest", str(manifest), "--images-root", str(project / "data/raw"), "--out", str(out), cwd=project)
    served = pd.read_csv(out).set_index("item_id")["prediction"]
    evaluated = pd.read_csv(project / "reports/predictions.csv").set_index("item_id")["predicted"]
    assert (served.loc[evaluated.index] == evaluated).mean() >= 0.95
    # The trained folder itself (what the registry holds a copy of) predicts the same, to the last digit.
    local = tmp_path / "local.parquet"  # and --out .parquet writes Parquet
    sh(str(Path(sys.executable).with_name("fusionops")), "predict", "--model", "models/fusion",
       "--manifest", str(manifest), "--images-root", str(project / "data/raw"), "--out", str(local), cwd=project)
    pd.testing.assert_frame_equal(pd.read_parquet(local), pd.read_csv(out, dtype={"item_id": str}))


def test_served_model_classifies_with_a_modality_missing(first_run, project, tmp_path):
    """Empty texts (then empty image paths) in the manifest: each item is classified from the other modality, as
    accurately as evaluate measured it on the cached vectors with that modality zeroed."""
    missing = json.loads((project / "reports/metrics.json").read_text())["missing_modality"]
    prepared = pd.read_csv(project / "data/prepared/manifest.csv", dtype=str, keep_default_na=False)
    test = prepared[prepared["split"] == "test"]
    for column, figure, left in (("text", "no_text", "image"), ("image", "no_image", "text")):
        manifest, out = tmp_path / f"no_{column}.csv", tmp_path / f"no_{column}_out.csv"
        test.assign(**{column: ""}).to_csv(manifest, index=False)
        sh(str(Path(sys.executable).with_name("fusionops")), "predict", "--model", f"models:/{MODEL_NAME}/1",
           "--manifest", str(manifest), "--images-root", str(project / "data/raw"), "--out", str(out), cwd=project)
        predictions = pd.read_csv(out, keep_default_na=False)
        assert (predictions["modalities"] == left).all()
        accuracy = (predictions["prediction"].to_numpy() == test["label"].to_numpy()).mean()
        # Vectors recomputed from the files, not read from the cache: at most two items may tip the other way.
        assert accuracy == pytest.approx(missing[figure]["accuracy"], abs=2 / len(test) + 1e-9)
    both = tmp_path / "neither.csv"
    test.head(3).assign(image="", text=["", "", " "]).to_csv(both, index=False)
    result = subprocess.run([str(Path(sys.executable).with_name("fusionops")), "predict", "--model",
                             f"models:/{MODEL_NAME}/1", "--manifest", str(both), "--images-root",
                             str(project / "data/raw"), "--out", str(tmp_path / "neither_out.csv")],
                            cwd=project, capture_output=True, text=True)
    assert result.returncode != 0 and "Traceback" not in result.stderr
    assert "3 row(s) cannot be used" in result.stderr and "neither an image nor a text" in result.stderr
    assert not (tmp_path / "neither_out.csv").exists()
    twice = tmp_path / "twice.csv"
    pd.concat([test.head(2), test.head(1)]).to_csv(twice, index=False)
    result = subprocess.run([str(Path(sys.executable).with_name("fusionops")), "predict", "--model", "models/fusion",
                             "--manifest", str(twice), "--images-root", str(project / "data/raw"), "--out",
                             str(tmp_path / "twice_out.csv")], cwd=project, capture_output=True, text=True)
    first_id = test["item_id"].iloc[0]
    assert result.returncode == 2 and f"row {first_id!r}, column item_id: id is not unique" in result.stderr


@pytest.mark.parametrize("flow", ["training_pipeline", "retrain", "deploy"])
def test_a_params_mistake_is_one_message_before_the_flow_runs(tmp_path, flow):
    """`python flows/<flow>.py` with a misspelt key: the key and the file, no traceback, no flow run; given the
    project with --project-dir or run from inside it (a subfolder: the nearest params.yaml above)."""
    params = yaml.safe_load((Path(__file__).resolve().parents[2] / "params.yaml").read_text())
    params["train"]["batchsize"] = params["train"].pop("batch_size")
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(params))
    (tmp_path / "data").mkdir()
    (tmp_path / ".dvc").mkdir()  # the project's top folder
    script = Path(__file__).resolve().parents[2] / "flows" / f"{flow}.py"
    for args, cwd in ((["--project-dir", str(tmp_path)], tmp_path), ([], tmp_path / "data")):
        result = subprocess.run([sys.executable, str(script), *args], capture_output=True, text=True, timeout=300,
                                cwd=cwd)
        assert result.returncode == 1 and "train.batchsize: unknown key (did you mean batch_size?)" in result.stderr
        assert str(tmp_path / "params.yaml") in result.stderr
        assert "Traceback" not in result.stderr + result.stdout and len(result.stderr.strip().splitlines()) == 1
