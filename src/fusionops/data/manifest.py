"""Read a manifest (CSV or Parquet) and map its columns onto the names fusionops uses inside."""

from __future__ import annotations

import difflib
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
    keys = {"id_column": data.id_column, "image_column": data.image_column, "text_column": data.text_column}
    if labelled:
        keys |= {"label_column": data.label_column} | ({"group_column": data.group_column} if data.group_column else {})
    missing = {key: col for key, col in keys.items() if col not in df.columns}
    if missing:
        init = f"fusionops init --manifest {_typed(source)} --images-root {_typed(data.images_root)}"
        raise DataError(f"{source}: {missing_columns(missing, list(map(str, df.columns)), init)}")
    out = df[list(mapping)].rename(columns=mapping)
    if labelled:
        out["group"] = df[data.group_column] if data.group_column else out["item_id"]
    return out.reset_index(drop=True)


def _typed(path: Path | str) -> str:
    """A path as a person would type it from here."""
    path = Path(path).absolute()
    return str(path.relative_to(Path.cwd())) if path.is_relative_to(Path.cwd()) else str(path)


def missing_columns(missing: dict[str, str], found: list[str], init: str) -> str:
    """What to say about the data.*_column keys naming columns the manifest does not have ({key: name}): each key,
    the column nearest its name, and for the group column that it can be null; `init`: the command that proposes
    them all. When most keys miss, params.yaml is still another dataset's: say that instead."""
    if len(missing) >= 3:
        return (f"params.yaml's data.*_column keys ({', '.join(missing.values())}) are not columns of this manifest "
                f"({', '.join(found)}): they are another dataset's. `{init}` proposes them from your manifest and "
                "writes them into params.yaml")
    said = []
    for key, name in missing.items():
        close = difflib.get_close_matches(name, found, n=1)
        hint = f"did you mean {close[0]!r}?" if close else ""
        if key == "group_column":
            hint = (f"{hint} or " if hint else "") + "set data.group_column: null if items need no grouping"
        said.append(f"data.{key} {name!r} is not a column" + (f" ({hint})" if hint else ""))
    return f"{'; '.join(said)}. The manifest's columns: {', '.join(found)}. Fix params.yaml (`{init}` proposes them)"
