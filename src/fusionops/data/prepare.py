"""The prepare stage: raw manifest in; checked rows, rare labels dropped and a stable grouped split out."""

from __future__ import annotations

import logging
from pathlib import Path

import pandas as pd

from fusionops.atomic import atomic_path
from fusionops.config import DataParams, SplitParams, ValidateParams
from fusionops.data.manifest import read_manifest, to_canonical
from fusionops.data.split import assign_splits
from fusionops.errors import DataError

log = logging.getLogger(__name__)


def _with_groups(df: pd.DataFrame) -> pd.DataFrame:
    # A row without a group key is its own group: it can never leak into another split through a shared key.
    return df.assign(group=df["group"].where(df["group"].str.strip() != "", df["item_id"]))


def rare_labels(df: pd.DataFrame, split: SplitParams) -> pd.Series:
    """Groups per label, for the labels with fewer than split.min_groups_per_label groups."""
    groups_per_label = _with_groups(df).groupby("label")["group"].nunique()
    return groups_per_label[groups_per_label < split.min_groups_per_label]


def split_manifest(df: pd.DataFrame, split: SplitParams) -> pd.DataFrame:
    """Rare labels dropped and a split per row (train/val/test by hashed group) on a canonical manifest."""
    df = _with_groups(df)
    rare = rare_labels(df, split)
    if len(rare):
        log.warning(
            "dropping %d label(s) with fewer than %d groups (split.min_groups_per_label): %s",
            len(rare), split.min_groups_per_label, ", ".join(map(str, rare.index)),
        )
        df = df[~df["label"].isin(rare.index)].reset_index(drop=True)
    df["split"] = assign_splits(df["group"], train=split.train, val=split.val, salt=split.salt)
    return df


def prepare_manifest(raw: pd.DataFrame, data: DataParams, split: SplitParams) -> pd.DataFrame:
    """Canonical columns, rare labels dropped, split assigned (no row checks: see `prepare`)."""
    return split_manifest(to_canonical(raw, data, source=data.manifest), split)


def prepare(data: DataParams, split: SplitParams, checks: ValidateParams) -> tuple[pd.DataFrame, list]:
    """Read data.manifest, check every row, apply validate.on_bad_rows, write data.prepared.

    Returns the prepared frame and the problems of the rows that were dropped. With on_bad_rows 'fail', any bad
    row stops the stage before anything is written.
    """
    from fusionops.validation import Problem, validate

    df = to_canonical(read_manifest(data.manifest), data, source=data.manifest)
    report = validate(df, data.images_root, mode="rows", max_pixels=checks.max_image_pixels)
    if report.table_problems or (report.problems and checks.on_bad_rows == "fail"):
        hint = "" if report.table_problems else "\n(or set validate.on_bad_rows: skip to drop bad rows and go on)"
        raise DataError(f"{data.manifest}: {report.summary()}{hint}\nnothing was written")
    rejected = report.problems
    if rejected:
        log.warning("skipping %d bad row(s) (validate.on_bad_rows: skip), listed in %s",
                    len(report.bad_rows), checks.rejected)
        df = df[~df["item_id"].isin(report.bad_rows)].reset_index(drop=True)
    # Rows of labels too rare to split are listed too: every raw row is either prepared or rejected, with a reason.
    rare = rare_labels(df, split)
    rejected += [Problem(str(i), "label", f"label {label!r} has {rare[label]} group(s), fewer than "
                         f"split.min_groups_per_label={split.min_groups_per_label}: not trained on",
                         "add items of this label (other groups), or lower split.min_groups_per_label")
                 for i, label in zip(df["item_id"], df["label"], strict=True) if label in rare.index]
    df = split_manifest(df, split)
    _write_csv(pd.DataFrame([vars(p) for p in rejected], columns=["item_id", "column", "problem", "fix"]),
               checks.rejected)
    _write_csv(df, data.prepared)
    return df, rejected


def _write_csv(df: pd.DataFrame, path: Path) -> None:
    with atomic_path(path) as tmp:
        df.to_csv(tmp, index=False)
