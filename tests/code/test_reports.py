"""What a person looks at after a run: the headline scores, the training curves, the small-data warnings."""

import copy
import json
from pathlib import Path

import pytest

from fusionops.evaluate import small_data_warnings
from fusionops.reports import plot_training_curves, write_scores

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture()
def metrics() -> dict:
    return json.loads((ROOT / "reports/metrics.json").read_text())  # the demo's, as evaluate wrote them


def test_the_headline_is_five_short_figures(metrics, tmp_path):
    write_scores(metrics, tmp_path / "scores.json")
    scores = json.loads((tmp_path / "scores.json").read_text())
    assert scores == {"accuracy": metrics["test"]["accuracy"], "macro_f1": metrics["test"]["macro_f1"],
                      "img_only": metrics["ablation"]["image_only"]["accuracy"],
                      "txt_only": metrics["ablation"]["text_only"]["accuracy"],
                      "ece": metrics["calibration"]["ece_after"]}
    # `dvc metrics show`: the path, then each key padded by 4; the demo's four-digit figures fit 80 columns
    assert len("reports/scores.json") + 2 + sum(max(len(k), len(str(v))) + 4 for k, v in scores.items()) <= 80


def test_training_curves_are_a_picture(tmp_path):
    plot_training_curves(ROOT / "reports/train_history", tmp_path / "curves.png")
    from PIL import Image

    with Image.open(tmp_path / "curves.png") as image:
        assert image.format == "PNG" and image.width > 2 * image.height > 500  # two panels side by side


def test_the_demo_raises_no_warning(metrics):
    assert small_data_warnings(metrics) == []


def test_fusion_below_a_single_modality_is_flagged(metrics):
    worse = copy.deepcopy(metrics)
    worse["test"]["accuracy"] = 0.83  # text only 0.8396 on the same items, the better of the two alone
    [warning] = small_data_warnings(worse)
    assert warning.startswith("the fused model scores below text only (0.8300 against 0.8396 test accuracy, "
                              "-0.0096 on 536 items)") and "add data" in warning


@pytest.mark.parametrize("temperature", [0.05, 20.0])
def test_a_temperature_fit_on_its_bound_is_flagged(metrics, temperature):
    clamped = copy.deepcopy(metrics)
    clamped["calibration"] |= {"temperature": temperature, "ece_before": 0.672, "ece_after": 0.267}
    [warning] = small_data_warnings(clamped)
    assert warning.startswith(f"the temperature fit ended on its bound {temperature:g} (ECE 0.672 -> 0.267): "
                              f"{metrics['val']['items']} validation items")
