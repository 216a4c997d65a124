"""Explanations: top classes, modality contributions and weights, nearest training items, the `explain` command."""

import contextlib
import json
import logging
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pandas as pd
import pytest
import torch

from fusionops.config import Params, TrainParams
from fusionops.errors import UserError
from fusionops.explain import NEIGHBOURS_EMBEDDINGS, NEIGHBOURS_ITEMS, explain, load_predictor, write_neighbours
from fusionops.labels import LabelTask
from fusionops.models import HEADS, save_model
from fusionops.train import fit, split_data, training_labels

FAST = TrainParams(text_encoder="frozen", max_epochs=4, patience=4, seed=0, device="cpu")
FUSIONOPS = str(Path(sys.executable).with_name("fusionops"))


def _train_folder(folder: Path, head: str, prepared: pd.DataFrame, features) -> Path:
    """A trained model folder as the train stage leaves it: weights, config, neighbour index."""
    task = LabelTask(training_labels(prepared))
    labels = task.labels
    tr, va = (split_data(prepared, features, task, s) for s in ("train", "val"))
    params = FAST.model_copy(update={"head": head})
    model, _, _ = fit(tr, va, task, params, modalities=("image", "text"))
    config = {"head": head, "labels": labels, "encoders": features.encoders, "temperature": 1.7,
              "head_kwargs": {"image_dim": tr.image.shape[1], "text_dim": tr.text.shape[1],
                              "num_classes": len(labels), "proj_dim": params.proj_dim,
                              "hidden_dim": params.hidden_dim, "dropout": params.dropout,
                              "modalities": ["image", "text"]}}
    save_model(folder, model, config)
    train_rows = prepared.loc[prepared["split"] == "train", ["item_id", "label", "image", "text"]]
    write_neighbours(folder, model, tr.image, tr.text, train_rows)
    return folder


@pytest.fixture(scope="module")
def folders(tmp_path_factory, slice_prepared, slice_features):
    root = tmp_path_factory.mktemp("explain")
    return {head: _train_folder(root / head, head, slice_prepared, slice_features) for head in sorted(HEADS)}


@pytest.fixture(scope="module")
def predictors(folders):
    from fusionops.predict import Predictor

    return {head: Predictor(folder) for head, folder in folders.items()}


@pytest.fixture(scope="module")
def items(slice_prepared, slice_dir):
    """Two test items and two training items, with absolute image paths."""
    rows = pd.concat([slice_prepared[slice_prepared["split"] == "test"].head(2),
                      slice_prepared[slice_prepared["split"] == "train"].iloc[[0, 7]]])
    return rows.assign(path=[slice_dir / p for p in rows["image"]]).reset_index(drop=True)


@pytest.mark.parametrize("head", sorted(HEADS))
def test_top_classes_are_the_calibrated_probabilities_predict_gives(head, predictors, items):
    predictor = predictors[head]
    paths, texts = items["path"].tolist(), items["text"].tolist()
    found = explain(predictor, paths, texts, top=3, neighbours=2)
    predicted = predictor.predict(paths, texts)
    assert len(found) == len(items)
    for e, (_, p) in zip(found, predicted.iterrows(), strict=True):
        probs = [t["probability"] for t in e["top"]]
        assert len(probs) == 3 and probs == sorted(probs, reverse=True) and all(0 < x <= 1 for x in probs)
        assert e["top"][0]["label"] == e["label"] == p["label"]
        assert probs[0] == pytest.approx(p["confidence"], abs=1e-5) == e["confidence"]
        assert e["modalities"] == p["modalities"] == "image+text"
        for m in ("image", "text"):
            c = e["contributions"][m]
            assert c["present"] and 0 <= c["without"] <= 1
            assert c["drop"] == pytest.approx(e["confidence"] - c["without"], abs=2e-6)
    assert len({round(e["contributions"]["image"]["drop"], 4) for e in found}) > 1  # per item, not one constant
    top_all = explain(predictor, paths[:1], texts[:1], top=99, neighbours=0)[0]
    assert len(top_all["top"]) == len(predictor.labels)
    assert sum(t["probability"] for t in top_all["top"]) == pytest.approx(1, abs=1e-4)
    assert top_all["neighbours"] == []


@pytest.mark.parametrize("head", sorted(HEADS))
def test_a_missing_modality_contributes_nothing_and_the_only_one_is_not_removed(head, predictors, items):
    predictor = predictors[head]
    path, text = items.loc[0, "path"], items.loc[0, "text"]
    no_text, no_image = explain(predictor, [path, None], [None, text], neighbours=0)
    assert no_text["modalities"] == "image" and no_image["modalities"] == "text"
    assert no_text["confidence"] == pytest.approx(predictor.predict([path], [None])["confidence"][0], abs=1e-5)
    missing = no_text["contributions"]["text"]
    assert missing["present"] is False and missing["drop"] == 0 and missing["without"] == no_text["confidence"]
    only = no_text["contributions"]["image"]
    assert only["present"] and only["without"] is None and only["drop"] is None  # nothing would be left
    assert no_image["contributions"]["image"]["drop"] == 0 and no_image["contributions"]["text"]["drop"] is None
    kind = {"gated": "gate", "attention": "attention"}.get(head)
    assert no_text["weights"] == kind
    if kind is None:
        assert "weight" not in missing
    else:  # the head's own weights: all on the present modality; both present -> they sum to 1
        assert missing["weight"] == 0 and only["weight"] == pytest.approx(1, abs=1e-6)
        both = explain(predictor, [path], [text], neighbours=0)[0]["contributions"]
        assert both["image"]["weight"] + both["text"]["weight"] == pytest.approx(1, abs=1e-5)
        assert 0 < both["image"]["weight"] < 1


def test_a_training_item_is_its_own_nearest_neighbour(predictors, items, slice_prepared):
    predictor = predictors["concat"]
    train = items[items["split"] == "train"]
    found = explain(predictor, train["path"].tolist(), train["text"].tolist(), neighbours=5)
    for e, (_, row) in zip(found, train.iterrows(), strict=True):
        near = e["neighbours"]
        assert len(near) == 5
        assert near[0]["item_id"] == row["item_id"] and near[0]["similarity"] == pytest.approx(1, abs=2e-3)
        assert near[0]["label"] == row["label"] and near[0]["text"] == row["text"] and near[0]["image"] == row["image"]
        sims = [n["similarity"] for n in near]
        assert sims == sorted(sims, reverse=True) and sims[-1] < 0.999
        assert {n["item_id"] for n in near} <= set(slice_prepared.loc[slice_prepared["split"] == "train", "item_id"])
    # A test item is in no index: its nearest neighbour is some other (training) item.
    test_item = explain(predictor, items["path"][:1].tolist(), items["text"][:1].tolist())[0]
    assert test_item["neighbours"][0]["item_id"] != items.loc[0, "item_id"]


def test_the_index_is_float16_unit_vectors_aligned_with_the_items(folders, slice_prepared):
    from safetensors import safe_open

    folder = folders["concat"]
    with safe_open(str(folder / NEIGHBOURS_EMBEDDINGS), framework="pt") as f:
        embeddings = f.get_tensor("embeddings")
    stored = pd.read_csv(folder / NEIGHBOURS_ITEMS, dtype=str, keep_default_na=False)
    assert embeddings.dtype == torch.float16
    assert embeddings.float().norm(dim=1) == pytest.approx(torch.ones(len(embeddings)), abs=2e-3)
    assert stored["item_id"].tolist() == slice_prepared.loc[slice_prepared["split"] == "train", "item_id"].tolist()
    assert list(stored.columns) == ["item_id", "label", "image", "text"]
    with pytest.raises(ValueError, match="items but"):
        write_neighbours(folder, torch.nn.Identity(), torch.zeros(2, 3), torch.zeros(2, 3), stored.head(3))


def test_a_model_without_a_usable_index_still_explains(tmp_path, folders, items, caplog):
    from fusionops.predict import Predictor

    old = shutil.copytree(folders["gated"], tmp_path / "old")
    (old / NEIGHBOURS_EMBEDDINGS).unlink()
    (old / NEIGHBOURS_ITEMS).unlink()
    stale = shutil.copytree(folders["gated"], tmp_path / "stale")  # items rewritten by someone else: not trusted
    rows = pd.read_csv(stale / NEIGHBOURS_ITEMS, dtype=str, keep_default_na=False)
    rows.loc[0, "label"] = "something else"
    rows.to_csv(stale / NEIGHBOURS_ITEMS, index=False)
    paths, texts = items["path"][:1].tolist(), items["text"][:1].tolist()
    with caplog.at_level(logging.WARNING, logger="fusionops.explain"):
        for folder in (old, stale):
            predictor = Predictor(folder)
            first = explain(predictor, paths, texts)
            again = explain(predictor, paths, texts)
            assert [e["neighbours"] for e in first + again] == [None, None]
            assert first[0]["label"] in predictor.labels and first[0]["contributions"]["image"]["weight"] > 0
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 2  # once per folder, not per call
    assert "no neighbour index" in warnings[0] and "does not belong" in warnings[1]


def test_a_trained_folder_is_served_as_params_say(folders):
    import torch

    quantized = Params().model_copy(update={"registry": Params().registry.model_copy(update={"quantize": True})})
    heads = {q: load_predictor(str(folders["concat"]), p).head for q, p in ((False, Params()), (True, quantized))}
    int8 = torch.ao.nn.quantized.dynamic.Linear
    assert not any(isinstance(m, int8) for m in heads[False].modules())
    assert any(isinstance(m, int8) for m in heads[True].modules())


def test_an_unknown_model_is_a_clear_error(tmp_path, monkeypatch):
    with pytest.raises(UserError, match="neither a model folder .* nor an MLflow model URI"):
        load_predictor(str(tmp_path / "nope"), Params())
    monkeypatch.chdir(tmp_path)  # a relative path is shown as it was resolved
    with pytest.raises(UserError, match=f"models/fusion is neither a model folder \\({tmp_path}/models/fusion is"):
        load_predictor("models/fusion", Params())
    with pytest.raises(UserError, match="holds no trained model"):
        load_predictor(str(tmp_path), Params())
    # A registry URI outside any project (no params.yaml, no MLFLOW_TRACKING_URI): said, and no store is created.
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    with contextlib.chdir(tmp_path), pytest.raises(UserError, match="no MLflow store here: .*mlflow.db does not exist"):
        load_predictor("models:/fusionops-emoji@champion", Params())
    assert not (tmp_path / "mlflow.db").exists()


def _run(args, cwd):
    """`fusionops explain ...` in its own process: what a user sees, exit code and all."""
    env = {**os.environ, "PATH": f"{Path(sys.executable).parent}:{os.environ['PATH']}"}
    return subprocess.run([FUSIONOPS, "explain", *map(str, args)], cwd=cwd, env=env, capture_output=True,
                          text=True, timeout=300)


def _invoke(args, cwd, monkeypatch):
    """The command in this process (the encoders are already loaded here): much faster than a subprocess."""
    from typer.testing import CliRunner

    from fusionops.cli import app

    monkeypatch.chdir(cwd)  # no params.yaml there: Params() defaults, as for a user outside a project
    return CliRunner().invoke(app, ["explain", *map(str, args)], env={"COLUMNS": "200"})


def test_cli_explains_one_item_and_a_manifest(tmp_path, folders, slice_dir, slice_prepared, monkeypatch):
    train_row = slice_prepared[slice_prepared["split"] == "train"].iloc[3]
    one = _invoke(["--model", folders["gated"], "--image", slice_dir / train_row["image"], "--text",
                   train_row["text"], "--top", 2, "--neighbours", 3], tmp_path, monkeypatch)
    assert one.exit_code == 0, one.output
    assert "prediction" in one.output and "gate weight" in one.output and "nearest training items" in one.output
    assert train_row["item_id"] in one.output  # its own nearest neighbour
    assert not list(tmp_path.iterdir())  # one item without --out: printed, nothing written
    from typer.testing import CliRunner

    from fusionops.cli import app

    piped = CliRunner().invoke(app, ["explain", "--model", str(folders["gated"]), "--image",
                                     str(slice_dir / train_row["image"]), "--text", train_row["text"]],
                               env={"COLUMNS": "80"})  # not a terminal: the table is not cut at 80 columns
    assert piped.exit_code == 0 and train_row["image"] in piped.output, piped.output

    manifest = pd.read_csv(slice_dir / "manifest.csv", dtype=str, keep_default_na=False).head(3)
    manifest.loc[1, "text"] = ""
    manifest.loc[2, "image"] = ""
    manifest.to_csv(tmp_path / "m.csv", index=False)
    out = tmp_path / "explained.json"
    many = _invoke(["--model", folders["concat"], "--manifest", tmp_path / "m.csv", "--images-root", slice_dir,
                    "--out", out, "--neighbours", 2], tmp_path, monkeypatch)
    assert many.exit_code == 0, many.output
    rows = json.loads(out.read_text())
    assert [r["item_id"] for r in rows] == manifest["item_id"].tolist()
    assert [r["modalities"] for r in rows] == ["image+text", "image", "text"]
    assert all(len(r["neighbours"]) == 2 and len(r["top"]) == 3 for r in rows)
    assert rows[1]["contributions"]["text"]["drop"] == 0

    folder = tmp_path / "a-folder"
    folder.mkdir()
    to_folder = _invoke(["--model", folders["concat"], "--manifest", tmp_path / "m.csv", "--images-root", slice_dir,
                         "--out", folder], tmp_path, monkeypatch)
    assert isinstance(to_folder.exception, UserError)  # main() prints it as one line, no traceback
    assert "a-folder is a folder: give the path of a file to write" in str(to_folder.exception)
    assert not list(folder.iterdir()) and not list(tmp_path.glob(".a-folder.*"))


def test_cli_refuses_bad_rows_and_writes_nothing(tmp_path, folders, slice_dir, monkeypatch):
    from fusionops.errors import DataError

    manifest = pd.read_csv(slice_dir / "manifest.csv", dtype=str, keep_default_na=False).head(3)
    manifest.loc[0, "image"] = "images/nowhere.png"
    manifest.loc[1, ["image", "text"]] = ""
    manifest.to_csv(tmp_path / "m.csv", index=False)
    out = tmp_path / "explained.json"
    bad = _run(["--model", folders["concat"], "--manifest", tmp_path / "m.csv", "--images-root", slice_dir,
                "--out", out], tmp_path)
    assert bad.returncode == 2 and "Traceback" not in bad.stderr
    assert "nowhere.png" in bad.stderr and "not found" in bad.stderr
    assert manifest.loc[0, "item_id"] in bad.stderr and manifest.loc[1, "item_id"] in bad.stderr
    assert not out.exists() and not list(tmp_path.glob(".explained.json*"))
    missing = _invoke(["--model", folders["concat"], "--image", tmp_path / "gone.png", "--out", out], tmp_path,
                      monkeypatch)
    assert isinstance(missing.exception, DataError) and "gone.png" in str(missing.exception)
    assert f"{out} was not written" in str(missing.exception) and not out.exists()
    unasked = _invoke(["--model", folders["concat"], "--image", tmp_path / "gone.png"], tmp_path, monkeypatch)
    assert "gone.png" in str(unasked.exception) and "written" not in str(unasked.exception)  # no file was asked for
    nothing = _invoke(["--model", folders["concat"], "--text", "  "], tmp_path, monkeypatch)
    assert isinstance(nothing.exception, UserError) and "--image and/or --text" in str(nothing.exception)
    both = _invoke(["--model", folders["concat"], "--text", "x", "--manifest", tmp_path / "m.csv"], tmp_path,
                   monkeypatch)
    assert isinstance(both.exception, UserError) and "not both" in str(both.exception)
