"""The prepare stage: raw manifest in, canonical manifest with a stable grouped `split` column out."""

from __future__ import annotations

import logging

import pandas as pd

from fusionops.atomic import atomic_path
from fusionops.config import DataParams, SplitParams
from fusionops.data.manifest import read_manifest, to_canonical
from fusionops.data.split import assign_splits

log = logging.getLogger(__name__)


def prepare_manifest(raw: pd.DataFrame, data: DataParams, split: SplitParams) -> pd.DataFrame:
    """Canonical columns, rare labels dropped, and a split per row (train/val/test by hashed group)."""
    df = to_canonical(raw, data, source=data.manifest)
    # A row without a group key is its own group: it can never leak into another split through a shared key.
    df["group"] = df["group"].where(df["group"].str.strip() != "", df["item_id"])
    groups_per_label = df.groupby("label")["group"].nunique()
    rare = groups_per_label[groups_per_label < split.min_groups_per_label]
    if len(rare):
        log.warning(
            "dropping %d label(s) with fewer than %d groups (split.min_groups_per_label): %s",
            len(rare), split.min_groups_per_label, ", ".join(map(str, rare.index)),
        )
        df = df[~df["label"].isin(rare.index)].reset_index(drop=True)
    df["split"] = assign_splits(df["group"], train=split.train, val=split.val, salt=split.salt)
    return df


def prepare(data: DataParams, split: SplitParams) -> pd.DataFrame:
    """Read data.manifest, write data.prepared; return the prepared frame."""
    df = prepare_manifest(read_manifest(data.manifest), data, split)
    with atomic_path(data.prepared) as tmp:
        df.to_csv(tmp, index=False)
    return df
