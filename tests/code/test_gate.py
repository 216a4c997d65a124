import numpy as np
import pytest

from fusionops.config import PromoteParams
from fusionops.gate import compare, markdown

LABELS = np.array(["a", "b", "c", "d"])


def _preds(y: np.ndarray, accuracy: float, seed: int) -> np.ndarray:
    rng = np.random.default_rng(seed)
    wrong = rng.random(len(y)) > accuracy
    pred = y.copy()
    pred[wrong] = LABELS[(np.searchsorted(LABELS, y[wrong]) + 1) % len(LABELS)]
    return pred


@pytest.fixture()
def y():
    return np.random.default_rng(0).choice(LABELS, size=400)


@pytest.mark.parametrize("test", ["bootstrap", "mcnemar"])
def test_clearly_better_challenger_is_promoted(y, test):
    result = compare(y, _preds(y, 0.70, 1), _preds(y, 0.90, 2), PromoteParams(test=test))
    assert result.promote, result.reason
    assert result.ci_low > 0 and result.mcnemar_p < 0.05
    assert result.challenger["accuracy"] > result.champion["accuracy"]


@pytest.mark.parametrize("test", ["bootstrap", "mcnemar"])
def test_worse_or_equal_challenger_is_not_promoted(y, test):
    champion = _preds(y, 0.85, 1)
    assert not compare(y, champion, _preds(y, 0.75, 2), PromoteParams(test=test)).promote
    same = compare(y, champion, champion, PromoteParams(test=test))
    assert not same.promote and same.ci_low == same.ci_high == 0 and same.mcnemar_p == 1


def test_small_noisy_gain_is_not_significant(y):
    champion = _preds(y, 0.80, 1)
    challenger = champion.copy()
    fix = np.flatnonzero(champion != y)[:3]  # 3 more right answers out of 400
    challenger[fix] = y[fix]
    result = compare(y, champion, challenger, PromoteParams())
    assert result.delta_macro_f1 > 0 and not result.promote
    assert result.discordant == {"only_champion_right": 0, "only_challenger_right": 3}


def test_class_guard_blocks_a_challenger_that_sacrifices_a_class(y):
    champion = _preds(y, 0.80, 1)
    challenger = y.copy()  # perfect everywhere...
    challenger[y == "c"] = "a"  # ...except class c, always wrong now
    result = compare(y, champion, challenger, PromoteParams())
    assert not result.promote and "'c'" in result.reason
    assert result.class_drops[0]["label"] == "c"


def test_gate_reads_each_models_own_predictions(y):
    """Swapping champion and challenger must flip the sign: the gate never scores one model twice."""
    a, b = _preds(y, 0.7, 1), _preds(y, 0.9, 2)
    forward, backward = compare(y, a, b, PromoteParams()), compare(y, b, a, PromoteParams())
    assert forward.delta_macro_f1 == pytest.approx(-backward.delta_macro_f1)
    assert forward.champion == backward.challenger
    text = markdown(forward, name="m", champion="1", challenger="2")
    assert "version 2 PROMOTED" in text and "| c |" in text


def test_a_class_that_collapses_blocks_promotion_and_is_named_plainly(y):
    champion = _preds(y, 0.85, 1)
    challenger = _preds(y, 0.95, 2)
    challenger[y == "c"] = "d"  # better overall, but class c is never predicted any more
    result = compare(y, champion, challenger, PromoteParams(max_class_drop=0.10))
    assert not result.promote and result.reason.startswith("class 'c' drops by ")  # not np.str_('c')
    assert "np.str_" not in markdown(result, name="m", champion="1", challenger="2")
