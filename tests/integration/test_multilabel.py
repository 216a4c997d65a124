"""Multi-label mode end to end on real data: tags (category + drawing style) through `dvc repro`, the CLI's
predictions, the registry and the promotion gate."""

from __future__ import annotations

import json
import shutil
import sys
from pathlib import Path

import pandas as pd
import pytest
import yaml

from helpers import make_project, sh

pytestmark = pytest.mark.integration

MODEL_NAME = "fusionops-tags"


@pytest.fixture(scope="module")
def tagged(tmp_path_factory, slice_dir) -> Path:
    """A project whose label cells are tag lists: the emoji's category and its vendor (the drawing style, which
    only the image shows). One cell is written untidily: prepare gives it its one spelling."""
    data = tmp_path_factory.mktemp("tags-data") / "raw"
    shutil.copytree(slice_dir, data)
    rows = pd.read_csv(data / "manifest.csv", dtype=str, keep_default_na=False)
    rows["tags"] = rows["vendor"] + "|" + rows["category"]
    rows.loc[0, "tags"] = f" {rows.loc[0, 'vendor']} || {rows.loc[0, 'category']}|{rows.loc[0, 'vendor']}"
    rows.to_csv(data / "manifest.csv", index=False)
    root = make_project(tmp_path_factory.mktemp("tags-project"), data, model_name=MODEL_NAME,
                        data={"label_column": "tags", "label_mode": "multi"},
                        train={"batch_size": 32, "max_epochs": 60, "patience": 15})  # 84 training items
    sh(sys.executable, "-m", "dvc", "repro", cwd=root)
    return root


def _task(root: Path):
    from fusionops.labels import LabelTask

    return LabelTask.from_config(json.loads((root / "models/fusion/config.json").read_text()))


def test_tags_are_trained_with_thresholds_and_scored_as_tags(tagged):
    from fusionops.features import load_features
    from fusionops.models import load_model
    from fusionops.train import predict_logits, split_data

    prepared = pd.read_csv(tagged / "data/prepared/manifest.csv", dtype=str, keep_default_na=False)
    raw = pd.read_csv(tagged / "data/raw/manifest.csv", dtype=str, keep_default_na=False)
    expected = sorted(set(raw["category"]) | set(raw["vendor"]))
    first = raw.iloc[0]
    assert prepared.loc[prepared["item_id"] == first["item_id"], "label"].item() == "|".join(
        sorted([first["category"], first["vendor"]]))  # sorted, stripped, each tag once

    task = _task(tagged)
    config = json.loads((tagged / "models/fusion/config.json").read_text())
    assert config["label_mode"] == "multi" and config["label_separator"] == "|"
    assert task.labels == expected and len(config["thresholds"]) == len(expected)
    assert all(0 < t < 1 for t in config["thresholds"])

    metrics = json.loads((tagged / "reports/metrics.json").read_text())
    n_test = int((prepared["split"] == "test").sum())
    for block in (metrics["test"], *metrics["ablation"].values(), *metrics["missing_modality"].values()):
        assert block["items"] == n_test and {"micro_f1", "hamming_loss"} <= set(block)
    # accuracy: exact tag sets (chance ~1 in 18), on ~24 test items after 84 training items; macro-F1: per tag
    assert metrics["test"]["accuracy"] >= 0.4 and metrics["test"]["macro_f1"] > 0.6
    assert 0 <= metrics["test"]["hamming_loss"] < 0.2

    # predictions.csv is what the served model says: tags over their thresholds (at least one), confidence the
    # least probable given tag's calibrated probability.
    model, _ = load_model(tagged / "models/fusion")
    test = split_data(prepared, load_features(tagged / "data/features"), task, "test")
    probs = task.probabilities(predict_logits(model, test.image, test.text), config["temperature"])
    decisions = task.decide(probs)
    assert decisions.sum(1).min() >= 1
    predictions = pd.read_csv(tagged / "reports/predictions.csv", dtype=str, keep_default_na=False)
    assert predictions["item_id"].tolist() == test.item_ids
    assert predictions["predicted"].tolist() == task.names(decisions)
    assert predictions["actual"].tolist() == prepared.loc[prepared["split"] == "test", "label"].tolist()
    assert predictions["confidence"].astype(float).to_numpy() == pytest.approx(
        [probs[i][decisions[i]].min() for i in range(len(probs))], abs=1e-4)

    per_class = pd.read_csv(tagged / "reports/per_class.csv")
    support = test.y.sum(0).numpy().astype(int).tolist()
    assert per_class["label"].tolist() == expected and per_class["support"].tolist() == support
    assert (tagged / "reports/plots/confusion_matrix.png").read_bytes()[:4] == b"\x89PNG"
    assert 0 <= metrics["calibration"]["ece_after"] <= 1


def test_cli_predictions_and_the_gate_speak_tags(tagged):
    prepared = pd.read_csv(tagged / "data/prepared/manifest.csv", dtype=str, keep_default_na=False)
    items = prepared[prepared["split"] == "test"].head(6)[["item_id", "image", "text"]].copy()
    items.iloc[0, items.columns.get_loc("text")] = ""  # classified from the image alone
    items.to_csv(tagged / "new.csv", index=False)
    assert "INFO mlflow" not in sh("fusionops", "register", cwd=tagged)  # MLflow's log lines only with --verbose
    sh("fusionops", "predict", "--model", f"models:/{MODEL_NAME}@champion", "--manifest", "new.csv",
       "--images-root", "data/raw", "--out", "out.csv", cwd=tagged)
    out = pd.read_csv(tagged / "out.csv", dtype=str, keep_default_na=False)
    labels = set(_task(tagged).labels)
    assert out["item_id"].tolist() == items["item_id"].tolist()
    assert all(tags and set(tags.split("|")) <= labels for tags in out["prediction"])
    assert out["modalities"].tolist()[:2] == ["image", "image+text"]
    # Exact for the items it got right: the served model and evaluate agree.
    evaluated = pd.read_csv(tagged / "reports/predictions.csv", dtype=str, keep_default_na=False).set_index("item_id")
    assert out["prediction"].tolist()[1:] == evaluated.loc[out["item_id"][1:], "predicted"].tolist()

    # explain speaks tags too: the same tags, the top tags by probability, contributions to the top tag.
    sh("fusionops", "explain", "--model", "models/fusion", "--manifest", "new.csv", "--images-root", "data/raw",
       "--out", "explained.json", cwd=tagged)
    explained = json.loads((tagged / "explained.json").read_text())
    assert [e["label"] for e in explained] == out["prediction"].tolist()
    for e in explained:
        top = [t["probability"] for t in e["top"]]
        assert top == sorted(top, reverse=True) and e["confidence"] <= top[0]
    first = items.iloc[1]
    shown = sh("fusionops", "explain", "--model", "models/fusion", "--image", f"data/raw/{first['image']}",
               "--text", first["text"], cwd=tagged)
    assert f"P({explained[1]['top'][0]['label']}) without it" in shown

    # A second model (another seed) is the challenger; the gate compares both on the test items, tag by tag.
    params = yaml.safe_load((tagged / "params.yaml").read_text())
    params["train"]["seed"] = 1
    (tagged / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    sh(sys.executable, "-m", "dvc", "repro", cwd=tagged)
    assert "registered fusion" in sh("fusionops", "register", cwd=tagged)
    again = sh("fusionops", "register", cwd=tagged)  # the same weights: said so, no new version
    assert "not registered again:" in again and "already holds these weights" in again
    sh("fusionops", "promote", cwd=tagged)
    report = (tagged / "reports/promotion.md").read_text()
    assert f"test items: {int((prepared['split'] == 'test').sum())}" in report
    for tag in labels:  # the per-class guard runs per tag
        assert f"| {tag} |" in report


def test_the_gate_refuses_versions_of_another_label_mode(tagged):
    """A version registered as single-label cannot be compared on tag lists: a clear error, aliases untouched."""
    from mlflow import MlflowClient

    from fusionops.config import load_params
    from fusionops.errors import UserError
    from fusionops.registry import promote

    params = load_params(tagged / "params.yaml")
    client = MlflowClient(tracking_uri=params.registry.tracking_uri)
    assert client.get_model_version(MODEL_NAME, "2").tags["label_mode"] == "multi"
    client.set_registered_model_alias(MODEL_NAME, "champion", "1")
    client.set_model_version_tag(MODEL_NAME, "2", "label_mode", "single")
    with pytest.raises(UserError, match="challenger version 2 .* single-label"):
        promote(params)
    assert str(client.get_model_version_by_alias(MODEL_NAME, "champion").version) == "1"
