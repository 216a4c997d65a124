import numpy as np
import pytest
import torch

from fusionops.calibration import (
    calibration_summary,
    expected_calibration_error,
    fit_temperature,
    plot_reliability,
    reliability_table,
)


@pytest.fixture(scope="module")
def overconfident():
    """Labels drawn from softmax(z), and the logits of a model three times too sure of itself: 3 z."""
    generator = torch.Generator().manual_seed(0)
    z = torch.randn(20_000, 5, generator=generator) * 1.5
    y = torch.multinomial(z.softmax(1), 1, generator=generator).squeeze(1)
    return 3 * z, y


def test_temperature_scaling_finds_the_overconfidence_and_fixes_the_ece(overconfident):
    logits, y = overconfident
    temperature = fit_temperature(logits, y)
    assert temperature == pytest.approx(3.0, rel=0.05)
    summary = calibration_summary(logits, y, temperature)
    assert summary["ece_after"] < 0.02 < summary["ece_before"]
    assert summary["nll_after"] < summary["nll_before"]
    # Dividing by T never changes the predicted class.
    assert torch.equal((logits / temperature).argmax(1), logits.argmax(1))


def test_a_calibrated_model_keeps_a_temperature_near_one(overconfident):
    logits, y = overconfident
    with torch.inference_mode():  # as the logits of predict_logits are made
        logits = logits / 3
    assert fit_temperature(logits, y) == pytest.approx(1.0, rel=0.05)


def test_ece_and_bins_by_hand():
    y = np.array([0, 0, 0, 0, 1])
    sure_and_right = np.eye(2)[y]
    assert expected_calibration_error(sure_and_right, y) == 0
    # Confidence 0.6 on every item, right 4 times in 5: |0.8 - 0.6| = 0.2.
    probs = np.tile([0.6, 0.4], (5, 1))
    assert expected_calibration_error(probs, y) == pytest.approx(0.2)
    table = reliability_table(np.vstack([sure_and_right, probs]), np.concatenate([y, y]), bins=10)
    assert table["items"].sum() == 10
    assert table.loc[9, "items"] == 5 and table.loc[9, "accuracy"] == 1  # confidence 1.0: the last bin
    assert table.loc[5, "items"] == 5 and table.loc[5, "confidence"] == pytest.approx(0.6)  # (0.5, 0.6]


def test_reliability_diagram_is_written_atomically(tmp_path, overconfident):
    logits, y = overconfident
    path = tmp_path / "plots/reliability.png"
    plot_reliability(logits[:500], y[:500], 3.0, path, title="t")
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert [p.name for p in path.parent.iterdir()] == ["reliability.png"]
