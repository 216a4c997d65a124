"""Read a manifest (CSV or Parquet) and map its columns onto the names fusionops uses inside."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd

from fusionops.config import DataParams
from fusionops.errors import DataError

# Inside fusionops every manifest has these columns, whatever the source calls them.
CANONICAL = ("item_id", "image", "text", "label", "group")


def read_manifest(path: Path) -> pd.DataFrame:
    """Read a CSV or Parquet manifest with every column as a string (ids like '007' stay as written)."""
    path = Path(path)
    if not path.is_file():
        raise DataError(f"manifest {path.absolute()} not found: check the path you passed (or data.manifest in "
                        "params.yaml)")
    suffix = path.suffix.lower()
    try:
        if suffix == ".csv":
            df = pd.read_csv(path, dtype=str, keep_default_na=False, encoding="utf-8")
        elif suffix in (".parquet", ".pq"):
            df = pd.read_parquet(path)
            _refuse_nested(df, path)
            df = df.astype("string").fillna("").astype(str)
        else:
            raise DataError(f"manifest {path}: unsupported format '{suffix}'; use .csv or .parquet")
    except UnicodeDecodeError:
        raise DataError(f"manifest {path} is not valid UTF-8 ({_first_bad_byte(path)}): re-save it as UTF-8") from None
    except (pd.errors.ParserError, pd.errors.EmptyDataError, OSError, ValueError) as err:
        raise DataError(f"manifest {path} could not be read: {err}") from None
    return df


def _refuse_nested(df: pd.DataFrame, path: Path) -> None:
    """A Parquet cell holding a list, an array or a struct would become its text form ("['a', 'b']"): refuse it."""
    for column in [c for c in df.columns if pd.api.types.is_object_dtype(df[c])]:
        nested = df[column].map(lambda v: isinstance(v, list | tuple | dict | set | np.ndarray))
        if nested.any():
            row = int(nested.to_numpy().argmax())
            raise DataError(f"manifest {path}: column {column!r} holds lists or structures (first at row {row + 1}: "
                            f"{str(df[column].iloc[row])[:60]}): give one value per cell (multi-label: tags joined "
                            "by data.label_separator)")


def _first_bad_byte(path: Path) -> str:
    raw = path.read_bytes()
    try:
        raw.decode("utf-8")
    except UnicodeDecodeError as err:  # pandas reports offsets within its read buffer; find the real position
        line = raw[: err.start].count(b"\n") + 1
        return f"line {line}, byte {err.start}"
    return "position unknown"


def to_canonical(df: pd.DataFrame, data: DataParams, *, source: Path | str = "manifest",
                 labelled: bool = True) -> pd.DataFrame:
    """Select and rename the configured columns to item_id, image, text (+ label, group when `labelled`)."""
    mapping = {data.id_column: "item_id", data.image_column: "image", data.text_column: "text"}
    if labelled:
        mapping[data.label_column] = "label"
    needed = list(mapping) + ([data.group_column] if labelled and data.group_column else [])
    missing = [col for col in needed if col not in df.columns]
    if missing:
        raise DataError(
            f"{source}: missing column(s) {', '.join(missing)} (found: {', '.join(map(str, df.columns))}); "
            "fix the file or the data.*_column names in params.yaml"
        )
    out = df[list(mapping)].rename(columns=mapping)
    if labelled:
        out["group"] = df[data.group_column] if data.group_column else out["item_id"]
    return out.reset_index(drop=True)
