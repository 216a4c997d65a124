"""Does new data look like the data the model was trained on? Four two-sample tests, each with a p-value.

- labels: chi-square test of the label counts (scipy.stats.chi2_contingency);
- text length: Kolmogorov-Smirnov on characters per text (scipy.stats.ks_2samp);
- image statistics: Kolmogorov-Smirnov on mean brightness (scipy.stats.ks_2samp);
- embeddings: maximum mean discrepancy (RBF kernel, median-distance bandwidth) between the cached image+text
  vectors, with a permutation p-value (scipy.stats.permutation_test).

Drift is declared when any test rejects at alpha / number of tests (Bonferroni), so a daily run does not cry wolf.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd

from fusionops.config import DriftParams, RetrainParams
from fusionops.features import FeatureSet
from fusionops.features.image import load_rgb
from fusionops.labels import explode


def _brightness(paths: list[Path]) -> np.ndarray:
    return np.array([np.asarray(load_rgb(p).convert("L"), dtype=np.float32).mean() for p in paths])


def _mmd_test(reference: np.ndarray, new: np.ndarray, *, n_resamples: int, seed: int) -> tuple[float, float]:
    """MMD^2 and its permutation p-value. The kernel matrix is computed once; permutations shuffle indices."""
    from scipy.spatial.distance import cdist
    from scipy.stats import permutation_test

    pooled = np.vstack([reference, new]).astype(np.float64)
    distances = cdist(pooled, pooled, "sqeuclidean")
    bandwidth = np.median(distances[np.triu_indices_from(distances, k=1)]) or 1.0
    kernel = np.exp(-distances / bandwidth)

    def mmd2(x_idx: np.ndarray, y_idx: np.ndarray) -> float:
        return float(kernel[np.ix_(x_idx, x_idx)].mean() + kernel[np.ix_(y_idx, y_idx)].mean()
                     - 2 * kernel[np.ix_(x_idx, y_idx)].mean())

    index = np.arange(len(pooled))
    result = permutation_test((index[:len(reference)], index[len(reference):]), mmd2, n_resamples=n_resamples,
                              alternative="greater", permutation_type="independent", vectorized=False,
                              rng=np.random.default_rng(seed))
    return float(result.statistic), float(result.pvalue)


def _vectors(features: FeatureSet) -> np.ndarray:
    """Image and text vectors side by side, each L2-normalised so neither dominates the distance."""
    def unit(a: np.ndarray) -> np.ndarray:
        return a / np.maximum(np.linalg.norm(a, axis=1, keepdims=True), 1e-12)

    return np.hstack([unit(features.image), unit(features.text)])


def drift_report(reference: pd.DataFrame, reference_features: FeatureSet, reference_root: Path, new: pd.DataFrame,
                 new_features: FeatureSet, new_root: Path, params: DriftParams, separator: str | None = None) -> dict:
    """Compare new items with the reference (training) items; both frames are canonical manifests whose rows
    align with their FeatureSet. `separator`: multi-label mode, where the label test counts tags."""
    from scipy.stats import chi2_contingency, ks_2samp

    rng = np.random.default_rng(params.seed)
    ref_rows = np.sort(rng.choice(len(reference), size=min(len(reference), params.reference_items), replace=False))
    ref = reference.iloc[ref_rows]
    tests = {}

    ref_labels, new_labels = explode(ref, separator)["label"], explode(new, separator)["label"]
    labels = sorted(set(ref_labels) | set(new_labels))
    table = np.array([[int((ref_labels == lab).sum()) for lab in labels],
                      [int((new_labels == lab).sum()) for lab in labels]])
    table = table[:, table.sum(0) > 0]
    chi2, p, _, _ = chi2_contingency(table) if table.shape[1] > 1 else (0.0, 1.0, None, None)
    tests["labels"] = {"statistic": round(float(chi2), 4), "p_value": float(p), "test": "chi-square"}

    ref_len, new_len = ref["text"].str.len(), new["text"].str.len()
    lengths = ks_2samp(ref_len, new_len)
    tests["text_length"] = {"statistic": round(float(lengths.statistic), 4), "p_value": float(lengths.pvalue),
                            "test": "Kolmogorov-Smirnov", "reference_mean": round(float(ref_len.mean()), 2),
                            "new_mean": round(float(new_len.mean()), 2)}

    ref_light = _brightness([Path(reference_root) / p for p in ref["image"]])
    new_light = _brightness([Path(new_root) / p for p in new["image"]])
    light = ks_2samp(ref_light, new_light)
    tests["image_brightness"] = {"statistic": round(float(light.statistic), 4), "p_value": float(light.pvalue),
                                 "test": "Kolmogorov-Smirnov", "reference_mean": round(float(ref_light.mean()), 2),
                                 "new_mean": round(float(new_light.mean()), 2)}

    mmd2, p = _mmd_test(_vectors(reference_features.select(ref_rows)), _vectors(new_features),
                        n_resamples=params.permutations, seed=params.seed)
    tests["embeddings"] = {"statistic": round(mmd2, 6), "p_value": p, "test": "MMD (RBF), permutation"}

    threshold = params.alpha / len(tests)
    for result in tests.values():
        result["drift"] = result["p_value"] < threshold
    return {"drift": any(t["drift"] for t in tests.values()), "threshold": threshold, "tests": tests,
            "reference_items": len(ref), "new_items": len(new)}



def retrain_decision(new_items: int, drift: bool | None, params: RetrainParams) -> tuple[bool, str]:
    """Whether to retrain after an ingest, and why (retrain.min_new_items and retrain.drift_policy).

    `new_items`: rows added and not trained on yet, over every night since the last training."""
    enough = new_items >= params.min_new_items
    if new_items == 0:
        return False, "no new data"
    if params.drift_policy == "require":
        if drift:
            return True, f"{new_items} new item(s) and drift detected (drift_policy: require)"
        return False, f"{new_items} new item(s) but no drift detected (drift_policy: require)"
    if params.drift_policy == "force" and drift and not enough:
        return True, f"drift detected: retraining on {new_items} new item(s), below min_new_items (drift_policy: force)"
    if enough:
        return True, f"{new_items} new item(s) >= retrain.min_new_items={params.min_new_items}"
    return False, f"{new_items} new item(s) < retrain.min_new_items={params.min_new_items}"
