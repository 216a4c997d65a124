"""What every bench script shares: its command line (--json, --params) and how it prints its result."""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import time
from pathlib import Path


def parser(doc: str) -> argparse.ArgumentParser:
    """The script's parser, described by its docstring's first line, with --json and --params."""
    p = argparse.ArgumentParser(description=doc.splitlines()[0])
    p.add_argument("--json", action="store_true", help="print only the JSON result")
    p.add_argument("--params", type=Path, default=None, help="params.yaml [default: the nearest, here or above]")
    return p


def trained_on(params_path: Path | None):
    """What `dvc repro` left for the benches that train heads: the params, the prepared manifest, its cached vectors
    and the label task."""
    from fusionops.config import load_params
    from fusionops.data.manifest import read_manifest
    from fusionops.features import load_features
    from fusionops.labels import LabelTask
    from fusionops.train import training_labels

    params = load_params(params_path)
    prepared = read_manifest(params.data.prepared)
    features = load_features(params.features.out_dir)
    task = LabelTask(training_labels(prepared, params.data.separator), separator=params.data.separator)
    return params, prepared, features, task


def train_overrides(pairs: list[str]) -> dict:
    """--train KEY=VALUE pairs as train.* updates (values read as YAML: 0.8, finetune, true)."""
    import yaml

    out = {}
    for pair in pairs:
        key, _, value = pair.partition("=")
        out[key] = yaml.safe_load(value)
    return out


def mean(rows: list[dict]) -> dict:
    """Accuracy and macro-F1 averaged over runs (seeds)."""
    from statistics import fmean

    return {k: round(fmean(r[k] for r in rows), 4) for k in ("accuracy", "macro_f1")}


def cpu_model() -> str:
    """The CPU's model name (figures from different CPU kinds are not comparable)."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def measured_with() -> dict:
    """Where a result comes from: the command, the date, the commit (and whether the tree was clean), the CPU, the
    load while it ran."""
    def git(*args: str) -> str:
        done = subprocess.run(["git", *args], capture_output=True, text=True, cwd=Path(__file__).parent)
        return done.stdout.strip() if done.returncode == 0 else ""

    return {"command": "python " + " ".join([f"bench/{Path(sys.argv[0]).name}", *sys.argv[1:]]),
            "date": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
            "commit": git("rev-parse", "--short", "HEAD"), "dirty": bool(git("status", "--porcelain", "--", "src")),
            "cpu": cpu_model(), "cores": os.cpu_count(), "loadavg": [round(x, 2) for x in os.getloadavg()]}


def report(result: dict, *, json_only: bool) -> None:
    """One line per figure unless --json, then the result as one JSON object: always the last line. With --json
    the result is kept, with where it comes from, as reports/bench/<script>.json (what the docs cite)."""
    if not json_only:
        for key, value in result.items():
            print(f"{key:>24}: {value}")
    if json_only:
        from fusionops.atomic import write_json

        kept = {"measured_with": measured_with(), **result}
        write_json(Path(__file__).parent.parent / "reports" / "bench" / f"{Path(sys.argv[0]).stem}.json", kept)
    print(json.dumps(result))
