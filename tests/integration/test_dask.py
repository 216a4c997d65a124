"""features.executor: dask — the same vectors as the local path, and a killed worker costs nothing but time."""

from __future__ import annotations

import logging
import os
import signal
import threading
import time

import numpy as np
import pytest

from fusionops.config import FeaturesParams
from fusionops.data.manifest import read_manifest
from fusionops.features import extract_features, load_features

pytestmark = pytest.mark.integration


@pytest.fixture(scope="module")
def items(tmp_path_factory, demo_manifest):
    from helpers import take_slice, write_dataset

    folder = write_dataset(take_slice(demo_manifest, 50), tmp_path_factory.mktemp("dask-data"))
    return folder, read_manifest(folder / "manifest.csv")  # 400 real items


def settings(root, name: str, **kw) -> FeaturesParams:
    return FeaturesParams(out_dir=root / f"out-{name}", cache_dir=root / f"cache-{name}", precision="fp32",
                          batch_size=16, shard_size=32, num_workers=0, **kw)


@pytest.fixture(scope="module")
def local(items, tmp_path_factory):
    """The local executor's vectors, computed with the torch threads of a worker of a 2-worker cluster: the same
    shapes and the same thread count give the same bytes (another thread count may round differently)."""
    import torch

    folder, df = items
    root = tmp_path_factory.mktemp("local")
    threads = torch.get_num_threads()
    torch.set_num_threads(max(1, (os.cpu_count() or 1) // 2))  # as local_cluster(2) gives each worker
    try:
        stats = extract_features(df, folder, settings(root, "local"))
    finally:
        torch.set_num_threads(threads)
    return load_features(root / "out-local"), stats


def test_local_cluster_gives_the_local_vectors(items, local, tmp_path):
    folder, df = items
    stats = extract_features(df, folder, settings(tmp_path, "dask", executor="dask", dask_workers=2))
    assert stats["image"]["computed"] == local[1]["image"]["computed"]
    dask = load_features(tmp_path / "out-dask")
    np.testing.assert_array_equal(dask.image, local[0].image)  # same shards, same batches: identical
    again = extract_features(df, folder, settings(tmp_path, "dask", executor="dask", dask_workers=2))
    assert again["image"]["computed"] == 0  # cached: no worker computes anything again


def test_a_killed_worker_still_ends_with_a_complete_cache(items, local, tmp_path):
    from distributed import Client

    from fusionops.features.cache import VectorCache
    from fusionops.features.distributed import local_cluster

    folder, df = items
    before = dict(os.environ)
    with local_cluster(2) as (cluster, _), Client(cluster) as client:  # a cluster reached by its address
        pids = list(client.run(os.getpid).values())
        params = settings(tmp_path, "killed", executor="dask", dask_address=cluster.scheduler_address)
        result = {}
        run = threading.Thread(target=lambda: result.update(stats=extract_features(df, folder, params)))
        run.start()
        cache_dir = tmp_path / "cache-killed"
        deadline = time.time() + 180
        while not list(cache_dir.glob("tf_efficientnet_lite0-*/shard-*.npz")):
            assert run.is_alive() and time.time() < deadline, "extraction ended before a worker could be killed"
            time.sleep(0.05)
        os.kill(pids[0], signal.SIGKILL)  # a worker dies mid-run
        run.join(timeout=300)
        assert not run.is_alive() and "stats" in result
    assert dict(os.environ) == before  # the nanny that restarted the dead worker wrote here: put back
    killed = load_features(tmp_path / "out-killed")
    np.testing.assert_array_equal(killed.image, local[0].image)
    space = next(cache_dir.glob("tf_efficientnet_lite0-*"))
    assert len(VectorCache(cache_dir, space.name, dim=1280)) == local[1]["image"]["computed"]
    assert not list(cache_dir.rglob("*.tmp")) and not list(cache_dir.rglob("*.damaged"))


def test_workers_keep_adaptive_malloc_and_leave_this_process_environment_alone():
    """Dask's default MALLOC_TRIM_THRESHOLD_ halves the encoder's speed; the nanny also writes it into os.environ."""
    from distributed import Client

    from fusionops.features.distributed import local_cluster

    before = dict(os.environ)
    with local_cluster(2) as (cluster, threads), Client(cluster) as client:
        trim = client.run(os.getenv, "MALLOC_TRIM_THRESHOLD_")  # {worker: its value}
        omp = client.run(os.getenv, "OMP_NUM_THREADS")
        levels = client.run(lambda: logging.getLogger("distributed").getEffectiveLevel())
    assert len(trim) == 2 and set(trim.values()) == {None} and set(omp.values()) == {str(threads)}
    assert set(levels.values()) == {logging.WARNING}  # no INFO line per worker start, registration, retirement
    assert dict(os.environ) == before


def test_unreachable_scheduler_is_a_clear_error(items, tmp_path):
    import dask

    from fusionops.errors import UserError
    from helpers import free_port

    folder, df = items
    address = f"tcp://127.0.0.1:{free_port()}"
    with dask.config.set({"distributed.comm.timeouts.connect": "3s"}), \
            pytest.raises(UserError, match="no Dask scheduler answers at features.dask_address"):
        extract_features(df.head(4), folder, settings(tmp_path, "nowhere", executor="dask", dask_address=address))
