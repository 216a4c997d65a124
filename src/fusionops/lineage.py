"""Where a model came from: the git commit and the DVC version of the data, read from files (no DVC import)."""

from __future__ import annotations

import logging
import os
import re
import subprocess
from pathlib import Path

import yaml

log = logging.getLogger(__name__)


def git_commit(root: Path) -> tuple[str | None, bool]:
    """(commit sha, whether the work tree has uncommitted changes), or (None, False) outside a git repository."""
    try:
        sha = subprocess.run(["git", "rev-parse", "HEAD"], cwd=root, capture_output=True, text=True, check=True)
        status = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=root,
                                capture_output=True, text=True, check=True)
    except (OSError, subprocess.CalledProcessError):
        return None, False
    return sha.stdout.strip(), bool(status.stdout.strip())


def _template_values(root: Path, spec: dict) -> dict:
    """What `${...}` in dvc.yaml is filled from: params.yaml, then the `vars` (files, optionally `file:keys`, and
    inline mappings), as DVC does."""
    values: dict = {}
    sources = (["params.yaml"] if (root / "params.yaml").is_file() else []) + list(spec.get("vars") or [])
    for source in sources:
        if isinstance(source, dict):
            values.update(source)
            continue
        file, _, keys = str(source).partition(":")
        loaded = yaml.safe_load((root / file).read_text()) or {}
        values.update({k: loaded[k] for k in keys.split(",")} if keys else loaded)
    return values


def _fill(text: str, values: dict) -> str:
    """`text` with every `${a.b}` replaced by its value; KeyError when one is not there (`${item}` of foreach)."""
    def value(match: re.Match) -> str:
        found = values
        for key in match.group(1).strip().split("."):
            found = found[key]
        return str(found).lower() if isinstance(found, bool) else str(found)  # as DVC writes them: true, false

    return re.sub(r"(?<!\\)\$\{(.*?)\}", value, text)  # DVC's pattern: \${...} is not a template


def stage_code(root: Path) -> list[str] | None:
    """What the stages of dvc.yaml ran, as paths relative to `root`: dvc.yaml, every stage's deps (templates filled,
    relative to the stage's wdir) and its params files other than params.yaml (logged with every run). None when
    that cannot be told (no readable dvc.yaml, a template that cannot be filled, a dep on the whole project)."""
    root = Path(root)
    try:
        spec = yaml.safe_load((root / "dvc.yaml").read_text())
        values = _template_values(root, spec)
        paths = {"dvc.yaml"}
        for stage in spec["stages"].values():
            stage = stage.get("do", stage)
            wdir = _fill(str(stage.get("wdir", ".")), values)
            files = [_fill(str(dep), values) for dep in stage.get("deps") or []]
            entries = stage.get("params") or []
            files += [_fill(str(f), values) for entry in entries if isinstance(entry, dict) for f in entry]
            files += ["params.yaml"] if any(not isinstance(entry, dict) for entry in entries) else []  # in wdir
            for file in files:
                path = os.path.relpath(os.path.normpath(os.path.join(root, wdir, file)), root)
                if path == ".":
                    return None  # the whole project is a dep: every change counts
                if path != "params.yaml":
                    paths.add(path)
    except (OSError, yaml.YAMLError, KeyError, TypeError, AttributeError, ValueError):
        return None
    return sorted(paths)


def uncommitted_code(root: Path, logged: list[Path]) -> list[str] | None:
    """Tracked files under `root` changed since the last commit that the stages ran (dvc.yaml and its code deps, when
    there is a dvc.yaml), leaving out what a run logs or DVC versions or configures (params.yaml, dvc.lock, *.dvc
    files, .dvc/, .gitignore files, and the `logged` folders such as reports/): the changes a rebuild from the commit
    cannot restore. A changed README or test is not among them. None outside a git repository."""
    try:
        changed = subprocess.run(["git", "diff", "HEAD", "--name-only", "--relative"], cwd=root, capture_output=True,
                                 text=True, check=True).stdout.split("\n")
    except (OSError, subprocess.CalledProcessError):
        return None
    root = Path(root).resolve()
    folders = [Path(f).resolve() for f in logged]
    code = stage_code(root)
    return [path for path in filter(None, changed)
            if path not in ("params.yaml", "dvc.lock") and not path.endswith((".dvc", ".gitignore"))
            and not path.startswith(".dvc/")
            and not any((root / path).resolve().is_relative_to(f) for f in folders)
            and (code is None or any(path == c or path.startswith(f"{c}/") for c in code))]


def data_version(root: Path, data_dir: Path, *, used: bool = True) -> str | None:
    """The DVC hash of `data_dir`: by default the one the stages used (dvc.lock), else the one in its .dvc file.

    dvc.lock comes first for a model's lineage: it records what the pipeline actually read, even when data/raw
    changed since the last `dvc add` (then the two differ, and a warning says so). `used=False` asks for the newest
    version added (the .dvc file), as after an ingest.
    """
    root = Path(root).resolve()
    data_dir = Path(data_dir).resolve()
    rel = data_dir.relative_to(root).as_posix() if data_dir.is_relative_to(root) else str(data_dir)
    in_lock = added = None
    lock = root / "dvc.lock"
    if lock.is_file():
        for stage in ((yaml.safe_load(lock.read_text()) or {}).get("stages") or {}).values():
            for dep in stage.get("deps", []):
                if dep.get("path") == rel:
                    in_lock = dep.get("md5")
    dvc_file = data_dir.with_name(data_dir.name + ".dvc")
    if dvc_file.is_file():
        for out in (yaml.safe_load(dvc_file.read_text()) or {}).get("outs", []):
            if out.get("path") == data_dir.name:
                added = out.get("md5")
    if not used:
        return added or in_lock
    if in_lock and added and in_lock != added:
        log.warning("%s in dvc.lock (%s) is not its latest version in %s (%s): `dvc add %s` / `dvc repro`",
                    rel, in_lock, dvc_file.name, added, rel)
    return in_lock or added
