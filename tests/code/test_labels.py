"""Multi-label pieces: tag lists in manifests, prepare and validation per tag, thresholds, decisions, the gate."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
import torch

from fusionops.calibration import expected_calibration_error, fit_temperature, nll
from fusionops.config import DataParams, PromoteParams, SplitParams, ValidateParams
from fusionops.data.prepare import prepare
from fusionops.errors import DataError
from fusionops.gate import compare
from fusionops.labels import LabelTask, canonical, split_tags, tune_thresholds
from fusionops.validation import validate

TAGS = LabelTask(["cat", "dog", "red"], separator="|", thresholds=[0.5, 0.3, 0.8])


def test_a_tag_list_has_one_spelling():
    assert split_tags(" red|cat ||cat", "|") == ("cat", "red")
    assert split_tags("Food & Drink", None) == ("Food & Drink",)  # single-label: the cell itself
    assert canonical(pd.Series(["red|cat", "dog"]), "|").tolist() == ["cat|red", "dog"]


def test_targets_are_a_tag_matrix_and_unknown_tags_are_named():
    y = TAGS.targets(pd.Series(["cat|red", "dog"]))
    assert y.tolist() == [[1, 0, 1], [0, 1, 0]]
    with pytest.raises(DataError, match="'bird'"):
        TAGS.targets(pd.Series(["cat|bird"]), what="items of the test split")
    assert LabelTask(["a", "b"]).targets(pd.Series(["b", "a"])).tolist() == [1, 0]


def test_each_tag_has_its_own_threshold_and_every_item_gets_one_tag():
    probs = np.array([[0.6, 0.35, 0.7],   # cat over 0.5, dog over 0.3, red under 0.8
                      [0.2, 0.1, 0.4]])   # none over its threshold: the most probable (red) all the same
    decisions = TAGS.decide(probs)
    assert TAGS.names(decisions) == ["cat|dog", "red"]
    assert TAGS.confidence(probs, decisions) == pytest.approx([0.35, 0.4])  # the least probable tag given


def test_thresholds_tuned_on_validation_separate_what_they_can():
    y = np.array([[1, 0], [1, 0], [0, 0], [0, 0]])
    probs = np.array([[0.32, 0.9], [0.41, 0.2], [0.1, 0.3], [0.25, 0.1]])
    thresholds = tune_thresholds(probs, y)
    assert 0.25 < thresholds[0] <= 0.32  # every positive over it, every negative under it
    assert thresholds[1] == 0.5  # no positive to tune on: the neutral value


def test_temperature_and_calibration_on_tags():
    torch.manual_seed(0)
    y = (torch.rand(400, 5) < 0.3).float()
    wrong = (torch.rand(400, 5) < 0.2).float()
    logits = ((y - wrong).abs() * 2 - 1) * 4 + torch.randn(400, 5)  # sure of itself, and wrong one time in five
    t = fit_temperature(logits, y)
    assert t > 1 and nll(logits / t, y) < nll(logits, y)
    probs = (logits / t).sigmoid().numpy()
    assert expected_calibration_error(probs, y.numpy()) < expected_calibration_error(logits.sigmoid().numpy(),
                                                                                     y.numpy())


def _manifest(tmp_path, labels: list[str]):
    from PIL import Image

    (tmp_path / "img").mkdir()
    rows = []
    for i, label in enumerate(labels):
        Image.new("RGB", (8, 8), (i * 9 % 255, 0, 0)).save(tmp_path / "img" / f"{i}.png")
        rows.append({"item_id": f"i{i}", "image": f"img/{i}.png", "text": f"item {i}", "tags": label,
                     "group": f"g{i}"})
    pd.DataFrame(rows).to_csv(tmp_path / "manifest.csv", index=False)
    return DataParams(manifest=tmp_path / "manifest.csv", images_root=tmp_path, label_column="tags",
                      group_column="group", label_mode="multi", prepared=tmp_path / "prepared.csv")


def test_prepare_drops_rare_tags_not_the_items_that_have_others(tmp_path):
    data = _manifest(tmp_path, ["cat|red", "red|cat", "cat", "dog|red", "rare", "dog", "dog|cat"])
    checks = ValidateParams(report=tmp_path / "v.json", rejected=tmp_path / "rejected.csv", on_bad_rows="skip")
    df, rejected = prepare(data, SplitParams(min_groups_per_label=2), checks)
    assert df["label"].tolist() == ["cat|red", "cat|red", "cat", "dog|red", "dog", "cat|dog"]
    assert [p.item_id for p in rejected] == ["i4"] and "'rare'" in rejected[0].problem


def test_validation_names_empty_tag_lists_and_unknown_tags(tmp_path):
    data = _manifest(tmp_path, ["cat|red", "|", "cat|bird"])
    df = pd.read_csv(data.manifest, dtype=str, keep_default_na=False).rename(columns={"tags": "label"})
    report = validate(df, tmp_path, mode="batch", known_labels={"cat", "red"}, separator="|")
    found = {(p.item_id, p.problem) for p in report.problems}
    assert ("i1", "no tag in '|'") in found
    assert any(i == "i2" and "'bird'" in problem for i, problem in found)
    assert not any(i == "i0" for i, _ in found)


def test_gate_compares_tag_sets_tag_by_tag():
    y = ["cat|red", "dog", "cat", "dog|red"] * 25
    champion = ["cat", "dog", "cat", "dog"] * 25  # never says red
    challenger = list(y)
    result = compare(y, champion, challenger, PromoteParams(n_resamples=200), separator="|")
    assert result.promote and result.challenger["accuracy"] == 1.0 and result.champion["accuracy"] == 0.5
    by_tag = {r["label"]: r for r in result.class_drops}
    assert set(by_tag) == {"cat", "dog", "red"} and by_tag["red"]["support"] == 50
    assert by_tag["red"]["champion_f1"] == 0 and by_tag["red"]["challenger_f1"] == 1
    backwards = compare(y, challenger, champion, PromoteParams(n_resamples=200), separator="|")
    assert not backwards.promote and "'red'" in backwards.reason  # the per-tag guard
    # A tag no test item has still makes an item wrong: "cat|bird" is not "cat".
    spurious = compare(y, challenger, [f"{c}|bird" for c in challenger], PromoteParams(n_resamples=200), separator="|")
    assert spurious.challenger["accuracy"] == 0.0 and not spurious.promote
    assert {r["label"] for r in spurious.class_drops} == {"cat", "dog", "red"}


def test_macro_f1_averages_the_tags_that_occur():
    from fusionops.labels import macro_f1

    y = np.array([[1, 0, 0], [0, 1, 0]])
    assert macro_f1(y, y.copy()) == 1.0  # the third tag, absent on both sides, does not count as 0
    assert macro_f1(np.array([0, 1]), np.array([0, 1])) == 1.0


def test_unknown_labels_name_their_rows():
    with pytest.raises(DataError, match=r"rows 'b'"):
        TAGS.targets(pd.Series(["cat", "bird|cat"]), ids=["a", "b"])
