"""Expectations on the shipped demo dataset and on what prepare makes of it."""

import pytest

from fusionops.config import DataParams, SplitParams, ValidateParams
from fusionops.data.prepare import prepare_manifest
from fusionops.validation import validate


def test_demo_dataset_ships_with_its_attribution(demo_dir, demo_manifest):
    readme = (demo_dir / "README.md").read_text()
    for credit in ("Twemoji", "CC-BY 4.0", "Noto Emoji", "Apache License 2.0", "emoji-datasource"):
        assert credit in readme
    assert len(demo_manifest) == 3812
    assert demo_manifest["item_id"].is_unique


@pytest.mark.parametrize("label_column", ["category", "subcategory"])
def test_demo_data_passes_validation(demo_dir, demo_manifest, label_column):
    """The whole demo set (every image decoded) passes the suite, with either label column."""
    df = prepare_manifest(demo_manifest, DataParams(label_column=label_column), SplitParams())
    report = validate(df, demo_dir, min_train_items_per_label=ValidateParams().min_train_items_per_label)
    assert report.success, report.summary()
    assert df["label"].nunique() == {"category": 9, "subcategory": 95}[label_column]


def test_demo_split_is_near_70_15_15_and_every_label_trains(demo_manifest):
    df = prepare_manifest(demo_manifest, DataParams(), SplitParams())
    share = df["split"].value_counts(normalize=True)
    assert abs(share["train"] - 0.70) < 0.03 and abs(share["test"] - 0.15) < 0.03
    assert set(df.loc[df["split"] == "test", "label"]) <= set(df.loc[df["split"] == "train", "label"])
