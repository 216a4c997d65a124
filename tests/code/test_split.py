import pandas as pd
import pytest

from fusionops.config import DataParams, SplitParams
from fusionops.data.prepare import prepare_manifest
from fusionops.data.split import assign_splits


def _groups(n: int) -> pd.Series:
    return pd.Series([f"g{i}" for i in range(n)])


def test_proportions_follow_params():
    splits = assign_splits(_groups(20000), train=0.7, val=0.15, salt="s")
    share = splits.value_counts(normalize=True)
    assert share["train"] == pytest.approx(0.70, abs=0.015)
    assert share["val"] == pytest.approx(0.15, abs=0.015)
    assert share["test"] == pytest.approx(0.15, abs=0.015)


def test_adding_items_never_moves_existing_ones():
    before = assign_splits(_groups(500), train=0.7, val=0.15, salt="s")
    grown = pd.concat([_groups(500), pd.Series([f"new{i}" for i in range(300)])], ignore_index=True)
    shuffled = grown.sample(frac=1, random_state=1)  # other items, other order: the index keeps the identity
    after = assign_splits(shuffled, train=0.7, val=0.15, salt="s")
    assert after.loc[range(500)].tolist() == before.tolist()


def test_salt_reshuffles():
    a = assign_splits(_groups(500), train=0.7, val=0.15, salt="a")
    b = assign_splits(_groups(500), train=0.7, val=0.15, salt="b")
    assert (a != b).mean() > 0.2


def test_demo_split_is_grouped(demo_manifest):
    """Both drawings of an emoji share its name: they must never be split apart."""
    df = prepare_manifest(demo_manifest, DataParams(), SplitParams())
    assert df.groupby("group")["split"].nunique().max() == 1
    assert set(df["split"]) == {"train", "val", "test"}


def test_rare_labels_are_dropped_and_named(demo_manifest, caplog):
    df = prepare_manifest(demo_manifest, DataParams(label_column="subcategory"), SplitParams(min_groups_per_label=3))
    groups = df.groupby("label")["group"].nunique()
    assert groups.min() >= 3
    assert "animal-amphibian" not in set(df["label"])
    assert "animal-amphibian" in caplog.text


def test_missing_column_is_named(demo_manifest):
    from fusionops.errors import DataError

    with pytest.raises(DataError, match="data.group_column 'emoji_id' is not a column .*set data.group_column: null"):
        prepare_manifest(demo_manifest.drop(columns=["emoji_id"]), DataParams(), SplitParams())
