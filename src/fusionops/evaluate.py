"""The evaluate stage: test metrics of the fused head and of each one-modality ablation, calibration, timings, plots."""

from __future__ import annotations

import json
import time
from pathlib import Path

import numpy as np
import pandas as pd
import torch
from sklearn.metrics import accuracy_score, classification_report, confusion_matrix, f1_score

from fusionops.atomic import atomic_path, write_json
from fusionops.calibration import calibration_summary, plot_reliability
from fusionops.config import EvaluateParams, TrainParams
from fusionops.features import FeatureSet
from fusionops.models import load_model
from fusionops.train import VARIANTS, SplitData, model_dir, predict_logits, split_data


def scores(y_true: np.ndarray, y_pred: np.ndarray) -> dict:
    return {
        "accuracy": round(float(accuracy_score(y_true, y_pred)), 4),
        "macro_f1": round(float(f1_score(y_true, y_pred, average="macro", zero_division=0)), 4),
        "items": len(y_true),
    }


def plot_confusion(y_true: list[str], y_pred: list[str], labels: list[str], path: Path, title: str) -> None:
    """Row-normalised confusion matrix (each row: where the items of one true class went)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    cm = confusion_matrix(y_true, y_pred, labels=labels).astype(float)
    cm = np.divide(cm, cm.sum(1, keepdims=True), out=np.zeros_like(cm), where=cm.sum(1, keepdims=True) > 0)
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


def evaluate(prepared: pd.DataFrame, features: FeatureSet, train: TrainParams, params: EvaluateParams, *,
             images_root: Path | None = None) -> dict:
    """Score the fused head and each ablation on the test split; write metrics, tables and plots.

    With `images_root`, the latency of one item end to end (decode, both encoders, head) is measured too.
    """
    metrics: dict = {"ablation": {}}
    for variant in VARIANTS:
        model, config = load_model(model_dir(train.out_dir, variant))
        labels = config["labels"]
        test = split_data(prepared, features, labels, "test")
        logits = predict_logits(model, test.image, test.text)
        if variant != "fusion":
            metrics["ablation"][variant] = scores(test.y.numpy(), logits.argmax(1).numpy())
            continue
        metrics["test"] = scores(test.y.numpy(), logits.argmax(1).numpy())
        # Missing modality: the same test items with every text (then every image) removed, as a zero vector.
        metrics["missing_modality"] = {
            "no_text": scores(test.y.numpy(), predict_logits(model, test.image, torch.zeros_like(test.text))
                              .argmax(1).numpy()),
            "no_image": scores(test.y.numpy(), predict_logits(model, torch.zeros_like(test.image), test.text)
                               .argmax(1).numpy()),
        }
        val = split_data(prepared, features, labels, "val")
        metrics["val"] = scores(val.y.numpy(), predict_logits(model, val.image, val.text).argmax(1).numpy())
        # Measured before anything is written: when it fails (an image gone, other encoder weights), no report of
        # this run is left beside the previous run's metrics.
        latency = _latency(model, test, prepared, model_dir(train.out_dir, variant), images_root)
        temperature = config.get("temperature", 1.0)
        metrics["calibration"] = calibration_summary(logits, test.y, temperature)
        plot_reliability(logits, test.y, temperature, params.reliability_diagram,
                         title=f"test reliability, n={len(test.y)}")
        _write_details(test, (logits / temperature).softmax(1).numpy(), labels, params)
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


def _write_details(test: SplitData, probs: np.ndarray, labels: list[str], params: EvaluateParams) -> None:
    """Test predictions (for `dvc plots`), the per-class table and the confusion-matrix picture."""
    true = [labels[i] for i in test.y.numpy()]
    pred = [labels[i] for i in probs.argmax(1)]
    with atomic_path(params.predictions) as tmp:
        pd.DataFrame({"item_id": test.item_ids, "actual": true, "predicted": pred,
                      "confidence": probs.max(1).round(4)}).to_csv(tmp, index=False)
    report = classification_report(true, pred, labels=labels, output_dict=True, zero_division=0)
    per_class = pd.DataFrame([{"label": label, **{k: round(v, 4) for k, v in report[label].items()}}
                              for label in labels])
    with atomic_path(params.per_class) as tmp:
        per_class.to_csv(tmp, index=False)
    plot_confusion(true, pred, labels, params.confusion_matrix, title=f"test confusion (row-normalised), n={len(true)}")
