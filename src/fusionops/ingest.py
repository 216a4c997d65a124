"""New labelled batches: find them in the inbox, check each on its own, append the good ones to the raw data.

A batch is a folder holding a manifest (manifest.csv or manifest.parquet, the same columns as the raw manifest) and
the images it names, by paths relative to the folder. Move a batch into the inbox when it is complete (a rename is
atomic); fusionops never reads a half-copied one. Good batches are appended to the raw data under
`<images_root>/batches/<batch name>/` and archived; a bad batch goes to quarantine with its report, and nothing else
changes.

Every step can be interrupted and run again: images are copied to a temporary folder and renamed into place, the
manifest is replaced atomically, and a batch whose rows are already in the manifest (a run killed before archiving
it) is archived, not ingested twice. Callers hold the project lock (fusionops.locks.project_lock) around it all.
"""

from __future__ import annotations

import logging
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path

import pandas as pd

from fusionops.atomic import atomic_path, write_json
from fusionops.config import Params
from fusionops.data.manifest import read_manifest, to_canonical
from fusionops.errors import DataError, UserError
from fusionops.labels import known_labels
from fusionops.validation import Problem, Report, validate

log = logging.getLogger(__name__)

MANIFEST_NAMES = ("manifest.csv", "manifest.parquet")
BATCHES = "batches"  # sub-folder of the images root that ingested batches are copied into


@dataclass
class Batch:
    name: str
    folder: Path
    manifest: Path
    rows: pd.DataFrame = field(repr=False)  # the batch's manifest as written (its own column names)

    @classmethod
    def read(cls, folder: Path, manifest: Path) -> Batch:
        try:
            rows = read_manifest(manifest)
        except DataError as err:  # an unreadable manifest is a problem of this batch, reported with it
            rows = pd.DataFrame()
            rows.attrs["error"] = str(err)
        return cls(folder.name, folder, manifest, rows)


def batch_in(folder: Path) -> Batch | None:
    """The batch in `folder`, or None when it holds no manifest."""
    manifest = next((folder / n for n in MANIFEST_NAMES if (folder / n).is_file()), None)
    return Batch.read(folder, manifest) if manifest else None


def find_batches(inbox: Path) -> list[Batch]:
    """Every batch folder in the inbox, oldest name first (name batches by date to ingest them in order)."""
    inbox = Path(inbox)
    if not inbox.is_dir():
        return []
    batches = []
    for folder in sorted(p for p in inbox.iterdir() if p.is_dir() and not p.name.startswith(".")):
        batch = batch_in(folder)
        if batch is None:
            log.warning("inbox folder %s holds no manifest.csv or manifest.parquet: left where it is", folder)
            continue
        batches.append(batch)
    return batches


def current_dataset(params: Params) -> pd.DataFrame:
    """The raw dataset as it is now (canonical columns): its labels are the labels a batch may use."""
    return to_canonical(read_manifest(params.data.manifest), params.data, source=params.data.manifest)


def _raw_columns(params: Params) -> list[str]:
    return list(read_manifest(params.data.manifest).columns)


def check_batch(batch: Batch, params: Params, dataset: pd.DataFrame) -> Report:
    """Batch-mode validation, plus: every column of the raw manifest, ids new to the dataset, at least one row."""
    report = Report(rows=len(batch.rows), mode="batch")
    if "error" in batch.rows.attrs:
        report.problems.append(Problem(None, "manifest", batch.rows.attrs["error"], "fix the batch's manifest"))
        return report
    missing = [c for c in _raw_columns(params) if c not in batch.rows.columns]
    if missing:
        report.problems.append(Problem(None, "manifest", f"missing the dataset's column(s) {', '.join(missing)}",
                                       "give the batch every column of the raw manifest"))
        return report
    rows = to_canonical(batch.rows, params.data, source=batch.manifest)
    report = validate(rows, batch.folder, mode="batch", known_labels=known_labels(dataset, params.data.separator),
                      known_ids=set(dataset["item_id"].astype(str)), max_pixels=params.validate_.max_image_pixels,
                      separator=params.data.separator, columns=params.data.columns)
    if rows.empty:
        report.problems.append(Problem(None, "manifest", "the batch has no rows", "add rows or remove the batch"))
    return report


def already_ingested(batch: Batch, params: Params, dataset: pd.DataFrame) -> bool:
    """A run killed after appending a batch but before archiving it: its rows are in the manifest already."""
    if batch.rows.empty or params.data.id_column not in batch.rows.columns:
        return False
    ids = set(batch.rows[params.data.id_column].astype(str))
    return ids <= set(dataset["item_id"]) and (Path(params.data.images_root) / BATCHES / batch.name).is_dir()


def quarantine(batch: Batch, report: Report, quarantine_dir: Path) -> Path:
    """Move a bad batch aside with its report (validation.json inside the moved folder). The report's problems then
    name the files where they are now, in quarantine, not where they were."""
    target = _free_name(Path(quarantine_dir), batch.name)
    shutil.move(str(batch.folder), target)
    before, after = str(Path(batch.folder).resolve()), str(target.resolve())
    for problem in report.problems:
        problem.problem = problem.problem.replace(before, after)
    write_json(target / "validation.json", report.to_dict())
    return target


def _target(params: Params, name: str, manifest: pd.DataFrame) -> Path:
    """Where a batch's images go. A folder left by an interrupted run (no manifest row points into it) is reused."""
    root = Path(params.data.images_root)
    candidate, n = root / BATCHES / name, 1
    while candidate.exists():
        prefix = candidate.relative_to(root).as_posix() + "/"
        if not manifest[params.data.image_column].astype(str).str.startswith(prefix).any():
            shutil.rmtree(candidate)  # an orphan: nothing refers to it
            break
        n += 1
        candidate = root / BATCHES / f"{name}-{n}"
    return candidate


def append_batch(batch: Batch, params: Params) -> tuple[int, Path]:
    """Copy a checked batch's images under the images root and add its rows to the raw manifest: (rows added,
    the folder its images went to).

    The images are copied into a temporary folder renamed into place, then the manifest is replaced atomically:
    whenever the run stops, the manifest never names an image that is not there.
    """
    raw = read_manifest(params.data.manifest)
    root = Path(params.data.images_root)
    target = _target(params, batch.name, raw)
    staging = target.with_name(f".{target.name}.tmp")
    shutil.rmtree(staging, ignore_errors=True)
    for image in batch.rows[params.data.image_column].unique():
        dest = staging / image
        dest.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(batch.folder / image, dest)
    staging.rename(target)
    rows = batch.rows[list(raw.columns)].copy()
    rows[params.data.image_column] = target.relative_to(root).as_posix() + "/" + rows[params.data.image_column]
    merged = pd.concat([raw, rows], ignore_index=True)
    with atomic_path(params.data.manifest) as tmp:
        if Path(params.data.manifest).suffix.lower() == ".csv":
            merged.to_csv(tmp, index=False)
        else:
            merged.to_parquet(tmp, index=False)
    return len(rows), target


def archive(batch: Batch, processed_dir: Path, appended: int) -> Path:
    """Move an ingested batch out of the inbox, with a note of when and how many rows it added."""
    target = _free_name(Path(processed_dir), batch.name)
    shutil.move(str(batch.folder), target)
    write_json(target / "ingested.json", {"ingested": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "rows": appended})
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
    """Split batches into good and bad, each checked against the dataset plus the good batches before it.

    A batch that an interrupted run already appended is archived here (with 0 rows), not checked again.
    """
    dataset = current_dataset(params)
    good, bad = [], []
    for batch in batches:
        if already_ingested(batch, params, dataset):
            log.warning("batch %s was appended by an interrupted run: archiving it", batch.name)
            archive(batch, params.retrain.processed, 0)
            continue
        report = check_batch(batch, params, dataset)
        if report.success:
            good.append(batch)
            added = to_canonical(batch.rows, params.data, source=batch.manifest)
            dataset = pd.concat([dataset, added], ignore_index=True)  # a later batch may not reuse these ids
        else:
            bad.append((batch, report))
    return good, bad


def add_batches(good: list[Batch], params: Params, root: Path) -> dict:
    """Append good batches to the raw data, archive them, and version the data with DVC.

    `dvc add` runs every time (it costs little when nothing changed), so a version an interrupted run left
    unrecorded is recorded now.
    """
    from fusionops.versioning import version_data

    appended, stored, archived = {}, {}, {}
    for batch in good:
        appended[batch.name], stored[batch.name] = append_batch(batch, params)
        archived[batch.name] = archive(batch, params.retrain.processed, appended[batch.name])
    versioned = version_data(Path(params.data.images_root), root, params.remote)
    return {"appended": appended, "rows": sum(appended.values()), "versioned": versioned, "images": stored,
            "archived": archived}


def trained_manifest(params: Params, root: Path) -> Path | None:
    """The prepared manifest the current model was trained from. dvc.lock's train stage names it by hash; when a run
    prepared new data and then failed before training, that older version is read from the DVC cache (when it is no
    longer there, the current one stands in, with a warning). None when nothing was trained yet."""
    import hashlib

    import yaml

    from fusionops.versioning import dvc

    lock, prepared = Path(root) / "dvc.lock", Path(params.data.prepared)
    stages = (yaml.safe_load(lock.read_text()) or {}).get("stages") or {} if lock.is_file() else {}
    deps = (stages.get("train") or {}).get("deps") or []
    entry = next((d for d in deps if (Path(root) / d.get("path", "")).resolve() == prepared.resolve()), None)
    if not entry or "md5" not in entry:
        return None
    if prepared.is_file() and hashlib.md5(prepared.read_bytes()).hexdigest() == entry["md5"]:
        return prepared
    md5 = entry["md5"]
    try:
        cached = Path(dvc("cache", "dir", cwd=root).strip()) / "files" / "md5" / md5[:2] / md5[2:]
    except UserError:
        cached = None
    if entry.get("hash") == "md5" and cached is not None and cached.is_file():
        return cached
    log.warning("the prepared manifest the model was trained from (md5 %s) is not in the DVC cache: counting what "
                "the current one holds as trained on", md5)
    return prepared if prepared.is_file() else None


def pending_items(params: Params, root: Path) -> int:
    """Rows of the raw manifest that the current model was not trained from and the last prepare did not reject:
    added and not trained on yet, whichever night they came in, and also when a run prepared them and then failed."""
    raw_ids = set(current_dataset(params)["item_id"])
    seen = set()
    trained = trained_manifest(params, root)
    if trained is not None:  # prepare writes CSV (a cached version has no suffix for read_manifest to go by)
        seen |= set(pd.read_csv(trained, dtype=str, keep_default_na=False, usecols=["item_id"])["item_id"])
    if Path(params.validate_.rejected).is_file():
        seen |= set(read_manifest(params.validate_.rejected)["item_id"])
    return len(raw_ids - seen)
