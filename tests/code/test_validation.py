"""Every kind of broken row is refused with its row named; every odd-but-valid row is accepted."""

import pandas as pd
import pytest

from fusionops.config import DataParams, SplitParams, ValidateParams
from fusionops.data.manifest import read_manifest, to_canonical
from fusionops.data.prepare import prepare, split_manifest
from fusionops.errors import DataError
from fusionops.validation import validate


def _canonical(manifest):
    return to_canonical(read_manifest(manifest), DataParams())


def test_every_bad_row_is_reported_at_once_and_odd_rows_pass(zoo):
    folder, manifest, bad, odd = zoo
    report = validate(_canonical(manifest), folder, mode="rows")
    found = {(p.item_id, p.column) for p in report.problems}
    for item_id, column in bad.items():
        assert (item_id, column) in found, f"{item_id}/{column} not reported:\n{report.summary()}"
    assert not {p.item_id for p in report.problems} & set(odd), report.summary()
    assert all(p.fix for p in report.problems)
    text = report.summary()
    for words in ("outside the images root", "absolute path", "not an image", "0 bytes", "not found",
                  "decompression bomb", "damaged", "value is empty", "id is not unique", "a folder, not an image file"):
        assert words in text, words


def test_dataset_mode_needs_enough_training_items(zoo):
    folder, manifest, _, _ = zoo
    df = split_manifest(_canonical(manifest), SplitParams(min_groups_per_label=1))
    df.loc[df.index[-1], "label"] = "lonely label"  # one item: it cannot be in train and in test
    report = validate(df, folder, mode="dataset", min_train_items_per_label=2)
    assert any("'lonely label'" in p.problem for p in report.problems)


def test_batch_mode_knows_the_labels_but_counts_nothing(zoo):
    folder, manifest, _, odd = zoo
    df = _canonical(manifest)
    batch = df[df["item_id"].isin(odd)].copy()
    assert validate(batch, folder, mode="batch", known_labels=set(df["label"])).success
    batch.loc[batch.index[0], "label"] = "Spaceships"
    report = validate(batch, folder, mode="batch", known_labels=set(df["label"]))
    assert [(p.item_id, p.column) for p in report.problems] == [(batch["item_id"].iloc[0], "label")]
    assert "unknown label 'Spaceships'" in report.summary()


def test_missing_column_is_one_table_problem(slice_prepared, slice_dir):
    report = validate(slice_prepared.drop(columns=["text"]), slice_dir)
    assert [(p.item_id, p.column) for p in report.problems] == [(None, "text")]


def test_clean_slice_passes(slice_prepared, slice_dir):
    report = validate(slice_prepared, slice_dir, min_train_items_per_label=2)
    assert report.success, report.summary()


def _params(folder, tmp_path, policy):
    data = DataParams(manifest=folder / "manifest.csv", images_root=folder, prepared=tmp_path / "prepared.csv")
    checks = ValidateParams(on_bad_rows=policy, rejected=tmp_path / "rejected.csv")
    return data, SplitParams(min_groups_per_label=1), checks


def test_prepare_fail_policy_writes_nothing(zoo, tmp_path):
    folder, _, bad, _ = zoo
    data, split, checks = _params(folder, tmp_path, "fail")
    with pytest.raises(DataError) as err:
        prepare(data, split, checks)
    assert all(item_id in str(err.value) for item_id in bad)
    assert "nothing was written" in str(err.value)
    assert list(tmp_path.iterdir()) == []


def test_prepare_skip_policy_drops_and_lists_bad_rows(zoo, tmp_path):
    folder, manifest, bad, odd = zoo
    data, split, checks = _params(folder, tmp_path, "skip")
    df, rejected = prepare(data, split, checks)
    assert not set(df["item_id"]) & set(bad)
    assert set(odd) <= set(df["item_id"])
    listed = pd.read_csv(tmp_path / "rejected.csv")
    assert set(listed["item_id"]) == set(bad)
    assert len(df) == len(read_manifest(manifest)) - len(bad) - 1  # the duplicated id loses both of its rows
