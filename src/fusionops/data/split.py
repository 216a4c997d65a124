"""Stable grouped split: an item's split depends only on its group key, never on what else is in the data."""

from __future__ import annotations

import hashlib

import numpy as np
import pandas as pd

SPLITS = ("train", "val", "test")


def group_fraction(key: str, salt: str) -> float:
    """Map a group key to a number in [0, 1), uniformly and reproducibly on every machine."""
    digest = hashlib.sha256(f"{salt}\x00{key}".encode()).digest()
    return int.from_bytes(digest[:8], "big") / 2**64


def assign_splits(groups: pd.Series, *, train: float, val: float, salt: str) -> pd.Series:
    """Return 'train', 'val' or 'test' for every row; all rows of a group get the same split.

    Hashing the group key (not shuffling the rows) is what keeps the split stable: adding or removing items never
    moves an existing item to another split, so a frozen test set stays frozen across data versions.
    """
    fractions = groups.map(lambda key: group_fraction(str(key), salt)).to_numpy(dtype=float)
    labels = np.select([fractions < train, fractions < train + val], ["train", "val"], default="test")
    return pd.Series(labels, index=groups.index, name="split")
