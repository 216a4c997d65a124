"""Shared fixtures: the offline environment, a small real slice of the demo data, the real encoders."""

from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path

import pandas as pd
import pytest

# Offline and isolated before anything imports prefect, mlflow or transformers: no telemetry, no hub lookups, and a
# Prefect home of the test session's own so tests never touch the user's database.
os.environ.update({
    "HF_HUB_OFFLINE": "1",
    "TRANSFORMERS_OFFLINE": "1",
    "DO_NOT_TRACK": "true",
    "MLFLOW_DISABLE_TELEMETRY": "true",
    "DVC_NO_ANALYTICS": "1",
    "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
    "PREFECT_HOME": tempfile.mkdtemp(prefix="fusionops-prefect-"),
    "MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR": "false",
})
os.environ.pop("MLFLOW_TRACKING_URI", None)

ROOT = Path(__file__).resolve().parents[1]
DEMO = ROOT / "data" / "demo" / "emoji-v1"
SLICE_CATEGORIES = ("Animals & Nature", "Food & Drink", "Travel & Places", "Flags")


@pytest.fixture(scope="session")
def demo_dir() -> Path:
    return DEMO


@pytest.fixture(scope="session")
def demo_manifest() -> pd.DataFrame:
    return pd.read_csv(DEMO / "manifest.csv", dtype=str, keep_default_na=False)


def take_slice(manifest: pd.DataFrame, groups_per_label: int, *, skip_groups: int = 0) -> pd.DataFrame:
    """Both drawings of the first `groups_per_label` emoji (after `skip_groups`) of each slice category."""
    parts = []
    for category in SLICE_CATEGORIES:
        rows = manifest[manifest["category"] == category]
        groups = rows["emoji_id"].drop_duplicates().iloc[skip_groups:skip_groups + groups_per_label]
        parts.append(rows[rows["emoji_id"].isin(groups)])
    return pd.concat(parts, ignore_index=True)


def write_dataset(rows: pd.DataFrame, folder: Path) -> Path:
    """A dataset folder like data/raw: manifest.csv plus the images it names (copied from the demo)."""
    for rel in rows["image"]:
        (folder / rel).parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(DEMO / rel, folder / rel)
    rows.to_csv(folder / "manifest.csv", index=False)
    return folder


@pytest.fixture(scope="session")
def slice_dir(tmp_path_factory, demo_manifest) -> Path:
    """120 real items: 15 emoji x 2 vendors in each of 4 categories."""
    return write_dataset(take_slice(demo_manifest, 15), tmp_path_factory.mktemp("slice"))


@pytest.fixture(scope="session")
def image_encoder():
    from fusionops.config import ImageEncoderParams
    from fusionops.features.image import build_image_encoder

    return build_image_encoder(ImageEncoderParams())


@pytest.fixture(scope="session")
def text_encoder():
    from fusionops.config import TextEncoderParams
    from fusionops.features.text import build_text_encoder

    return build_text_encoder(TextEncoderParams())


@pytest.fixture(scope="session")
def prefect_harness():
    """One Prefect test server for the whole session (it takes ~20 s to start)."""
    from prefect.testing.utilities import prefect_test_harness

    with prefect_test_harness(server_startup_timeout=120):
        yield
