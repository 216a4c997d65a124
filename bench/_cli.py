"""What every bench script shares: its command line (--json, --params) and how it prints its result."""

from __future__ import annotations

import argparse
import json
from pathlib import Path


def parser(doc: str) -> argparse.ArgumentParser:
    """The script's parser, described by its docstring's first line, with --json and --params."""
    p = argparse.ArgumentParser(description=doc.splitlines()[0])
    p.add_argument("--json", action="store_true", help="print only the JSON result")
    p.add_argument("--params", type=Path, default=Path("params.yaml"))
    return p


def report(result: dict, *, json_only: bool) -> None:
    """One line per figure unless --json, then the result as one JSON object: always the last line."""
    if not json_only:
        for key, value in result.items():
            print(f"{key:>24}: {value}")
    print(json.dumps(result))
