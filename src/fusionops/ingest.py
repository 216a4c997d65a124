"""New labelled batches: find them in the inbox, check each on its own, append the good ones to the raw data.

A batch is a folder holding a manifest (manifest.csv or manifest.parquet, the same columns as the raw manifest) and
the images it names, by paths relative to the folder. Move a batch into the inbox when it is complete (a rename is
atomic); fusionops never reads a half-copied one. Good batches are appended to the raw data under
`<images_root>/batches/<batch name>/` and archived; a bad batch goes to quarantine with its report, and nothing else
changes.
"""

from __future__ import annotations

import json
import logging
import shutil
import time
from dataclasses import dataclass
from pathlib import Path

import pandas as pd

from fusionops.atomic import atomic_path, write_json
from fusionops.config import Params
from fusionops.data.manifest import read_manifest, to_canonical
from fusionops.errors import DataError
from fusionops.validation import Problem, Report, validate

log = logging.getLogger(__name__)

MANIFEST_NAMES = ("manifest.csv", "manifest.parquet")
BATCHES = "batches"  # sub-folder of the images root that ingested batches are copied into


@dataclass
class Batch:
    name: str
    folder: Path
    manifest: Path

    @property
    def rows(self) -> pd.DataFrame:
        return read_manifest(self.manifest)


def find_batches(inbox: Path) -> list[Batch]:
    """Every batch folder in the inbox, oldest name first (name batches by date to ingest them in order)."""
    inbox = Path(inbox)
    if not inbox.is_dir():
        return []
    batches = []
    for folder in sorted(p for p in inbox.iterdir() if p.is_dir() and not p.name.startswith(".")):
        manifest = next((folder / n for n in MANIFEST_NAMES if (folder / n).is_file()), None)
        if manifest is None:
            log.warning("inbox folder %s holds no manifest.csv or manifest.parquet: left where it is", folder)
            continue
        batches.append(Batch(folder.name, folder, manifest))
    return batches


def current_dataset(params: Params) -> pd.DataFrame:
    """The raw dataset as it is now (canonical columns)."""
    return to_canonical(read_manifest(params.data.manifest), params.data, source=params.data.manifest)


def check_batch(batch: Batch, params: Params, dataset: pd.DataFrame) -> Report:
    """Batch-mode validation, plus: ids must be new to the dataset and the batch must not be empty."""
    try:
        rows = to_canonical(batch.rows, params.data, source=batch.manifest)
    except DataError as err:
        report = Report(rows=0, mode="batch")
        report.problems.append(Problem(None, "manifest", str(err), "fix the batch's manifest"))
        return report
    report = validate(rows, batch.folder, mode="batch", known_labels=set(dataset["label"]),
                      max_pixels=params.validate_.max_image_pixels)
    if rows.empty:
        report.problems.append(Problem(None, "manifest", "the batch has no rows", "add rows or remove the batch"))
    known = set(dataset["item_id"])
    report.problems += [Problem(str(i), "item_id", "id already in the dataset", "give new items new ids")
                        for i in rows["item_id"] if i in known]
    return report


def quarantine(batch: Batch, report: Report, quarantine_dir: Path) -> Path:
    """Move a bad batch aside with its report (validation.json inside the moved folder)."""
    target = _free_name(Path(quarantine_dir), batch.name)
    shutil.move(str(batch.folder), target)
    write_json(target / "validation.json", report.to_dict())
    log.warning("batch %s quarantined in %s: %d problem(s)", batch.name, target, len(report.problems))
    return target


def append_batch(batch: Batch, params: Params) -> int:
    """Copy a checked batch's images under the images root and add its rows to the raw manifest (atomically)."""
    raw = read_manifest(params.data.manifest)
    rows = batch.rows
    missing = [c for c in raw.columns if c not in rows.columns]
    if missing:
        raise DataError(f"batch {batch.name} lacks the dataset's column(s) {', '.join(missing)}")
    root = Path(params.data.images_root)
    target = _free_name(root / BATCHES, batch.name)
    relative = target.relative_to(root).as_posix()
    for image in rows[params.data.image_column].unique():
        dest = target / image
        dest.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(batch.folder / image, dest)
    rows = rows[list(raw.columns)].copy()
    rows[params.data.image_column] = relative + "/" + rows[params.data.image_column]
    merged = pd.concat([raw, rows], ignore_index=True)
    with atomic_path(params.data.manifest) as tmp:
        if Path(params.data.manifest).suffix.lower() == ".csv":
            merged.to_csv(tmp, index=False)
        else:
            merged.to_parquet(tmp, index=False)
    return len(rows)


def archive(batch: Batch, processed_dir: Path, appended: int) -> Path:
    """Move an ingested batch out of the inbox, with a note of when and how many rows it added."""
    target = _free_name(Path(processed_dir), batch.name)
    shutil.move(str(batch.folder), target)
    (target / "ingested.json").write_text(json.dumps(
        {"ingested": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "rows": appended}, indent=2) + "\n")
    return target


def _free_name(parent: Path, name: str) -> Path:
    """parent/name, or parent/name-2, -3... when a batch of that name was seen before."""
    parent.mkdir(parents=True, exist_ok=True)
    candidate, n = parent / name, 1
    while candidate.exists():
        n += 1
        candidate = parent / f"{name}-{n}"
    return candidate


def check_batches(batches: list[Batch], params: Params) -> tuple[list[Batch], list[tuple[Batch, Report]]]:
    """Split batches into good and bad, each checked against the dataset plus the good batches before it."""
    dataset = current_dataset(params)
    good, bad = [], []
    for batch in batches:
        report = check_batch(batch, params, dataset)
        if report.success:
            good.append(batch)
            added = to_canonical(batch.rows, params.data, source=batch.manifest)
            dataset = pd.concat([dataset, added], ignore_index=True)  # a later batch may not reuse these ids
        else:
            bad.append((batch, report))
    return good, bad


def add_batches(good: list[Batch], params: Params, root: Path) -> dict:
    """Append good batches to the raw data, archive them, and version the new data with DVC."""
    from fusionops.versioning import version_data

    appended = {}
    for batch in good:
        appended[batch.name] = append_batch(batch, params)
        archive(batch, params.retrain.processed, appended[batch.name])
    versioned = version_data(Path(params.data.images_root), root) if appended else None
    return {"appended": appended, "rows": sum(appended.values()), "versioned": versioned}
