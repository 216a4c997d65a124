"""Helpers for building small real datasets from the demo data."""

from __future__ import annotations

import shutil
from pathlib import Path

import pandas as pd

ROOT = Path(__file__).resolve().parents[1]
DEMO = ROOT / "data" / "demo" / "emoji-v1"
SLICE_CATEGORIES = ("Animals & Nature", "Food & Drink", "Travel & Places", "Flags")


def take_slice(manifest: pd.DataFrame, groups_per_label: int, *, skip_groups: int = 0) -> pd.DataFrame:
    """Both drawings of the first `groups_per_label` emoji (after `skip_groups`) of each slice category."""
    parts = []
    for category in SLICE_CATEGORIES:
        rows = manifest[manifest["category"] == category]
        groups = rows["emoji_id"].drop_duplicates().iloc[skip_groups:skip_groups + groups_per_label]
        parts.append(rows[rows["emoji_id"].isin(groups)])
    return pd.concat(parts, ignore_index=True)


def write_dataset(rows: pd.DataFrame, folder: Path) -> Path:
    """A dataset folder like data/raw: manifest.csv plus the images it names (copied from the demo)."""
    for rel in rows["image"]:
        (folder / rel).parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(DEMO / rel, folder / rel)
    rows.to_csv(folder / "manifest.csv", index=False)
    return folder
