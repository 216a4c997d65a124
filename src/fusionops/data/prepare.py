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
from fusionops.labels import canonical, explode, join_tags, split_tags

log = logging.getLogger(__name__)


def _with_groups(df: pd.DataFrame) -> pd.DataFrame:
    # A row without a group key is its own group: it can never leak into another split through a shared key.
    return df.assign(group=df["group"].where(df["group"].str.strip() != "", df["item_id"]))


def rare_labels(df: pd.DataFrame, split: SplitParams, separator: str | None = None) -> pd.Series:
    """Groups per label, for the labels with fewer than split.min_groups_per_label groups (multi-label: per tag)."""
    groups_per_label = explode(_with_groups(df), separator).groupby("label")["group"].nunique()
    return groups_per_label[groups_per_label < split.min_groups_per_label]


def without_rare(df: pd.DataFrame, rare: pd.Series, separator: str | None) -> pd.DataFrame:
    """The rows that keep a label once the rare ones are gone (multi-label: rare tags are taken off the list)."""
    if separator is None:
        return df[~df["label"].isin(rare.index)]
    kept = df["label"].map(lambda cell: join_tags((t for t in split_tags(cell, separator) if t not in rare.index),
                                                  separator))
    return df.assign(label=kept)[kept != ""]


def split_manifest(df: pd.DataFrame, split: SplitParams, separator: str | None = None) -> pd.DataFrame:
    """Rare labels dropped and a split per row (train/val/test by hashed group) on a canonical manifest."""
    df = _with_groups(df).assign(label=lambda d: canonical(d["label"], separator))
    rare = rare_labels(df, split, separator)
    if len(rare):
        log.warning(
            "dropping %d label(s) with fewer than %d groups (split.min_groups_per_label): %s",
            len(rare), split.min_groups_per_label, ", ".join(map(str, rare.index)),
        )
        df = without_rare(df, rare, separator).reset_index(drop=True)
    df["split"] = assign_splits(df["group"], train=split.train, val=split.val, salt=split.salt)
    return df


def prepare_manifest(raw: pd.DataFrame, data: DataParams, split: SplitParams) -> pd.DataFrame:
    """Canonical columns, rare labels dropped, split assigned (no row checks: see `prepare`)."""
    canonical_rows = with_other_columns(to_canonical(raw, data, source=data.manifest), raw, data)
    return split_manifest(canonical_rows, split, data.separator)


def prepare(data: DataParams, split: SplitParams, checks: ValidateParams) -> tuple[pd.DataFrame, list]:
    """Read data.manifest, check every row, apply validate.on_bad_rows, write data.prepared.

    Returns the prepared frame and the problems of the rows that were dropped. With on_bad_rows 'fail', any bad
    row stops the stage before anything is written.
    """
    from fusionops.validation import Problem, in_their_names, validate

    raw = read_manifest(data.manifest)
    df = with_other_columns(to_canonical(raw, data, source=data.manifest), raw, data)
    report = validate(df, data.images_root, mode="rows", max_pixels=checks.max_image_pixels,
                      separator=data.separator, columns=data.columns)
    if report.table_problems or (report.problems and checks.on_bad_rows == "fail"):
        hint = "" if report.table_problems else "\n(or set validate.on_bad_rows: skip to drop bad rows and go on)"
        every = (f"`fusionops validate --manifest {data.manifest} --images-root {data.images_root} --report "
                 "validation.json` lists them all")
        raise DataError(f"{data.manifest}: {report.summary(rest=every)}{hint}\nnothing was written")
    rejected = report.problems
    if rejected:
        log.warning("skipping %d bad row(s) (validate.on_bad_rows: skip), listed in %s",
                    len(report.bad_rows), checks.rejected)
        df = df[~df["item_id"].isin(report.bad_rows)].reset_index(drop=True)
    # Rows of labels too rare to split are listed too: every raw row is either prepared or rejected, with a reason.
    # (Multi-label: the rows whose every tag is too rare; the others only lose their rare tags.)
    rare = rare_labels(df, split, data.separator)
    kept = set(without_rare(df, rare, data.separator)["item_id"])
    rejected += in_their_names([
        Problem(str(i), "label", f"{', '.join(f'label {t!r} has {rare[t]} group(s)' for t in tags)}, fewer than "
                f"split.min_groups_per_label={split.min_groups_per_label}: not trained on",
                "add items of this label (other groups), or lower split.min_groups_per_label")
        for i, label in zip(df["item_id"], df["label"], strict=True) if i not in kept
        for tags in [[t for t in split_tags(label, data.separator) if t in rare.index]]], data.columns)
    if not kept:
        why = ("it has no rows" if report.rows == 0 else
               f"none of its {report.rows} rows is left ({len(report.bad_rows)} bad, the others of labels with fewer "
               f"than split.min_groups_per_label={split.min_groups_per_label} groups)")
        raise DataError(f"{data.manifest}: nothing to train on, {why}: add items or lower "
                        "split.min_groups_per_label; nothing was written")
    df = split_manifest(df, split, data.separator)
    _write_csv(pd.DataFrame([vars(p) for p in rejected], columns=["item_id", "column", "problem", "fix"]),
               checks.rejected)
    _write_csv(df, data.prepared)
    return df, rejected


def with_other_columns(df: pd.DataFrame, raw: pd.DataFrame, data: DataParams) -> pd.DataFrame:
    """The canonical manifest with the raw manifest's other columns after it, row for row, so that later stages can
    use them (evaluate.breakdown); the mapped columns, and any named like a canonical column or `split`, are not
    repeated."""
    mapped = {data.id_column, data.image_column, data.text_column, data.label_column, data.group_column}
    others = [c for c in raw.columns if c not in mapped | set(df.columns) | {"split"}]
    return pd.concat([df, raw[others].reset_index(drop=True)], axis=1)


def _write_csv(df: pd.DataFrame, path: Path) -> None:
    with atomic_path(path) as tmp:
        df.to_csv(tmp, index=False)
