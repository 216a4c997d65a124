"""Validation: a Great Expectations suite on a manifest, checks of every image file, and dataset or batch rules.

Everything found is reported at once, each problem naming the row, the column and what to do, so one run of
`fusionops validate` is enough to fix a dataset. Three scopes:

- rows: the suite (required columns, unique ids, nothing empty) and every image (inside the images root, a real
  image file that decodes, not a decompression bomb). `prepare` applies validate.on_bad_rows to these.
- dataset: rows + what training needs (train/val/test splits, enough training items per label).
- batch: rows + every label is one the current dataset knows and every id is new to it (new data for an existing
  model; no minimum count).
"""

from __future__ import annotations

import io
import logging
import os
import warnings
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Literal

import pandas as pd
from PIL import Image, UnidentifiedImageError

from fusionops.atomic import write_json
from fusionops.data.split import SPLITS
from fusionops.errors import DataError
from fusionops.labels import explode, split_tags

Mode = Literal["rows", "dataset", "batch"]
ROW_COLUMNS = ("item_id", "image", "text", "label")


@dataclass
class Problem:
    item_id: str | None
    column: str
    problem: str
    fix: str

    def __str__(self) -> str:
        where = f"row {self.item_id!r}" if self.item_id is not None else "manifest"
        return f"{where}, column {self.column}: {self.problem} -> {self.fix}"


@dataclass
class Report:
    rows: int
    mode: str = "dataset"
    expectations: list[dict] = field(default_factory=list)
    problems: list[Problem] = field(default_factory=list)

    @property
    def success(self) -> bool:
        return not self.problems

    @property
    def bad_rows(self) -> set[str]:
        return {p.item_id for p in self.problems if p.item_id is not None}

    @property
    def table_problems(self) -> list[Problem]:
        """Problems no row can be blamed for (a missing column, an empty split): skipping rows cannot fix them."""
        return [p for p in self.problems if p.item_id is None]

    def to_dict(self) -> dict:
        return {
            "success": self.success,
            "mode": self.mode,
            "rows": self.rows,
            "problem_count": len(self.problems),
            "expectations": self.expectations,
            "problems": [asdict(p) for p in self.problems],
        }

    def summary(self, limit: int = 50, rest: str = "see the JSON report") -> str:
        """One line per problem, at most `limit`; `rest`: where the others are listed."""
        if self.success:
            return (f"validation passed ({self.mode}): {self.rows} rows, {len(self.expectations)} expectations met, "
                    "every image decodes")
        lines = [f"validation failed ({self.mode}): {len(self.problems)} problem(s) in {self.rows} rows"]
        lines += [f"  {p}" for p in self.problems[:limit]]
        if len(self.problems) > limit:
            lines.append(f"  ... and {len(self.problems) - limit} more ({rest})")
        return "\n".join(lines)


# What to tell a person for each failed expectation: (problem, fix).
_ADVICE = {
    "expect_column_to_exist": ("column is missing", "add the column to the manifest or map it in params.yaml data.*"),
    "expect_column_values_to_be_unique": ("id is not unique", "give every row its own id"),
    "expect_column_values_to_not_match_regex": ("value is empty", "fill it in or remove the row"),
    "expect_column_values_to_be_in_set": ("value not allowed", "re-run `fusionops prepare`"),
}


def _suite(columns: set[str], required: tuple[str, ...]):
    """The manifest suite; value checks only on columns that exist (a missing column is reported once)."""
    import great_expectations as gx
    import great_expectations.expectations as gxe

    expectations = [gxe.ExpectColumnToExist(column=col) for col in required]
    if "item_id" in columns:
        expectations.append(gxe.ExpectColumnValuesToBeUnique(column="item_id"))
    expectations += [gxe.ExpectColumnValuesToNotMatchRegex(column=col, regex=r"^\s*$")
                     for col in ROW_COLUMNS if col in columns]
    if "split" in columns:
        expectations.append(gxe.ExpectColumnValuesToBeInSet(column="split", value_set=list(SPLITS)))
    return gx.ExpectationSuite(name="manifest", expectations=expectations)


def run_expectations(df: pd.DataFrame, required: tuple[str, ...] = ROW_COLUMNS) -> tuple[list[dict], list[Problem]]:
    """Run the Great Expectations suite on the manifest (ephemeral context, nothing written to disk)."""
    import great_expectations as gx  # ~5 s to import: only validation pays for it
    from great_expectations.data_context.types.base import ProgressBarsConfig

    # GX sets INFO on some of its loggers at import ("Created temporary directory ... for ephemeral docs site").
    for name in list(logging.root.manager.loggerDict):
        if name.startswith("great_expectations"):
            logging.getLogger(name).setLevel(logging.WARNING)
    context = gx.get_context(mode="ephemeral")
    context.variables.progress_bars = ProgressBarsConfig(globally=False)
    batch = (
        context.data_sources.add_pandas("manifest")
        .add_dataframe_asset("manifest")
        .add_batch_definition_whole_dataframe("whole")
        .get_batch(batch_parameters={"dataframe": df})
    )
    result_format = {"result_format": "COMPLETE"}
    if "item_id" in df.columns:
        result_format["unexpected_index_column_names"] = ["item_id"]
    results = batch.validate(_suite(set(df.columns), required), result_format=result_format)

    summary, problems = [], []
    for r in results.results:
        kind, column = r.expectation_config.type, r.expectation_config.kwargs.get("column")
        unexpected = r.result.get("unexpected_index_list") or []
        summary.append({"expectation": kind, "column": column, "success": bool(r.success),
                        "unexpected_count": r.result.get("unexpected_count", 0)})
        if r.success:
            continue
        problem, fix = _ADVICE.get(kind, (kind, "see the expectation in the report"))
        if not unexpected:  # a table-level failure (a missing column): there is no row to name
            problems.append(Problem(None, column, problem, fix))
        for row in unexpected:
            value = row.get(column)
            detail = f"{problem} ({value!r})" if value is not None and column != "item_id" else problem
            problems.append(Problem(str(row.get("item_id")), column, detail, fix))
    return summary, problems


def check_splits(df: pd.DataFrame) -> list[Problem]:
    """Training needs a train and a val split, evaluation a test split."""
    present = set(df["split"])
    return [Problem(None, "split", f"the {split} split has no items",
                    "add data, or change split.train / split.val in params.yaml")
            for split in SPLITS if split not in present]


def check_label_counts(df: pd.DataFrame, min_train_items: int, separator: str | None = None) -> list[Problem]:
    """Every label (multi-label: every tag) must have enough training items to be learnt; name the rows of those
    that do not."""
    df = explode(df, separator)
    train_counts = df[df["split"] == "train"].groupby("label").size()
    problems = []
    for label, rows in df.groupby("label"):
        n = int(train_counts.get(label, 0))
        if n < min_train_items:
            ids = ", ".join(map(str, rows["item_id"].head(5))) + (", ..." if len(rows) > 5 else "")
            problems.append(Problem(
                str(rows["item_id"].iloc[0]), "label",
                f"label {label!r} has {n} training item(s), fewer than validate.min_train_items_per_label="
                f"{min_train_items} (rows: {ids})",
                "add items with this label, or raise split.min_groups_per_label to drop rare labels",
            ))
    return problems


def check_known_labels(df: pd.DataFrame, known: set[str], separator: str | None = None) -> list[Problem]:
    """Batch mode: a new batch may only use labels (tags) the dataset (and so the model) already knows."""
    return [Problem(str(item_id), "label", f"unknown label {tag!r} (the dataset has {len(known)} labels)",
                    "use one of the dataset's labels; a new label needs a dataset change, not a batch")
            for item_id, label in zip(df["item_id"], df["label"], strict=True) if str(label).strip()
            for tag in split_tags(label, separator) if tag not in known]


def check_tag_lists(df: pd.DataFrame, separator: str) -> list[Problem]:
    """Multi-label: a label cell must name at least one tag ('|' alone names none)."""
    return [Problem(str(item_id), "label", f"no tag in {label!r}",
                    f"list the item's tags separated by {separator!r} (data.label_separator)")
            for item_id, label in zip(df["item_id"], df["label"], strict=True)
            if str(label).strip() and not split_tags(label, separator)]


def check_image(images_root: Path, relpath: str, *, max_pixels: int = 50_000_000) -> tuple[str, str] | None:
    """(problem, fix) when the file cannot be used as an image, None when it is a readable image in the root."""
    root = Path(images_root).resolve()
    if Path(relpath).is_absolute():
        return f"absolute path {relpath!r}", "give the path relative to the images root"
    path = (root / relpath).resolve()  # resolves '..' and symlinks: what is read must be inside the root
    if not path.is_relative_to(root):
        return f"path {relpath!r} leads outside the images root {root}", "move the file under the images root"
    if path.is_dir():
        return f"{path} is a folder, not an image file", "fix the path"
    if not path.is_file():
        return f"file {path} not found", "add the file or fix the path"
    if path.stat().st_size == 0:
        return f"file {path} is empty (0 bytes)", "replace it with the real image"
    return decode_problem(path, max_pixels=max_pixels)


def decode_problem(source: Path | bytes, *, max_pixels: int | None = 50_000_000) -> tuple[str, str] | None:
    """(problem, fix) when an image file (or its bytes) does not decode safely, None when it does.
    `max_pixels` None: no limit of ours (Pillow's own decompression-bomb limit still holds)."""
    name = f"image {source}" if isinstance(source, Path) else f"image bytes ({len(source)} B)"
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            with Image.open(source if isinstance(source, Path) else io.BytesIO(source)) as img:
                width, height = img.size  # read from the header, before any pixel is decoded
                if max_pixels is not None and width * height > max_pixels:
                    return (f"{name} declares {width}x{height} pixels, over validate.max_image_pixels="
                            f"{max_pixels} (a decompression bomb or a mistake)", "resize it or remove the row")
                img.load()
    except FileNotFoundError:
        return f"file {source} not found", "add the file or fix the path"
    except UnidentifiedImageError:
        return f"{name} is not an image (unknown format)", "replace it with a PNG/JPEG/WebP... image"
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as err:
        return f"{name} is too large to decode safely ({err})", "resize it or remove the row"
    except Exception as err:  # noqa: BLE001 - PIL raises many types for damaged files; name what it said
        if isinstance(source, Path) and (source.is_dir() or not os.access(source, os.R_OK)):
            return f"{source} cannot be read ({type(err).__name__}: {err})", "give a readable image file"
        return f"{name} is damaged ({type(err).__name__}: {err})", "re-export or replace the file"
    return None


def check_images(df: pd.DataFrame, images_root: Path, *, max_pixels: int = 50_000_000,
                 empty: bool = False) -> list[Problem]:
    """Every image of the manifest; `empty`: report empty paths too (the suite does, where it runs). A missing
    images root is one error, not one problem per row."""
    if not Path(images_root).is_dir() and any(str(p).strip() for p in df["image"]):
        raise DataError(f"images root {Path(images_root).absolute()} is not a folder: the manifest's image paths are "
                        "relative to it (--images-root, or data.images_root in params.yaml)")
    problems = []
    for item_id, relpath in zip(df["item_id"], df["image"], strict=True):
        if not str(relpath).strip():
            if empty:
                problems.append(Problem(str(item_id), "image", "no image path", "give the image's path"))
            continue
        found = check_image(images_root, str(relpath), max_pixels=max_pixels)
        if found:
            problems.append(Problem(str(item_id), "image", *found))
    return problems


def in_their_names(problems: list[Problem], columns: dict[str, str] | None) -> list[Problem]:
    """The problems with each column named as the manifest names it (`columns`: DataParams.columns)."""
    if columns:
        for p in problems:
            p.column = ", ".join(columns.get(c, c) for c in p.column.split(", "))
    return problems


def validate(df: pd.DataFrame, images_root: Path, *, mode: Mode = "dataset", min_train_items_per_label: int = 1,
             known_labels: set[str] | None = None, known_ids: set[str] | None = None, max_pixels: int = 50_000_000,
             split=None, separator: str | None = None, columns: dict[str, str] | None = None) -> Report:
    """Run every check of `mode` on a canonical manifest and return one report with all problems found.

    In dataset mode a manifest without a `split` column is split as `prepare` would (`split`: SplitParams), after
    the row checks: every row is checked, including rows whose label prepare would drop as too rare.
    `separator`: multi-label mode (data.separator): label cells are tag lists, counted and checked per tag.
    Batch mode: `known_labels` (required) and `known_ids` (when given) are the current dataset's.
    `columns` (DataParams.columns): the problems name the manifest's own columns.
    """
    report = _validate(df, images_root, mode=mode, min_train_items_per_label=min_train_items_per_label,
                       known_labels=known_labels, known_ids=known_ids, max_pixels=max_pixels, split=split,
                       separator=separator)
    in_their_names(report.problems, columns)
    for expectation in report.expectations if columns else []:
        expectation["column"] = columns.get(expectation["column"], expectation["column"])
    return report


def _validate(df: pd.DataFrame, images_root: Path, *, mode: Mode, min_train_items_per_label: int,
              known_labels: set[str] | None, known_ids: set[str] | None, max_pixels: int, split,
              separator: str | None) -> Report:
    required = ROW_COLUMNS + (("split",) if mode == "dataset" and split is None else ())
    expectations, problems = run_expectations(df, required)
    report = Report(rows=len(df), mode=mode, expectations=expectations, problems=problems)
    if report.table_problems:
        return report  # without the columns there is nothing more to check row by row
    report.problems += check_images(df, images_root, max_pixels=max_pixels)
    if separator is not None:
        report.problems += check_tag_lists(df, separator)
    if mode == "dataset":
        if split is not None:
            from fusionops.data.prepare import split_manifest

            df = split_manifest(df[~df["item_id"].isin(report.bad_rows)], split, separator)
        report.problems += check_splits(df)
        report.problems += check_label_counts(df, min_train_items_per_label, separator)
    elif mode == "batch":
        if known_labels is None:
            raise ValueError("batch mode needs the labels of the current dataset")
        report.problems += check_known_labels(df, known_labels, separator)
        if known_ids is not None:
            report.problems += [Problem(str(i), "item_id", "id already in the dataset", "give new items new ids")
                                for i in df["item_id"] if str(i) in known_ids]
    return report


def write_report(report: Report, path: Path) -> None:
    write_json(path, report.to_dict())
