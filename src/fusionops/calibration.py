"""Calibration: when the model says 0.8, is it right 8 times in 10?

Temperature scaling (Guo et al., 2017, "On Calibration of Modern Neural Networks"): one scalar T, fitted on the
validation logits by minimising the negative log-likelihood; serving divides the logits by T. Every argmax (so
accuracy, macro-F1 and the promotion gate) stays as it was; only the confidences move. ECE and the reliability
diagram use equal-width bins of the top-class confidence.

Multi-label (y a 0/1 matrix items x tags): the same T on every tag's sigmoid, fitted on the binary cross-entropy;
ECE and the diagram take every (item, tag) probability against whether the item has the tag.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
import torch
from torch.nn import functional as F

from fusionops.atomic import atomic_path

TEMPERATURE_RANGE = (0.05, 20.0)  # the fit is clamped to it: a fit that ends on a bound found no optimum inside


def _multi(y) -> bool:
    return y.ndim == 2  # a 0/1 matrix items x tags; class indices otherwise


def nll(logits: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """Cross-entropy, or binary cross-entropy (multi-label)."""
    return F.binary_cross_entropy_with_logits(logits, y) if _multi(y) else F.cross_entropy(logits, y)


def probabilities(logits: torch.Tensor, temperature: float = 1.0, *, multi: bool = False) -> np.ndarray:
    """softmax(logits / T), or a sigmoid per tag (multi-label)."""
    scaled = logits.float() / temperature
    return (scaled.sigmoid() if multi else scaled.softmax(1)).numpy()


def fit_temperature(logits: torch.Tensor, y: torch.Tensor) -> float:
    """The T > 0 that minimises the NLL of softmax(logits / T) (multi-label: sigmoid) on these (validation) items."""
    logits, y = logits.float().clone(), y.clone()  # clones: inputs made under inference_mode cannot join autograd
    log_t = torch.zeros(1, requires_grad=True)  # T = exp(log_t) stays positive
    optimizer = torch.optim.LBFGS([log_t], lr=0.5, max_iter=100, line_search_fn="strong_wolfe")

    def closure() -> torch.Tensor:
        optimizer.zero_grad()
        loss = nll(logits / log_t.exp(), y)
        loss.backward()
        return loss

    optimizer.step(closure)
    return float(log_t.detach().exp().clamp(*TEMPERATURE_RANGE))


def reliability_table(probs: np.ndarray, y: np.ndarray, bins: int = 15) -> pd.DataFrame:
    """Per confidence bin (lower, upper]: items, mean confidence, accuracy (multi-label: every (item, tag)
    probability, and the share of them that are the item's tags)."""
    if _multi(y):
        confidence, correct = probs.ravel(), np.asarray(y).ravel() > 0.5
    else:
        confidence, correct = probs.max(1), probs.argmax(1) == y
    index = np.clip(np.ceil(confidence * bins).astype(int) - 1, 0, bins - 1)
    rows = []
    for b in range(bins):
        member = index == b
        rows.append({"lower": b / bins, "upper": (b + 1) / bins, "items": int(member.sum()),
                     "confidence": float(confidence[member].mean()) if member.any() else np.nan,
                     "accuracy": float(correct[member].mean()) if member.any() else np.nan})
    return pd.DataFrame(rows)


def expected_calibration_error(probs: np.ndarray, y: np.ndarray, bins: int = 15) -> float:
    """Sum over bins of (share of items) x |accuracy - mean confidence|: 0 is perfectly calibrated."""
    table = reliability_table(probs, y, bins).dropna()
    return float((table["items"] / table["items"].sum() * (table["accuracy"] - table["confidence"]).abs()).sum())


def calibration_summary(logits: torch.Tensor, y: torch.Tensor, temperature: float, bins: int = 15) -> dict:
    """ECE and NLL of the raw and the temperature-scaled probabilities."""
    out = {"temperature": round(temperature, 4), "bins": bins}
    for name, t in (("before", 1.0), ("after", temperature)):
        probs = probabilities(logits, t, multi=_multi(y))
        out[f"ece_{name}"] = round(expected_calibration_error(probs, y.numpy(), bins), 4)
        out[f"nll_{name}"] = round(float(nll(logits / t, y)), 4)
    return out


def plot_reliability(logits: torch.Tensor, y: torch.Tensor, temperature: float, path: Path, *,
                     bins: int = 15, title: str = "") -> None:
    """Accuracy against confidence per bin, before and after temperature scaling; the diagonal is perfect."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(5.5, 5))
    ax.plot([0, 1], [0, 1], color="grey", linestyle="--", linewidth=1, label="perfectly calibrated")
    for name, t, colour in (("raw", 1.0, "tab:red"), (f"T = {temperature:.2f}", temperature, "tab:blue")):
        probs = probabilities(logits, t, multi=_multi(y))
        table = reliability_table(probs, y.numpy(), bins).dropna()
        ece = expected_calibration_error(probs, y.numpy(), bins)
        ax.plot(table["confidence"], table["accuracy"], marker="o", color=colour, label=f"{name}: ECE {ece:.3f}")
    ax.set_xlim(0, 1)
    ax.set_ylim(0, 1)
    ax.set_xlabel("probability (every item x tag)" if _multi(y) else "confidence (top class)")
    ax.set_ylabel("accuracy")
    ax.set_title(title)
    ax.legend(loc="upper left")
    fig.tight_layout()
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=110)
    plt.close(fig)
