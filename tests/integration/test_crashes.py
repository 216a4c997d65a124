"""Killed runs resume to the same result, concurrent runs never corrupt the cache, a dead server is a clear error."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import yaml

pytestmark = pytest.mark.integration

ROOT = Path(__file__).resolve().parents[2]
FUSIONOPS = str(Path(sys.executable).with_name("fusionops"))


def run(*args: str, cwd: Path, env: dict | None = None, check: bool = True) -> subprocess.CompletedProcess:
    result = subprocess.run([FUSIONOPS, *args], cwd=cwd, capture_output=True, text=True, timeout=600,
                            env={**os.environ, **(env or {})})
    if check:
        assert result.returncode == 0, f"fusionops {' '.join(args)}:\n{result.stdout}\n{result.stderr}"
    return result


def write_params(project: Path, name: str, **sections) -> Path:
    params = yaml.safe_load((ROOT / "params.yaml").read_text())
    for section, values in sections.items():
        params[section].update(values)
    path = project / name
    path.write_text(yaml.safe_dump(params, sort_keys=False))
    return path


def kill_when(proc: subprocess.Popen, ready, timeout: float = 120) -> None:
    """SIGKILL `proc` as soon as `ready()` is true; fail if it finished first (nothing was interrupted)."""
    deadline = time.time() + timeout
    while not ready():
        assert proc.poll() is None, f"finished before it could be killed:\n{proc.communicate()[1][-2000:]}"
        assert time.time() < deadline, "never reached the point to kill it"
        time.sleep(0.02)
    proc.send_signal(signal.SIGKILL)
    assert proc.wait(timeout=30) == -signal.SIGKILL


@pytest.fixture(scope="module")
def project(tmp_path_factory, demo_manifest):
    """600 real items; fp32 on purpose: slow enough to be killed mid-way, and bitwise reproducible."""
    from helpers import take_slice, write_dataset

    root = tmp_path_factory.mktemp("crash")
    write_dataset(take_slice(demo_manifest, 75), root / "data/raw")
    features = {"precision": "fp32", "num_workers": 0, "batch_size": 16, "shard_size": 64}
    train = {"max_epochs": 150, "patience": 150}
    write_params(root, "params.yaml", features=features, train=train)
    write_params(root, "reference.yaml", features={**features, "cache_dir": ".cache/reference",
                                                   "out_dir": "data/reference-features"},
                 train={**train, "out_dir": "reference-models", "history": "reports/reference-history",
                        "checkpoint_dir": ".cache/reference-checkpoints"})
    run("prepare", cwd=root)
    # Uninterrupted, into their own cache and folders. How many distinct images it computed is what a resumed run
    # must add up to.
    out = run("features", "--params", "reference.yaml", cwd=root).stdout
    return root, computed_images(out)


def computed_images(stdout: str) -> int:
    return int(" ".join(stdout.split()).split("image: 600 items, ")[1].split(" computed")[0])


def image_shards(project: Path) -> list[Path]:
    return list((project / ".cache/features").glob("tf_efficientnet_lite0-*/shard-*.npz"))


def test_killed_feature_extraction_resumes_to_identical_vectors(project):
    project, distinct = project
    proc = subprocess.Popen([FUSIONOPS, "features"], cwd=project, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True)
    kill_when(proc, lambda: len(image_shards(project)) >= 3)
    kept = 0
    for shard in image_shards(project):
        with np.load(shard) as z:
            kept += len(z["keys"])
    assert not (project / "data/features/meta.json").exists()  # killed before writing its outputs
    resumed = run("features", cwd=project).stdout
    assert computed_images(resumed) == distinct - kept  # finished shards were kept, only the rest was computed
    for name in ("image.npy", "text.npy"):
        np.testing.assert_array_equal(np.load(project / "data/features" / name),
                                      np.load(project / "data/reference-features" / name))
    assert not list((project / ".cache/features").rglob("*.tmp"))  # no half-written shard was left behind


def test_killed_training_resumes_to_identical_models(project):
    project, _ = project
    if not (project / "data/features/meta.json").exists():
        run("features", cwd=project)
    run("train", "--params", "reference.yaml", cwd=project)

    proc = subprocess.Popen([FUSIONOPS, "train"], cwd=project, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True)
    checkpoint = project / ".cache/checkpoints"
    kill_when(proc, lambda: any(checkpoint.glob("*/fusion.pt")) and time.sleep(0.5) is None)
    assert not (project / "models/ablations/text_only").exists()  # the last variant was never saved
    resumed = run("train", cwd=project)
    assert "resuming from the checkpoint" in resumed.stderr
    for variant in ("fusion", "ablations/image_only", "ablations/text_only"):
        assert (project / "models" / variant / "model.safetensors").read_bytes() == \
            (project / "reference-models" / variant / "model.safetensors").read_bytes(), variant
    assert not any(checkpoint.iterdir())  # finished: the checkpoints are gone


def test_restart_discards_a_killed_runs_checkpoint(project):
    project, _ = project
    if not (project / "reference-models/fusion").exists():
        run("features", cwd=project)
        run("train", "--params", "reference.yaml", cwd=project)
    (project / "models/fusion/model.safetensors").unlink(missing_ok=True)
    proc = subprocess.Popen([FUSIONOPS, "train"], cwd=project, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True)
    checkpoint = project / ".cache/checkpoints"
    kill_when(proc, lambda: any(checkpoint.glob("*/fusion.pt")))
    restarted = run("train", "--restart", cwd=project)
    assert "discarding the checkpoints" in restarted.stderr
    assert "resuming from the checkpoint" not in restarted.stderr
    assert "best epoch" in restarted.stdout
    assert (project / "models/fusion/model.safetensors").read_bytes() == \
        (project / "reference-models/fusion/model.safetensors").read_bytes()  # the same seed, from the start
    assert not any(checkpoint.iterdir())


def test_killed_text_finetuning_resumes_to_identical_models(project):
    """train.text_encoder: finetune, killed while the encoder tunes: the resumed run ends with the same encoder and
    heads, byte for byte, as an uninterrupted one."""
    project, _ = project
    if not (project / "data/features/meta.json").exists():
        run("features", cwd=project)
    tuning = {"text_encoder": "finetune", "max_epochs": 20, "patience": 20,
              "text_finetune": {"max_epochs": 4, "patience": 4, "layers": 1, "batch_texts": 16}}
    write_params(project, "tuned.yaml", features={"precision": "fp32", "num_workers": 0, "batch_size": 16},
                 train={**tuning, "out_dir": "tuned-models", "checkpoint_dir": ".cache/tuned-checkpoints"})
    write_params(project, "tuned-reference.yaml", features={"precision": "fp32", "num_workers": 0, "batch_size": 16},
                 train={**tuning, "out_dir": "tuned-reference", "checkpoint_dir": ".cache/tuned-reference-checkpoints",
                        "history": "reports/tuned-reference-history"})
    run("train", "--params", "tuned-reference.yaml", cwd=project)

    proc = subprocess.Popen([FUSIONOPS, "train", "--params", "tuned.yaml"], cwd=project, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    checkpoint = project / ".cache/tuned-checkpoints"
    kill_when(proc, lambda: any(checkpoint.glob("*/text_only.pt")))  # after the first epoch of the encoder
    assert not list(checkpoint.glob("*/text_encoder"))  # killed while it was tuning
    resumed = run("train", "--params", "tuned.yaml", cwd=project)
    assert "resuming from the checkpoint" in resumed.stderr
    for path in ("fusion/model.safetensors", "fusion/text_encoder/model.safetensors",
                 "ablations/text_only/model.safetensors", "ablations/image_only/model.safetensors"):
        assert (project / "tuned-models" / path).read_bytes() == (project / "tuned-reference" / path).read_bytes(), \
            path


def test_two_extractions_at_once_share_the_cache(project, tmp_path):
    project, distinct = project
    cache = tmp_path / "shared-cache"
    paths = [write_params(project, f"concurrent-{i}.yaml", features={
        "cache_dir": str(cache), "out_dir": str(tmp_path / f"out-{i}"), "precision": "bf16", "num_workers": 0,
        "shard_size": 64}) for i in (0, 1)]
    procs = [subprocess.Popen([FUSIONOPS, "features", "--params", str(p)], cwd=project, stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, text=True) for p in paths]
    outputs = [p.communicate(timeout=600) for p in procs]
    assert [p.returncode for p in procs] == [0, 0], outputs
    computed = [computed_images(out) for out, _ in outputs]
    assert sorted(computed) == [0, distinct], outputs  # one computed everything, the other waited and reused it
    for name in ("image.npy", "text.npy"):
        np.testing.assert_array_equal(np.load(tmp_path / "out-0" / name), np.load(tmp_path / "out-1" / name))
    from fusionops.features.cache import VectorCache

    space = next(cache.glob("tf_efficientnet_lite0-*"))
    assert len(VectorCache(cache, space.name, dim=1280)) == distinct


def test_unreachable_tracking_server_is_a_clear_error(project):
    project, _ = project
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]  # nothing listens there once the socket is closed
    start = time.time()
    result = run("promote", cwd=project, env={"MLFLOW_TRACKING_URI": f"http://127.0.0.1:{port}"}, check=False)
    assert result.returncode == 1
    assert "does not answer" in result.stderr and "Traceback" not in result.stderr
    assert "Retrying" not in result.stderr, result.stderr  # the one error, not a warning per retry before it
    assert time.time() - start < 60  # bounded retries, not MLflow's default minutes


_HOLD_LOCK = """
import sys, time
from filelock import FileLock
with FileLock(sys.argv[1]):
    print("held", flush=True)
    time.sleep(float(sys.argv[2]))
"""


def test_second_pipeline_run_waits_for_the_first(prefect_harness, tmp_path):
    """The flow's per-project lock: while another run holds it, a run waits (and says so) instead of colliding."""
    from prefect import flow

    from fusionops.locks import project_lock

    lock = tmp_path / ".cache" / "pipeline.lock"
    lock.parent.mkdir()
    holder = subprocess.Popen([sys.executable, "-c", _HOLD_LOCK, str(lock), "4"], stdout=subprocess.PIPE, text=True)
    assert holder.stdout.readline().strip() == "held"

    @flow
    def second_run() -> float:
        start = time.time()
        with project_lock(tmp_path):
            return time.time() - start

    waited = second_run()
    holder.wait(timeout=30)
    assert waited > 2  # it waited for the first run to let go, rather than running beside it
