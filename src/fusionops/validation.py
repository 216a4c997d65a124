"""The validate stage: a Great Expectations suite on the prepared manifest, plus checks of every image file.

Everything found is reported at once, each problem naming the row, the column and what to do, so one run of
`fusionops validate` is enough to fix a dataset.
"""

from __future__ import annotations

import logging
from dataclasses import asdict, dataclass, field
from pathlib import Path

import pandas as pd
from PIL import Image

from fusionops.atomic import write_json
from fusionops.data.split import SPLITS

REQUIRED_COLUMNS = ("item_id", "image", "text", "label", "split")


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
    expectations: list[dict] = field(default_factory=list)
    problems: list[Problem] = field(default_factory=list)

    @property
    def success(self) -> bool:
        return not self.problems

    def to_dict(self) -> dict:
        return {
            "success": self.success,
            "rows": self.rows,
            "problem_count": len(self.problems),
            "expectations": self.expectations,
            "problems": [asdict(p) for p in self.problems],
        }

    def summary(self, limit: int = 50) -> str:
        if self.success:
            return f"validation passed: {self.rows} rows, {len(self.expectations)} expectations met, images decode"
        lines = [f"validation failed: {len(self.problems)} problem(s) in {self.rows} rows"]
        lines += [f"  {p}" for p in self.problems[:limit]]
        if len(self.problems) > limit:
            lines.append(f"  ... and {len(self.problems) - limit} more (see the JSON report)")
        return "\n".join(lines)


# What to tell a person for each failed expectation: (problem, fix).
_ADVICE = {
    "expect_column_to_exist": ("column is missing", "add the column to the manifest or map it in params.yaml data.*"),
    "expect_column_values_to_be_unique": ("id is not unique", "give every row its own id"),
    "expect_column_values_to_not_match_regex": ("value is empty", "fill it in or remove the row"),
    "expect_column_values_to_be_in_set": ("value not allowed", "re-run `fusionops prepare`"),
}


def _suite(columns: set[str]):
    """The manifest suite; value checks only on columns that exist (a missing column is reported once)."""
    import great_expectations as gx
    import great_expectations.expectations as gxe

    expectations = [gxe.ExpectColumnToExist(column=col) for col in REQUIRED_COLUMNS]
    if "item_id" in columns:
        expectations.append(gxe.ExpectColumnValuesToBeUnique(column="item_id"))
    expectations += [gxe.ExpectColumnValuesToNotMatchRegex(column=col, regex=r"^\s*$")
                     for col in ("item_id", "image", "text", "label") if col in columns]
    if "split" in columns:
        expectations.append(gxe.ExpectColumnValuesToBeInSet(column="split", value_set=list(SPLITS)))
    return gx.ExpectationSuite(name="prepared_manifest", expectations=expectations)


def run_expectations(df: pd.DataFrame) -> tuple[list[dict], list[Problem]]:
    """Run the Great Expectations suite on the manifest (ephemeral context, nothing written to disk)."""
    import great_expectations as gx  # ~5 s to import: only the validate stage pays for it
    from great_expectations.data_context.types.base import ProgressBarsConfig

    # GX sets INFO on some of its loggers at import ("Created temporary directory ... for ephemeral docs site").
    for name in list(logging.root.manager.loggerDict):
        if name.startswith("great_expectations"):
            logging.getLogger(name).setLevel(logging.WARNING)

    context = gx.get_context(mode="ephemeral")
    context.variables.progress_bars = ProgressBarsConfig(globally=False)
    batch = (
        context.data_sources.add_pandas("manifest")
        .add_dataframe_asset("prepared")
        .add_batch_definition_whole_dataframe("whole")
        .get_batch(batch_parameters={"dataframe": df})
    )
    result_format = {"result_format": "COMPLETE"}
    if "item_id" in df.columns:
        result_format["unexpected_index_column_names"] = ["item_id"]
    results = batch.validate(_suite(set(df.columns)), result_format=result_format)

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


def check_label_counts(df: pd.DataFrame, min_train_items: int) -> list[Problem]:
    """Every label must have enough training items to be learnt; name the rows of those that do not."""
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


def check_image(images_root: Path, relpath: str) -> str | None:
    """Return why the image cannot be used, or None when it is a readable image inside the images root."""
    root = images_root.resolve()
    path = (root / relpath).resolve()
    if not path.is_relative_to(root):
        return f"path {relpath!r} points outside the images root {root}"
    if not path.is_file():
        return f"file {path} not found"
    try:
        with Image.open(path) as img:
            img.load()
    except Exception as err:  # PIL raises many types for bad files; the message is what a person needs
        return f"file {path} does not decode as an image ({type(err).__name__}: {err})"
    return None


def check_images(df: pd.DataFrame, images_root: Path) -> list[Problem]:
    problems = []
    for item_id, relpath in zip(df["item_id"], df["image"], strict=True):
        if not str(relpath).strip():
            continue  # an empty path is already reported by the suite
        reason = check_image(images_root, str(relpath))
        if reason:
            problems.append(Problem(str(item_id), "image", reason, "fix or replace the file, or remove the row"))
    return problems


def validate(df: pd.DataFrame, images_root: Path, *, min_train_items_per_label: int) -> Report:
    """Run every check on a prepared manifest and return one report with all problems found."""
    expectations, problems = run_expectations(df)
    report = Report(rows=len(df), expectations=expectations, problems=problems)
    if all(col in df.columns for col in REQUIRED_COLUMNS):
        report.problems += check_splits(df)
        report.problems += check_label_counts(df, min_train_items_per_label)
        report.problems += check_images(df, images_root)
    return report


def write_report(report: Report, path: Path) -> None:
    write_json(path, report.to_dict())
