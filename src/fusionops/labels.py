"""Labels: one class per item (single), or a set of tags per item (multi, data.label_mode), and all that differs.

Single-label: softmax over the classes, cross-entropy, the top class. Multi-label: a sigmoid per tag, binary
cross-entropy, and every tag whose probability reaches its own threshold (tuned on validation for the best F1 of
that tag); an item always gets at least its most probable tag, as every training item has one. In a manifest a
multi-label cell lists the tags joined by data.label_separator ("Animals & Nature|twitter"); prepare writes them
sorted and without duplicates, so one set of tags has one spelling.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from typing import TYPE_CHECKING

import numpy as np
import pandas as pd

from fusionops.errors import DataError

if TYPE_CHECKING:  # torch loads only where models run: prepare, validate and ingest never pay for it
    import torch


def split_tags(cell: str, separator: str | None) -> tuple[str, ...]:
    """The tags of one label cell, stripped, sorted and unique; single-label: the cell itself."""
    if separator is None:
        return (cell,)
    return tuple(sorted({tag.strip() for tag in str(cell).split(separator) if tag.strip()}))


def join_tags(tags: Iterable[str], separator: str | None) -> str:
    return (separator or "").join(tags)


def canonical(labels: pd.Series, separator: str | None) -> pd.Series:
    """Every label cell in its one spelling (multi-label: sorted unique tags)."""
    if separator is None:
        return labels
    return labels.map(lambda cell: join_tags(split_tags(cell, separator), separator))


def explode(df: pd.DataFrame, separator: str | None) -> pd.DataFrame:
    """One row per (item, tag): what per-label counts and checks read. Single-label: the frame as it is."""
    if separator is None:
        return df
    return df.assign(label=df["label"].map(lambda cell: list(split_tags(cell, separator)))).explode("label").dropna(
        subset=["label"])


def known_labels(df: pd.DataFrame, separator: str | None) -> set[str]:
    """Every label (multi-label: every tag) the manifest uses."""
    return set(explode(df, separator)["label"])


def macro_f1(y: np.ndarray, pred: np.ndarray) -> float:
    """Macro-F1 over the labels that occur in `y` or `pred`. Multi-label (0/1 matrices): over the tags some item has
    or is given, as single-label does over classes; a tag absent from both would count as F1 0."""
    from sklearn.metrics import f1_score

    if y.ndim == 1:
        return float(f1_score(y, pred, average="macro", zero_division=0))
    present = np.flatnonzero(y.any(0) | pred.any(0))
    if not len(present):
        return 0.0
    return float(f1_score(y, pred, labels=present, average="macro", zero_division=0))


def tune_thresholds(probs: np.ndarray, y: np.ndarray, grid: np.ndarray | None = None) -> np.ndarray:
    """Per tag, the probability threshold with the best F1 on these (validation) items; 0.5 for a tag that has no
    positive item there (nothing to tune on), and the one nearest 0.5 among equally good ones."""
    grid = np.round(np.arange(0.05, 0.951, 0.05), 2) if grid is None else grid
    order = np.argsort(np.abs(grid - 0.5), kind="stable")  # ties go to the threshold nearest 0.5
    thresholds = np.full(probs.shape[1], 0.5)
    for j in range(probs.shape[1]):
        positive = y[:, j].astype(bool)
        if not positive.any():
            continue
        predicted = probs[:, j][:, None] >= grid[None, :]
        tp = (predicted & positive[:, None]).sum(0)
        f1 = 2 * tp / np.maximum(predicted.sum(0) + positive.sum(), 1)
        thresholds[j] = grid[order][np.argmax(f1[order])]
    return thresholds


class LabelTask:
    """The classes a model predicts and how it turns logits into labels; built from params at training time and
    from the model's config.json when serving."""

    def __init__(self, labels: Sequence[str], *, separator: str | None = None,
                 thresholds: Sequence[float] | None = None):
        self.labels = list(labels)
        self.separator = separator
        self.index = {label: i for i, label in enumerate(self.labels)}
        self.thresholds = np.asarray(thresholds if thresholds is not None else [0.5] * len(self.labels), dtype=float)

    @property
    def multi(self) -> bool:
        return self.separator is not None

    @classmethod
    def from_config(cls, config: dict) -> LabelTask:
        return cls(config["labels"], separator=config.get("label_separator"), thresholds=config.get("thresholds"))

    def config(self) -> dict:
        """What config.json records so serving decides as evaluation did."""
        if not self.multi:
            return {}
        return {"label_mode": "multi", "label_separator": self.separator,
                "thresholds": [round(float(t), 4) for t in self.thresholds]}

    def targets(self, cells: pd.Series, what: str = "these items", ids: Sequence[str] | None = None) -> torch.Tensor:
        """Class indices (single) or a 0/1 matrix items x tags (multi); labels the model does not know: refused,
        naming the first rows (`ids`) that have them."""
        import torch

        tags = [split_tags(cell, self.separator) for cell in cells]
        unknown = sorted({t for item in tags for t in item if t not in self.index})
        if unknown:
            rows = [str(ids[i]) for i, item in enumerate(tags) if set(item) - self.index.keys()] if ids else []
            shown = f" (rows {', '.join(map(repr, rows[:5]))}{', ...' if len(rows) > 5 else ''})" if rows else ""
            raise DataError(f"{what} have labels never seen in training: {unknown}{shown}; run `fusionops "
                            "validate`, or lower split.min_groups_per_label so prepare drops them")
        if not self.multi:
            return torch.tensor([self.index[t[0]] for t in tags], dtype=torch.int64)
        y = torch.zeros(len(tags), len(self.labels))
        for i, item in enumerate(tags):
            y[i, [self.index[t] for t in item]] = 1.0
        return y

    def loss(self, label_smoothing: float = 0.0, *, prior: torch.Tensor | None = None, adjustment: float = 0.0):
        """Cross-entropy (single) or binary cross-entropy with targets smoothed towards 0.5 (multi).

        Single-label with `adjustment` > 0: the logit-adjusted loss (Menon et al., 2021), cross-entropy of the logits
        plus adjustment * log(prior), the classes' shares in training: the logits themselves then learn the balanced
        error, so rare classes are not given up for frequent ones (macro-F1), and serving is unchanged."""
        import torch
        from torch.nn import functional as F

        if not self.multi:
            cross_entropy = torch.nn.CrossEntropyLoss(label_smoothing=label_smoothing)
            if adjustment <= 0 or prior is None:
                return cross_entropy
            shift = adjustment * prior.clamp(min=1e-12).log()
            return lambda logits, y: cross_entropy(logits + shift.to(logits.device, logits.dtype), y)

        def bce(logits: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
            return F.binary_cross_entropy_with_logits(logits.float(), y * (1 - label_smoothing) + label_smoothing / 2)

        return bce

    def probabilities(self, logits: torch.Tensor, temperature: float = 1.0) -> np.ndarray:
        from fusionops.calibration import probabilities

        return probabilities(logits, temperature, multi=self.multi)

    def decide_logits(self, logits: torch.Tensor, temperature: float = 1.0) -> np.ndarray:
        """`decide` on the logits (single-label: their argmax, which no temperature changes)."""
        if not self.multi:
            return logits.argmax(1).numpy()
        return self.decide(self.probabilities(logits, temperature))

    def decide(self, probs: np.ndarray) -> np.ndarray:
        """Class indices (single), or a boolean matrix items x tags: the tags at or over their threshold, and the
        most probable one when none is (multi)."""
        if not self.multi:
            return probs.argmax(1)
        chosen = probs >= self.thresholds[None, :]
        none = np.flatnonzero(~chosen.any(1))
        chosen[none, probs[none].argmax(1)] = True
        return chosen

    def one_hot(self, decisions: np.ndarray | torch.Tensor) -> np.ndarray:
        """Items x labels, True where the label is given: the same shape for both modes (metrics, plots)."""
        decisions = np.asarray(decisions)
        if decisions.ndim == 2:
            return decisions.astype(bool)
        out = np.zeros((len(decisions), len(self.labels)), dtype=bool)
        out[np.arange(len(decisions)), decisions] = True
        return out

    def names(self, decisions: np.ndarray | torch.Tensor) -> list[str]:
        """The label cell of each item (multi: its tags joined by the separator)."""
        return [join_tags((self.labels[j] for j in np.flatnonzero(row)), self.separator)
                for row in self.one_hot(decisions)]

    def confidence(self, probs: np.ndarray, decisions: np.ndarray) -> np.ndarray:
        """The probability of the decision: the top class's (single), the least probable given tag's (multi)."""
        if not self.multi:
            return probs.max(1)
        return np.where(decisions, probs, np.inf).min(1)
