"""Scheduled retraining over versioned data: real batches, real DVC, real MLflow, a real Prefect API."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pandas as pd
import pytest
import yaml

from helpers import ROOT, load_flow, make_project, sh, take_slice, write_dataset

pytestmark = pytest.mark.integration
MODEL_NAME = "retrain-test"


@pytest.fixture(scope="module")
def project(tmp_path_factory, slice_dir):
    root = make_project(tmp_path_factory.mktemp("retrain"), slice_dir, model_name=MODEL_NAME)
    with pytest.MonkeyPatch.context() as env:  # the flows' own MLflow calls find the project's store
        env.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{root / 'mlflow.db'}")
        yield root


@pytest.fixture(scope="module")
def flows():
    return load_flow("retrain")


def put_batch(project: Path, name: str, rows: pd.DataFrame) -> pd.DataFrame:
    """A batch folder in the inbox, as a labeller would drop it: manifest.csv + the images it names."""
    staging = project / "staging" / name
    write_dataset(rows, staging)
    inbox = project / "data/inbox"
    inbox.mkdir(parents=True, exist_ok=True)
    shutil.move(str(staging), inbox / name)  # a complete batch appears at once
    return rows


def raw_version(project: Path) -> str:
    return yaml.safe_load((project / "data/raw.dvc").read_text())["outs"][0]["md5"]


def cached_items(project: Path) -> dict[str, set[str]]:
    """The content keys in the feature cache, per modality."""
    from fusionops.features.cache import VectorCache

    spaces = {}
    for meta in (project / ".cache/features").glob("*/encoder.json"):
        image = meta.parent.name.startswith("tf_")
        cache = VectorCache(meta.parent.parent, meta.parent.name, dim=1280 if image else 384)
        spaces["image" if image else "text"] = cache.keys()
    return spaces


def mlflow_client():
    from mlflow import MlflowClient

    return MlflowClient(tracking_uri=os.environ["MLFLOW_TRACKING_URI"])


@pytest.fixture(scope="module")
def runs(prefect_harness, project, flows, demo_manifest):
    """Four nights: a good batch, another good batch, a bad batch, an empty inbox."""
    first = put_batch(project, "2026-11-01", take_slice(demo_manifest, 3, skip_groups=20))
    nights = {"first": flows.retrain(project_dir=project), "version_1": raw_version(project),
              "cache_1": cached_items(project)}
    second = put_batch(project, "2026-11-02", take_slice(demo_manifest, 3, skip_groups=30))
    nights["second"] = flows.retrain(project_dir=project)
    nights["version_2"], nights["cache_2"] = raw_version(project), cached_items(project)
    nights["champion_before_bad"] = str(mlflow_client().get_model_version_by_alias(MODEL_NAME, "champion").version)
    bad = take_slice(demo_manifest, 1, skip_groups=50)
    put_batch(project, "2026-11-03", bad)
    (project / "data/inbox/2026-11-03" / bad["image"].iloc[0]).unlink()  # one image never arrived
    nights["bad"] = flows.retrain(project_dir=project)
    nights["version_3"] = raw_version(project)
    nights["empty"] = flows.retrain(project_dir=project)
    nights["batches"] = {"first": first, "second": second, "bad": bad}
    return nights


def test_good_batches_are_appended_versioned_and_trained_on(runs, project):
    for night, batch in (("first", "2026-11-01"), ("second", "2026-11-02")):
        result = runs[night]
        assert result["decision"] == "retrained" and result["appended"] == {batch: 24}
        assert result["training"]["stages"]["train"] == "ran"
        assert (project / "data/processed" / batch / "ingested.json").is_file()
    manifest = pd.read_csv(project / "data/raw/manifest.csv")
    assert len(manifest) == 120 + 24 + 24
    assert set(runs["batches"]["second"]["item_id"]) <= set(manifest["item_id"])
    assert (project / "data/raw" / manifest["image"].iloc[-1]).is_file()


def test_each_night_logs_a_short_summary(runs, flows):
    second = runs["second"]
    summary = flows._summary(second).splitlines()
    assert summary[0] == f"retrain: retrained ({second['reason']})" and "  added 2026-11-02: 24 rows" in summary
    assert any(line.startswith("  drift: ") and "24 new vs" in line for line in summary)
    version = second["training"]["registered"]["version"]
    gate = second["training"]["promotion"]
    assert any(line.startswith(f"  trained version {version}: test accuracy") and f"; gate {gate['decision']}: "
               in line and f"{gate['reason']}" in line for line in summary)
    bad = flows._summary(runs["bad"])
    assert "quarantined 2026-11-03: " in bad and "data/quarantine/2026-11-03/validation.json" in bad


def test_second_retrain_computes_features_for_new_items_only(runs, project):
    from fusionops.features.cache import content_key

    new = runs["batches"]["second"]
    folder = project / "data/processed/2026-11-02"
    contents = {"image": {content_key((folder / p).read_bytes()) for p in new["image"]},
                "text": {content_key(t) for t in new["text"]}}
    for modality, keys in contents.items():
        computed = runs["cache_2"][modality] - runs["cache_1"][modality]
        assert computed == keys - runs["cache_1"][modality], modality  # exactly the new contents, nothing else
        assert computed, modality


def test_each_model_version_carries_its_own_data_version(runs):
    assert runs["version_1"] != runs["version_2"]
    client = mlflow_client()
    tags = {v: client.get_model_version(MODEL_NAME, runs[n]["training"]["registered"]["version"]).tags["data_version"]
            for v, n in (("version_1", "first"), ("version_2", "second"))}
    assert tags == {"version_1": runs["version_1"], "version_2": runs["version_2"]}


def test_drift_is_measured_against_the_training_data(runs):
    assert runs["first"]["drift"] is None  # nothing trained before: no reference
    drift = runs["second"]["drift"]
    assert set(drift["tests"]) == {"labels", "text_length", "image_brightness", "embeddings"}
    assert all(0 <= t["p_value"] <= 1 for t in drift["tests"].values())
    assert drift["new_items"] == 24


def test_bad_batch_is_quarantined_and_nothing_changes(runs, project):
    bad = runs["bad"]
    assert bad["decision"] == "not retrained" and bad["appended"] == {}
    assert [q["batch"] for q in bad["quarantined"]] == ["2026-11-03"]
    missing = [p for p in bad["quarantined"][0]["problems"] if "not found" in p]
    assert missing and all(str(project / "data/quarantine/2026-11-03") in p for p in missing)  # where it is now
    assert (project / "data/quarantine/2026-11-03/validation.json").is_file()
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import LogFilter, LogFilterLevel
    from prefect.client.schemas.sorting import LogSort

    with get_client(sync_client=True) as prefect:  # the run's log names the problems, not only their number
        warnings = LogFilter(level=LogFilterLevel(ge_=30))
        logged = [log.message for log in prefect.read_logs(warnings, limit=200, sort=LogSort.TIMESTAMP_DESC)
                  if "batch 2026-11-03 quarantined in" in log.message]
    assert logged and "problem(s): " in logged[0] and "not found" in logged[0], logged
    assert runs["version_3"] == runs["version_2"]
    champion = str(mlflow_client().get_model_version_by_alias(MODEL_NAME, "champion").version)
    assert champion == runs["champion_before_bad"]


def test_empty_inbox_trains_nothing(runs):
    assert runs["empty"]["decision"] == "not retrained" and "no new batch" in runs["empty"]["reason"]
    assert runs["empty"]["training"] is None


def test_dvc_is_clean_after_the_flows(runs, project):
    assert "Data and pipelines are up to date" in sh(sys.executable, "-m", "dvc", "status", cwd=project)
    # how the vectors are computed is not an input of the pipeline: only what their values depend on
    written = (project / "params.yaml").read_text()
    params = yaml.safe_load(written)
    params["features"].update(executor="dask", dask_address="tcp://10.0.0.1:8786", batch_size=64, num_workers=3)
    (project / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    try:
        assert "Data and pipelines are up to date" in sh(sys.executable, "-m", "dvc", "status", cwd=project)
        params["features"]["precision"] = "fp32"
        (project / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
        assert "features.precision" in sh(sys.executable, "-m", "dvc", "status", cwd=project)
    finally:
        (project / "params.yaml").write_text(written)


def test_ingest_command_quarantines_a_bad_batch(project, demo_manifest, tmp_path):
    rows = take_slice(demo_manifest, 1, skip_groups=60).assign(category="Spaceships")
    batch = write_dataset(rows, tmp_path / "batch")
    before = raw_version(project)
    result = subprocess.run([str(Path(sys.executable).with_name("fusionops")), "ingest", str(batch)], cwd=project,
                            capture_output=True, text=True, timeout=300)
    assert result.returncode == 2 and "unknown label 'Spaceships'" in result.stderr
    assert result.stderr.count("quarantined in") == 1, result.stderr  # said once, not also as a log line
    assert "fix it there, then `fusionops ingest data/quarantine/batch`" in result.stderr
    assert raw_version(project) == before and not batch.exists()
    again = subprocess.run([str(Path(sys.executable).with_name("fusionops")), "ingest", str(batch)], cwd=project,
                           capture_output=True, text=True, timeout=300)
    assert again.returncode == 1 and f"{batch} does not exist" in again.stderr and "Traceback" not in again.stderr


def test_deployment_runs_on_a_real_prefect_api(prefect_harness, tmp_path):
    """flows/deploy.py serves retrain with the cron of params.yaml; one run triggered through the API completes."""
    from prefect.client.orchestration import get_client
    from prefect.deployments import run_deployment
    from prefect.settings import PREFECT_API_URL

    params = yaml.safe_load((ROOT / "params.yaml").read_text())
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(params))
    env = {**os.environ, "PREFECT_API_URL": PREFECT_API_URL.value(), "PREFECT_RUNNER_POLL_FREQUENCY": "2",
           "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}"}
    server = subprocess.Popen([sys.executable, str(ROOT / "flows/deploy.py"), "--project-dir", str(tmp_path)],
                              env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                              start_new_session=True)
    try:
        name = f"retrain/{params['schedule']['deployment']}"
        deadline = time.time() + 120
        with get_client(sync_client=True) as client:
            while True:
                assert server.poll() is None, server.stdout.read()[-3000:]
                try:
                    deployment = client.read_deployment_by_name(name)
                    break
                except Exception:
                    assert time.time() < deadline, "the deployment never appeared"
                    time.sleep(1)
        assert [s.schedule.cron for s in deployment.schedules] == [params["schedule"]["cron"]]
        run = run_deployment(name, timeout=300, poll_interval=2)
        assert run.state.is_completed(), run.state
    finally:
        os.killpg(server.pid, 15)
        server.wait(timeout=30)


def test_rows_a_failed_run_prepared_are_still_pending(runs, project, flows, demo_manifest, tmp_path):
    """A run that prepared new rows and failed before training leaves them pending: the next night trains on them."""
    from fusionops.config import load_params
    from fusionops.ingest import pending_items

    rows = take_slice(demo_manifest, 1, skip_groups=70)
    said = sh(str(Path(sys.executable).with_name("fusionops")), "ingest", str(write_dataset(rows, tmp_path / "late")),
              cwd=project)
    assert (f"batch late: {len(rows)} rows appended to data/raw/manifest.csv, images in data/raw/batches/late; the "
            "batch folder moved to data/processed/late") in said and "`dvc repro`" in said
    params = load_params(project / "params.yaml")
    assert pending_items(params, project) == len(rows)
    sh(sys.executable, "-m", "dvc", "repro", "prepare", cwd=project)  # ... and the run stops there
    assert pending_items(params, project) == len(rows)  # prepared, not trained on
    night = flows.retrain(project_dir=project)
    assert night["decision"] == "retrained" and night["pending"] == len(rows), night["reason"]
    assert pending_items(params, project) == 0
    assert "Data and pipelines are up to date" in sh(sys.executable, "-m", "dvc", "status", cwd=project)


def test_an_unreachable_dask_scheduler_stops_the_night_before_anything_changes(runs, project, flows, demo_manifest):
    from fusionops.errors import UserError
    from helpers import free_port

    written = (project / "params.yaml").read_text()
    params = yaml.safe_load(written)
    params["features"].update(executor="dask", dask_address=f"tcp://127.0.0.1:{free_port()}")
    (project / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    put_batch(project, "2026-11-09", take_slice(demo_manifest, 1, skip_groups=80))
    before = raw_version(project)
    try:
        with pytest.raises(UserError, match="no Dask scheduler answers at features.dask_address"):
            flows.retrain(project_dir=project)
        assert (project / "data/inbox/2026-11-09/manifest.csv").is_file()  # waits for the next night
        assert raw_version(project) == before
    finally:
        (project / "params.yaml").write_text(written)
        shutil.rmtree(project / "data/inbox/2026-11-09", ignore_errors=True)
