"""What every bench script shares: its command line (--json, --params) and how it prints its result."""

from __future__ import annotations

import argparse
import json
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


def report(result: dict, *, json_only: bool) -> None:
    """One line per figure unless --json, then the result as one JSON object: always the last line."""
    if not json_only:
        for key, value in result.items():
            print(f"{key:>24}: {value}")
    print(json.dumps(result))
