"""Versioning the raw data with DVC, for the commands and flows that change it (ingest, retrain).

The stages never call DVC: DVC calls them. Only adding new data does, through DVC's own command line.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

from fusionops.errors import UserError


def dvc(*args: str, cwd: Path) -> str:
    """Run a DVC command in the project folder; a failure is a UserError carrying DVC's own message."""
    env = {**os.environ, "DVC_NO_ANALYTICS": "1"}
    result = subprocess.run([sys.executable, "-m", "dvc", *args], cwd=cwd, env=env, capture_output=True, text=True)
    if result.returncode != 0:
        raise UserError(f"`dvc {' '.join(args)}` failed in {cwd}:\n{(result.stderr or result.stdout).strip()}")
    return result.stdout


def version_data(data_dir: Path, root: Path) -> dict:
    """`dvc add` the raw data folder, and `dvc push` it when a remote is configured; return what was done."""
    rel = os.path.relpath(data_dir, root)
    dvc("add", "--quiet", rel, cwd=root)
    pushed = bool(dvc("remote", "list", cwd=root).strip())
    if pushed:
        dvc("push", "--quiet", f"{rel}.dvc", cwd=root)
    return {"dvc_file": f"{rel}.dvc", "pushed": pushed}
