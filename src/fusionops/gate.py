"""The promotion gate: is the challenger significantly better than the champion on the same frozen test items?

Both models are scored on the same items (the stable split keeps the test set frozen across data versions), so
the comparison is paired: a bootstrap confidence interval on the macro-F1 difference (resampling items, both
models' predictions together) and McNemar's exact test on the items exactly one of them gets right. A per-class
guard stops a challenger that wins on average by giving up a class.

Multi-label models (label cells are tag lists) are compared on 0/1 matrices items x tags: macro-F1 over the tags,
an item is right when every one of its tags is, and the per-class guard runs per tag.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field

import numpy as np
from sklearn.metrics import accuracy_score, f1_score

from fusionops.config import PromoteParams
from fusionops.labels import split_tags


@dataclass
class GateResult:
    promote: bool
    reason: str
    items: int
    champion: dict
    challenger: dict
    delta_macro_f1: float
    ci_low: float
    ci_high: float
    confidence_level: float
    mcnemar_p: float
    discordant: dict
    class_drops: list[dict] = field(default_factory=list)

    def to_dict(self) -> dict:
        return asdict(self)


def _macro_f1(labels: list):
    def statistic(y: np.ndarray, pred: np.ndarray) -> float:  # multi-label: `labels` are column indices
        return f1_score(y, pred, labels=labels, average="macro", zero_division=0)

    return statistic


def _right(y: np.ndarray, pred: np.ndarray) -> np.ndarray:
    """Per item: the prediction is right (multi-label: every tag of it)."""
    same = pred == y
    return same.all(1) if same.ndim == 2 else same


def _multi_hot(cells: np.ndarray, labels: list[str], separator: str) -> np.ndarray:
    index = {label: j for j, label in enumerate(labels)}
    out = np.zeros((len(cells), len(labels)), dtype=int)
    for i, cell in enumerate(cells):
        out[i, [index[t] for t in split_tags(cell, separator)]] = 1
    return out


def bootstrap_delta(y: np.ndarray, champion: np.ndarray, challenger: np.ndarray, labels: list[str], *,
                    n_resamples: int, confidence_level: float, seed: int) -> tuple[float, float]:
    """Percentile bootstrap CI of macro-F1(challenger) - macro-F1(champion), items resampled in pairs."""
    from scipy.stats import bootstrap

    if np.array_equal(champion, challenger):
        return 0.0, 0.0  # identical predictions: every resample differs by exactly zero
    f1 = _macro_f1(labels)
    # scipy resamples indices; the statistic looks the three aligned arrays up (paired by construction).
    index = np.arange(len(y))
    result = bootstrap(
        (index,), lambda i: f1(y[i], challenger[i]) - f1(y[i], champion[i]), n_resamples=n_resamples,
        confidence_level=confidence_level, method="percentile", vectorized=False,
        rng=np.random.default_rng(seed),
    )
    return float(result.confidence_interval.low), float(result.confidence_interval.high)


def mcnemar_test(y: np.ndarray, champion: np.ndarray, challenger: np.ndarray) -> tuple[float, dict]:
    """Exact McNemar p-value on the items exactly one model gets right."""
    from statsmodels.stats.contingency_tables import mcnemar

    a, b = _right(y, champion), _right(y, challenger)
    table = [[int(np.sum(a & b)), int(np.sum(a & ~b))], [int(np.sum(~a & b)), int(np.sum(~a & ~b))]]
    discordant = {"only_champion_right": table[0][1], "only_challenger_right": table[1][0]}
    if table[0][1] + table[1][0] == 0:
        return 1.0, discordant
    return float(mcnemar(table, exact=True).pvalue), discordant


def class_drops(y: np.ndarray, champion: np.ndarray, challenger: np.ndarray, labels: list[str],
                columns: list[int] | None = None) -> list[dict]:
    """Per-class F1 of both models, largest drop first (multi-label: `columns` are the tags' columns)."""
    scored = labels if columns is None else columns
    f1_a = f1_score(y, champion, labels=scored, average=None, zero_division=0)
    f1_b = f1_score(y, challenger, labels=scored, average=None, zero_division=0)
    support = [int(np.sum(y == label)) for label in labels] if columns is None else y[:, columns].sum(0).tolist()
    rows = [{"label": str(label), "champion_f1": round(float(a), 4), "challenger_f1": round(float(b), 4),
             "drop": round(float(a - b), 4), "support": n}
            for label, a, b, n in zip(labels, f1_a, f1_b, support, strict=True)]
    return sorted(rows, key=lambda r: -r["drop"])


def compare(y_true, champion_pred, challenger_pred, params: PromoteParams, *,
            separator: str | None = None) -> GateResult:
    """Decide whether the challenger replaces the champion; every number behind the decision is in the result.
    `separator`: multi-label, the label cells are tag lists joined by it."""
    y, a, b = (np.asarray(v, dtype=object).astype(str) for v in (y_true, champion_pred, challenger_pred))
    if not len(y) == len(a) == len(b) or len(y) == 0:
        raise ValueError(f"need the same non-empty test items for both models ({len(y)}, {len(a)}, {len(b)})")
    columns = None
    if separator is None:
        labels = sorted(set(y))
    else:  # every tag either side names is a column (a wrong extra tag makes the item wrong); scored: the true tags
        labels = sorted({tag for cell in y for tag in split_tags(cell, separator)})
        every = sorted({tag for cell in (*y, *a, *b) for tag in split_tags(cell, separator)})
        y, a, b = (_multi_hot(v, every, separator) for v in (y, a, b))
        columns = [every.index(tag) for tag in labels]
    scored = labels if columns is None else columns
    f1 = _macro_f1(scored)
    champion = {"accuracy": round(float(accuracy_score(y, a)), 4), "macro_f1": round(f1(y, a), 4)}
    challenger = {"accuracy": round(float(accuracy_score(y, b)), 4), "macro_f1": round(f1(y, b), 4)}
    level = 1 - params.alpha
    low, high = bootstrap_delta(y, a, b, scored, n_resamples=params.n_resamples, confidence_level=level,
                                seed=params.seed)
    p, discordant = mcnemar_test(y, a, b)
    drops = class_drops(y, a, b, labels, columns)
    worst = drops[0]
    delta = f1(y, b) - f1(y, a)

    if worst["drop"] > params.max_class_drop:
        promote, reason = False, (f"class {worst['label']!r} drops by {worst['drop']:.3f} F1 "
                                  f"(> promote.max_class_drop={params.max_class_drop})")
    elif params.test == "bootstrap":
        promote = low > params.min_delta
        reason = (f"macro-F1 difference {delta:+.4f}, {level:.0%} CI [{low:+.4f}, {high:+.4f}] "
                  f"{'lies above' if promote else 'does not lie above'} promote.min_delta={params.min_delta}")
    else:
        promote = p < params.alpha and challenger["accuracy"] > champion["accuracy"]
        reason = (f"McNemar p={p:.4g} (alpha {params.alpha}), accuracy {champion['accuracy']:.4f} -> "
                  f"{challenger['accuracy']:.4f}: {'significantly better' if promote else 'not significantly better'}")
    return GateResult(
        promote=promote, reason=reason, items=len(y), champion=champion, challenger=challenger,
        delta_macro_f1=round(float(delta), 4), ci_low=round(low, 4), ci_high=round(high, 4), confidence_level=level,
        mcnemar_p=round(p, 6), discordant=discordant, class_drops=drops,
    )


def markdown(result: GateResult, *, name: str, champion: str, challenger: str) -> str:
    """The decision as a person reads it (written to reports/ and logged with the challenger's run)."""
    verdict = "PROMOTED" if result.promote else "NOT PROMOTED"
    rows = "\n".join(f"| {r['label']} | {r['support']} | {r['champion_f1']:.3f} | {r['challenger_f1']:.3f} | "
                     f"{r['drop']:+.3f} |" for r in result.class_drops)
    return f"""# Promotion gate: {name} version {challenger} {verdict}

{result.reason}.

| | champion (v{champion}) | challenger (v{challenger}) |
|---|---|---|
| accuracy | {result.champion['accuracy']:.4f} | {result.challenger['accuracy']:.4f} |
| macro-F1 | {result.champion['macro_f1']:.4f} | {result.challenger['macro_f1']:.4f} |

- test items: {result.items} (the same frozen items for both models)
- macro-F1 difference: {result.delta_macro_f1:+.4f}, {result.confidence_level:.0%} bootstrap CI
  [{result.ci_low:+.4f}, {result.ci_high:+.4f}]
- McNemar exact p = {result.mcnemar_p:.4g}; only champion right: {result.discordant['only_champion_right']},
  only challenger right: {result.discordant['only_challenger_right']}

| class | support | champion F1 | challenger F1 | F1 drop (champion - challenger) |
|---|---|---|---|---|
{rows}
"""
