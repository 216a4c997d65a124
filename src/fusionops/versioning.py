"""Versioning the raw data with DVC, for the commands and flows that change it (ingest, retrain).

The stages never call DVC: DVC calls them. Only adding new data and rebuilding a registered version
(fusionops.reproduce) do, through DVC's own command line.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

from fusionops.config import RemoteParams
from fusionops.errors import UserError


def dvc(*args: str, cwd: Path) -> str:
    """Run a DVC command in the project folder; a failure is a UserError carrying DVC's own message."""
    env = {**os.environ, "DVC_NO_ANALYTICS": "1"}
    result = subprocess.run([sys.executable, "-m", "dvc", *args], cwd=cwd, env=env, capture_output=True, text=True)
    if result.returncode != 0:
        raise UserError(f"`dvc {' '.join(args)}` failed in {cwd}:\n{(result.stderr or result.stdout).strip()}")
    return result.stdout


def configure_remote(root: Path, remote: RemoteParams) -> str | None:
    """Make params.yaml's remote the project's default DVC remote (in .dvc/config, committed with the project, so
    every clone can `dvc pull`). Returns the remote's name, or None when params set none and none is configured."""
    if remote.url is None:  # a default remote configured by hand is used as it is
        result = subprocess.run([sys.executable, "-m", "dvc", "remote", "default"], cwd=root, capture_output=True,
                                text=True, env={**os.environ, "DVC_NO_ANALYTICS": "1"})
        return (result.stdout.strip() or None) if result.returncode == 0 else None  # exit 1: no default remote
    url = str(remote.url)
    configured = dict(line.split(None, 1) for line in dvc("remote", "list", cwd=root).splitlines() if line.strip())
    if configured.get(remote.name, "").split()[0:1] != [url]:
        dvc("remote", "add", "--default", "--force", remote.name, url, cwd=root)
    return remote.name


def version_data(data_dir: Path, root: Path, remote: RemoteParams | None = None) -> dict:
    """`dvc add` the raw data folder, and `dvc push` it when a remote is configured; return what was done."""
    rel = os.path.relpath(data_dir, root)
    dvc("add", "--quiet", rel, cwd=root)
    name = configure_remote(root, remote or RemoteParams())
    if name:
        dvc("push", "--quiet", "--remote", name, f"{rel}.dvc", cwd=root)
    return {"dvc_file": f"{rel}.dvc", "pushed": bool(name), "remote": name}


def stale_stages(root: Path) -> list[str] | None:
    """What `dvc status` finds out of date in the project's pipeline, one line per stage or .dvc file ("train:
    changed deps: params.yaml"); [] when every output is what the current params, code and data make. None when
    there is no pipeline to ask about (no dvc.yaml) or DVC cannot tell."""
    import json

    if not (Path(root) / "dvc.yaml").is_file():
        return None
    try:
        status = json.loads(dvc("status", "--json", cwd=root) or "{}")
    except (UserError, ValueError):
        return None
    lines = []
    for name, changes in status.items():
        said = []
        for change in changes:
            if isinstance(change, dict):
                said += [f"{what}: {', '.join(sorted(paths)) if isinstance(paths, dict) else paths}"
                         for what, paths in change.items()]
            else:
                said.append(str(change))
        lines.append(f"{name}: {'; '.join(said)}")
    return lines
