"""The evaluate stage: test metrics of the fused head and of each one-modality ablation, calibration, timings, plots."""

from __future__ import annotations

import json
import time
from functools import partial
from pathlib import Path

import numpy as np
import pandas as pd
import torch
from sklearn.metrics import accuracy_score, classification_report, f1_score, hamming_loss

from fusionops.atomic import atomic_path, write_json
from fusionops.calibration import TEMPERATURE_RANGE, calibration_summary, plot_reliability
from fusionops.config import EvaluateParams, FeaturesParams, TrainParams
from fusionops.errors import UserError
from fusionops.features import FeatureSet
from fusionops.features.extract import text_vectors
from fusionops.features.text import build_text_encoder
from fusionops.labels import LabelTask, macro_f1
from fusionops.models import load_model
from fusionops.train import VARIANTS, SplitData, model_dir, predict_logits, split_data


def scores(y_true: np.ndarray, y_pred: np.ndarray) -> dict:
    """Accuracy and macro-F1; multi-label (0/1 matrices items x tags): accuracy is the share of items with every tag
    right, macro-F1 averages the tags, and micro-F1 and the Hamming loss (share of wrong item x tag decisions)
    are added."""
    y_true, y_pred = np.asarray(y_true), np.asarray(y_pred)
    if y_true.ndim == 2:
        y_true, y_pred = y_true.astype(int), y_pred.astype(int)
    out = {
        "accuracy": round(float(accuracy_score(y_true, y_pred)), 4),
        "macro_f1": round(macro_f1(y_true, y_pred), 4),
        "items": len(y_true),
    }
    if y_true.ndim == 2:
        out["micro_f1"] = round(float(f1_score(y_true, y_pred, average="micro", zero_division=0)), 4)
        out["hamming_loss"] = round(float(hamming_loss(y_true, y_pred)), 4)
    return out


def _score(model: torch.nn.Module, task: LabelTask, temperature: float, image: torch.Tensor, text: torch.Tensor,
           y: torch.Tensor) -> dict:
    return scores(y.numpy(), task.decide_logits(predict_logits(model, image, text), temperature))


def plot_confusion(y_true: np.ndarray, y_pred: np.ndarray, labels: list[str], path: Path, title: str) -> None:
    """Row-normalised confusion matrix: each row, where the items of one true class went. y_true and y_pred are
    0/1 matrices items x labels; multi-label, a row shows which tags the items with that tag were given."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    cm = (y_true.astype(np.int64).T @ y_pred.astype(np.int64)).astype(float)
    items = y_true.sum(0).astype(float)[:, None]  # items of each true label
    cm = np.divide(cm, items, out=np.zeros_like(cm), where=items > 0)
    size = max(6, 0.35 * len(labels) + 3)
    fig, ax = plt.subplots(figsize=(size, size * 0.85))
    im = ax.imshow(cm, cmap="Blues", vmin=0, vmax=1)
    ax.set_xticks(range(len(labels)), labels, rotation=90, fontsize=8 if len(labels) < 30 else 5)
    ax.set_yticks(range(len(labels)), labels, fontsize=8 if len(labels) < 30 else 5)
    if len(labels) <= 20:
        for i in range(len(labels)):
            for j in range(len(labels)):
                if cm[i, j] >= 0.005:
                    ax.text(j, i, f"{cm[i, j]:.2f}", ha="center", va="center", fontsize=7,
                            color="white" if cm[i, j] > 0.5 else "black")
    ax.set_xlabel("predicted")
    ax.set_ylabel("true")
    ax.set_title(title)
    fig.colorbar(im, ax=ax, fraction=0.046)
    fig.tight_layout()
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=110)
    plt.close(fig)


def model_features(folder: Path, config: dict, features: FeatureSet, texts: list[str],
                   features_params: FeaturesParams | None) -> FeatureSet:
    """The vectors a trained model reads: the features stage's, with a tuned text encoder's text vectors in place
    of the frozen ones when the model has its own (from the cache the train stage filled, else computed)."""
    recorded = config["encoders"]["text"]
    if recorded["id"] == features.encoders["text"]["id"]:
        return features
    if not recorded.get("bundled"):
        raise UserError(f"{folder} was trained on the text vectors of {recorded['id']}, but the features stage's "
                        f"are {features.encoders['text']['id']}: run `dvc repro`")
    if features_params is None:
        raise ValueError("a model with its own text encoder needs the features params to compute its vectors")
    tuned = features_params.text.model_copy(update={"model": str(Path(folder) / recorded["model"])})
    encoder = build_text_encoder(tuned)
    if encoder.id != recorded["id"]:
        raise UserError(f"the tuned text encoder in {folder} is not the one the model was trained with (its id is "
                        f"{encoder.id}, not {recorded['id']}): run `dvc repro`")
    vectors, _ = text_vectors(texts, encoder, features_params, precision=recorded["precision"])
    return FeatureSet(features.item_ids, features.image, vectors, config["encoders"])


def breakdown(prepared: pd.DataFrame, test: SplitData, decisions: np.ndarray, columns: list[str]) -> dict:
    """Test scores per value of each of `columns` (manifest columns prepare kept, e.g. the vendor)."""
    rows = prepared.set_index("item_id").loc[test.item_ids]
    out = {}
    for column in columns:
        if column not in rows.columns:
            known = [c for c in prepared.columns if c not in ("item_id", "split")]
            raise UserError(f"evaluate.breakdown names the column {column!r}, which the prepared manifest does not "
                            f"have (it has: {', '.join(known)}): name one of the raw manifest's columns")
        values = rows[column].astype(str).to_numpy()
        out[column] = {value: scores(test.y.numpy()[values == value], decisions[values == value])
                       for value in sorted(set(values))}
    return out


def evaluate(prepared: pd.DataFrame, features: FeatureSet, train: TrainParams, params: EvaluateParams, *,
             images_root: Path | None = None, features_params: FeaturesParams | None = None) -> dict:
    """Score the fused head and each ablation on the test split; write metrics, tables and plots.

    With `images_root`, the latency of one item end to end (decode, both encoders, head) is measured too.
    `features_params`: where a model's own (tuned) text encoder finds its cached vectors, and how it computes
    missing ones.
    """
    metrics: dict = {"ablation": {}}
    for variant in VARIANTS:
        folder = model_dir(train.out_dir, variant)
        model, config = load_model(folder)
        task, temperature = LabelTask.from_config(config), config.get("temperature", 1.0)
        vectors = model_features(folder, config, features, prepared["text"].tolist(), features_params)
        test = split_data(prepared, vectors, task, "test")
        score = partial(_score, model, task, temperature)
        if variant != "fusion":
            metrics["ablation"][variant] = score(test.image, test.text, test.y)
            continue
        metrics["test"] = score(test.image, test.text, test.y)
        # Missing modality: the same test items with every text (then every image) removed, as a zero vector.
        metrics["missing_modality"] = {
            "no_text": score(test.image, torch.zeros_like(test.text), test.y),
            "no_image": score(torch.zeros_like(test.image), test.text, test.y),
        }
        val = split_data(prepared, vectors, task, "val")
        metrics["val"] = score(val.image, val.text, val.y)
        # Measured before anything is written: when it fails (an image gone, other encoder weights), no report of
        # this run is left beside the previous run's metrics.
        latency = _latency(model, test, prepared, model_dir(train.out_dir, variant), images_root)
        logits = predict_logits(model, test.image, test.text)
        metrics["calibration"] = calibration_summary(logits, test.y, temperature)
        if params.breakdown:
            metrics["breakdown"] = breakdown(prepared, test, task.decide_logits(logits, temperature),
                                             params.breakdown)
        plot_reliability(logits, test.y, temperature, params.reliability_diagram,
                         title=f"test reliability, n={len(test.y)}")
        _write_details(test, task.probabilities(logits, temperature), task, params)
    best_single = max(m["accuracy"] for m in metrics["ablation"].values())
    metrics["fusion_gain_vs_best_single"] = round(metrics["test"]["accuracy"] - best_single, 4)
    metrics = {"test": metrics.pop("test"), **metrics}
    write_json(params.metrics, metrics)
    # Beside the training seconds train wrote: wall-clock figures, kept out of metrics.json (see train.timing).
    timing = Path(train.timing)
    write_json(timing, {**(json.loads(timing.read_text()) if timing.is_file() else {}), **latency})
    return {**metrics, "timing": latency}


def _latency(model, test: SplitData, prepared: pd.DataFrame, folder: Path, images_root: Path | None, *,
             items: int = 32) -> dict:
    """The head's cost per item on cached vectors (batched), and with `images_root` one item's latency from its
    files (decode, both encoders, head; one at a time, as a request to a served model), median and p95."""
    runs = []
    for _ in range(5):
        started = time.perf_counter()
        predict_logits(model, test.image, test.text)
        runs.append(time.perf_counter() - started)
    out = {"head_us_per_item": round(float(np.median(runs)) / max(len(test.y), 1) * 1e6, 2)}
    if images_root is None:
        return out
    from fusionops.predict import Predictor

    predictor = Predictor(folder)
    rows = prepared[prepared["item_id"].isin(test.item_ids[:items])]
    paths, texts = [Path(images_root) / p for p in rows["image"]], rows["text"].tolist()
    predictor.predict(paths[:2], texts[:2])  # warm-up: first calls allocate
    times = []
    for path, text in zip(paths, texts, strict=True):
        started = time.perf_counter()
        predictor.predict([path], [text])
        times.append((time.perf_counter() - started) * 1000)
    out["latency_ms_per_item"] = {"p50": round(float(np.percentile(times, 50)), 2),
                                  "p95": round(float(np.percentile(times, 95)), 2),
                                  "items": len(times), "device": str(predictor.device)}
    return out


def _write_details(test: SplitData, probs: np.ndarray, task: LabelTask, params: EvaluateParams) -> None:
    """Test predictions (for `dvc plots`), the per-class table and the confusion-matrix picture."""
    decisions = task.decide(probs)
    true, pred = task.one_hot(test.y.numpy()), task.one_hot(decisions)
    with atomic_path(params.predictions) as tmp:
        pd.DataFrame({"item_id": test.item_ids, "actual": task.names(true), "predicted": task.names(pred),
                      "confidence": task.confidence(probs, decisions).round(4)}).to_csv(tmp, index=False)
    if task.multi:
        report = classification_report(true.astype(int), pred.astype(int), target_names=task.labels,
                                       output_dict=True, zero_division=0)
    else:
        report = classification_report(task.names(true), task.names(pred), labels=task.labels, output_dict=True,
                                       zero_division=0)
    per_class = pd.DataFrame([{"label": label, **{k: round(v, 4) for k, v in report[label].items()}}
                              for label in task.labels])
    with atomic_path(params.per_class) as tmp:
        per_class.to_csv(tmp, index=False)
    title = "test: true tag (row) -> tags given, row-normalised" if task.multi else "test confusion (row-normalised)"
    plot_confusion(true, pred, task.labels, params.confusion_matrix, title=f"{title}, n={len(test.item_ids)}")


def small_data_warnings(metrics: dict) -> list[str]:
    """What metrics.json shows that a person should not miss, each with what to do: results that on little data look
    fine and are not (the fused head below a single modality, a temperature fit that ended on its bound)."""
    said = []
    test, singles = metrics["test"], metrics.get("ablation", {})
    if singles:
        best, single = max(singles.items(), key=lambda kv: kv[1]["accuracy"])
        gap = test["accuracy"] - single["accuracy"]
        if gap < 0:
            said.append(f"the fused model scores below {best.replace('_', ' ')} ({test['accuracy']:.4f} against "
                        f"{single['accuracy']:.4f} test accuracy, {gap:+.4f} on {test['items']} items): it gains "
                        "nothing from the other modality on this data; add data, or judge it by the ablation")
    calibration = metrics.get("calibration", {})
    temperature = calibration.get("temperature")
    if temperature is not None and any(abs(temperature - bound) < 1e-3 for bound in TEMPERATURE_RANGE):
        items = metrics.get("val", {}).get("items", "the")
        said.append(f"the temperature fit ended on its bound {temperature:g} (ECE {calibration['ece_before']:.3f} -> "
                    f"{calibration['ece_after']:.3f}): {items} validation items are too few or too easy to calibrate "
                    "on, so confidences are not calibrated; add data (or raise split.val) before relying on them")
    return said
