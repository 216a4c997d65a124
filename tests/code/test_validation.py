import shutil

import pandas as pd
import pytest

from fusionops.validation import validate

GOOD = ["twitter/1f600", "google/1f600"]


@pytest.fixture()
def broken(tmp_path, slice_prepared, slice_dir):
    """The slice with one of each kind of problem, each in its own row."""
    root = tmp_path / "images"
    shutil.copytree(slice_dir / "images", root / "images")
    df = slice_prepared.copy()
    rows = df.index[df["split"] == "train"]
    (root / "images/fake.png").write_text("this is text, not a picture")
    (root / "images/empty.png").write_bytes(b"")
    original = (slice_dir / df.loc[rows[5], "image"]).read_bytes()
    (root / "images/truncated.png").write_bytes(original[: len(original) // 2])
    edits = {
        rows[0]: ("text", "   "),
        rows[1]: ("image", "images/missing.png"),
        rows[2]: ("image", "../../etc/passwd"),
        rows[3]: ("image", "images/fake.png"),
        rows[4]: ("image", "images/empty.png"),
        rows[5]: ("image", "images/truncated.png"),
        rows[6]: ("label", "lonely label"),
    }
    for row, (column, value) in edits.items():
        df.loc[row, column] = value
    df.loc[rows[7], "item_id"] = df.loc[rows[8], "item_id"]  # a duplicate id
    return df, root, {df.loc[r, "item_id"]: c for r, (c, _) in edits.items()}


def test_every_problem_is_reported_at_once_with_its_row(broken):
    df, root, expected = broken
    report = validate(df, root, min_train_items_per_label=2)
    assert not report.success
    found = {(p.item_id, p.column) for p in report.problems}
    for item_id, column in expected.items():
        assert (item_id, column) in found, f"{item_id}/{column} not reported: {report.summary()}"
    duplicate = df["item_id"][df["item_id"].duplicated()].iloc[0]
    assert (duplicate, "item_id") in found
    assert "outside the images root" in report.summary()
    assert all(p.fix for p in report.problems)


def test_clean_slice_passes(slice_prepared, slice_dir):
    report = validate(slice_prepared, slice_dir, min_train_items_per_label=2)
    assert report.success, report.summary()
    assert report.to_dict()["problem_count"] == 0


def test_missing_column_is_a_table_problem(slice_prepared, slice_dir):
    report = validate(slice_prepared.drop(columns=["text"]), slice_dir, min_train_items_per_label=2)
    assert [(p.item_id, p.column) for p in report.problems] == [(None, "text")]


def test_symlink_escaping_the_root_is_rejected(tmp_path, slice_prepared, slice_dir):
    root = tmp_path / "root"
    shutil.copytree(slice_dir / "images", root / "images")
    outside = tmp_path / "outside.png"
    shutil.copyfile(slice_dir / slice_prepared["image"].iloc[0], outside)
    (root / "images/link.png").symlink_to(outside)
    df = pd.concat([slice_prepared.iloc[[0]].assign(image="images/link.png", item_id="link"), slice_prepared])
    report = validate(df, root, min_train_items_per_label=2)
    assert [(p.item_id, p.column) for p in report.problems] == [("link", "image")]
