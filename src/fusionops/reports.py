"""What a person looks at after a run: the training curves as a picture, and the headline scores for DVC.

Both are made from what train and evaluate wrote (train.history, metrics.json), so they need no browser, no network
and no MLflow: `reports/plots/training_curves.png` sits beside the confusion matrix, and `reports/scores.json` is
the one metrics file of dvc.yaml, few enough figures for `dvc metrics show` to fit a terminal.
"""

from __future__ import annotations

from pathlib import Path

import pandas as pd

from fusionops.atomic import atomic_path, write_json

VARIANT_NAMES = {"fusion": "fusion (image + text)", "image_only": "image only", "text_only": "text only"}


SHORT = {"image_only": "img_only", "text_only": "txt_only"}  # five columns of `dvc metrics show` fit in 80


def headline(metrics: dict) -> dict:
    """Test accuracy and macro-F1, each single modality's accuracy (the ablation: img_only, txt_only) and the ECE
    after temperature scaling: one flat row, as few and as short as `dvc metrics show` needs to fit 80 columns.
    metrics.json has every figure (the missing-modality ones too)."""
    out = {"accuracy": metrics["test"]["accuracy"], "macro_f1": metrics["test"]["macro_f1"]}
    out |= {SHORT.get(name, name): m["accuracy"] for name, m in metrics.get("ablation", {}).items()}
    if "ece_after" in metrics.get("calibration", {}):
        out["ece"] = metrics["calibration"]["ece_after"]
    return out


def write_scores(metrics: dict, path: Path) -> None:
    write_json(path, headline(metrics))


def plot_training_curves(history_dir: Path, path: Path) -> None:
    """Training loss and validation macro-F1 per epoch, one line per variant (one CSV each in `history_dir`), the
    best epoch (the weights kept) marked on each."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    histories = {f.stem: pd.read_csv(f) for f in sorted(Path(history_dir).glob("*.csv"))}
    fig, (loss_ax, f1_ax) = plt.subplots(1, 2, figsize=(10, 4))
    for variant, history in histories.items():
        label = VARIANT_NAMES.get(variant, variant)
        (line,) = loss_ax.plot(history["epoch"], history["train_loss"], label=label)
        f1_ax.plot(history["epoch"], history["val_macro_f1"], color=line.get_color(), label=label)
        best = history.loc[history["val_macro_f1"].idxmax()]
        f1_ax.plot(best["epoch"], best["val_macro_f1"], "o", color=line.get_color())
    loss_ax.set(xlabel="epoch", ylabel="training loss", title="training loss")
    f1_ax.set(xlabel="epoch", ylabel="validation macro-F1", title="validation macro-F1 (dot: the epoch kept)")
    for ax in (loss_ax, f1_ax):
        ax.grid(alpha=0.3)
    f1_ax.legend(loc="lower right")
    fig.tight_layout()
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=110)
    plt.close(fig)
