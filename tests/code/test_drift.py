"""Drift tests on real vectors: data like the training data passes, data from other classes is flagged."""

import pytest

from fusionops.config import DriftParams, RetrainParams
from fusionops.drift import drift_report, retrain_decision


@pytest.fixture(scope="module")
def halves(slice_prepared, slice_features):
    food = (slice_prepared["label"] == "Food & Drink").to_numpy()
    return slice_prepared, slice_features, food


def test_new_data_from_another_class_is_drift(halves, slice_dir):
    prepared, features, food = halves
    reference, new = prepared[~food].reset_index(drop=True), prepared[food].reset_index(drop=True)
    report = drift_report(reference, features.select(~food), slice_dir, new, features.select(food), slice_dir,
                          DriftParams(permutations=100))
    assert report["drift"] and report["tests"]["labels"]["drift"] and report["tests"]["embeddings"]["drift"]
    assert report["threshold"] == pytest.approx(0.05 / 4)


def test_new_data_like_the_reference_is_not_drift(halves, slice_dir):
    prepared, features, _ = halves
    first = prepared["group"].factorize()[0] % 2 == 0  # every other emoji: the same classes, the same styles
    report = drift_report(prepared[first].reset_index(drop=True), features.select(first), slice_dir,
                          prepared[~first].reset_index(drop=True), features.select(~first), slice_dir,
                          DriftParams(permutations=100))
    assert not report["drift"], report["tests"]


@pytest.mark.parametrize("policy, new, drift, expected", [
    ("ignore", 5, True, True), ("ignore", 0, True, False), ("require", 5, False, False),
    ("require", 5, True, True), ("force", 1, True, True), ("force", 1, False, False),
])
def test_retrain_decision_follows_the_policy(policy, new, drift, expected):
    params = RetrainParams(min_new_items=3, drift_policy=policy)
    assert retrain_decision(new, drift, params)[0] is expected
