"""Image vectors computed on a Dask cluster (features.executor: dask), into the same content-addressed cache.

The work is the local path's, shard for shard: the same shards (lists of content keys, in the same order), the
same batches inside each shard, the same atomic shard files. A worker first asks the shared cache what its shard
still lacks, so nothing cached is computed again, whichever worker asks; a shard lost with a dead worker is
rescheduled by Dask on another one. The coordinator (the `fusionops features` process) holds the key space's write
lock for the whole run, exactly as a local extraction does.

Workers need fusionops installed and the cache folder and the images reachable at the same paths (a shared
filesystem); on one machine (a LocalCluster) that is the case.
"""

from __future__ import annotations

import logging
import os
import socket
from collections.abc import Iterator
from contextlib import contextmanager
from functools import cache
from pathlib import Path

import numpy as np

from fusionops.config import FeaturesParams, ImageEncoderParams
from fusionops.errors import UserError

log = logging.getLogger(__name__)


@cache
def _worker_cache(cache_root: str, space: str, dim: int):
    """One cache index per worker process: each shard task only indexes the shards written since the last one."""
    from fusionops.features.cache import VectorCache

    return VectorCache(Path(cache_root), space, dim=dim)


@cache
def _worker_encoder(image_params_json: str):
    """One encoder per worker process, loaded once and reused by every shard it computes."""
    from fusionops.features.image import build_image_encoder

    return build_image_encoder(ImageEncoderParams.model_validate_json(image_params_json))


def compute_shard(cache_root: str, space: str, dim: int, image_params_json: str, items: list[tuple[str, str]], *,
                  batch_size: int, device: str, precision: str, torch_threads: int | None) -> int:
    """On a worker: the vectors of one shard's (content key, path) items that the cache still lacks, stored as one
    atomic shard. Returns how many were computed (0 when another worker or run already did them)."""
    import torch

    from fusionops.device import autocast_dtype, resolve_device
    from fusionops.features.extract import encode_images

    if torch_threads:
        torch.set_num_threads(torch_threads)
    vectors = _worker_cache(cache_root, space, dim)
    missing = set(vectors.missing([key for key, _ in items]))
    todo = [(key, path) for key, path in items if key in missing]
    if not todo:
        return 0
    encoder = _worker_encoder(image_params_json)
    target = resolve_device(device)
    out = encode_images(encoder, [(Path(path), key) for key, path in todo], batch_size=batch_size, num_workers=0,
                        device=target, dtype=autocast_dtype(target, precision))
    vectors.put([key for key, _ in todo], out)
    return len(todo)


@contextmanager
def local_cluster(workers: int) -> Iterator[tuple[object, int]]:
    """A LocalCluster of `workers` processes for torch work: (cluster, torch threads per worker).

    Dask starts worker processes with MALLOC_TRIM_THRESHOLD_=65536 and OMP_NUM_THREADS=1 (its defaults in
    distributed.nanny.pre-spawn-environ, meant for numpy tasks). The fixed trim threshold also fixes glibc's mmap
    threshold, so every activation tensor is mmapped and page-faulted afresh: the encoder runs at half speed
    (measured: 141 against 282 img/s in one process). Workers here keep glibc's adaptive defaults and get one torch
    thread per core share. The nanny also writes these variables into this process's environment: put it back.
    """
    import dask
    from distributed import LocalCluster

    threads = max(1, (os.cpu_count() or 1) // workers)  # one worker per core share: no oversubscription
    environ = {"OMP_NUM_THREADS": threads, "MKL_NUM_THREADS": threads, "OPENBLAS_NUM_THREADS": threads}
    # Dask's INFO lines (each worker starting, registering, retiring: ~40 a run) only in debug logging (--verbose):
    # the scheduler logs in this process, the workers read the level when they import distributed.
    if logging.getLogger().getEffectiveLevel() > logging.DEBUG and "DASK_LOGGING__DISTRIBUTED" not in os.environ:
        logging.getLogger("distributed").setLevel(logging.WARNING)
        environ["DASK_LOGGING__DISTRIBUTED"] = "warning"
    saved = dict(os.environ)
    try:
        with dask.config.set({"distributed.nanny.pre-spawn-environ": environ}):
            cluster = LocalCluster(n_workers=workers, threads_per_worker=1, processes=True, dashboard_address=None)
    finally:
        os.environ.clear()
        os.environ.update(saved)
    try:
        with cluster:
            yield cluster, threads
    finally:  # a nanny restarting a dead worker writes its variables here again
        os.environ.clear()
        os.environ.update(saved)


def _unreachable(address: str, err: object) -> UserError:
    return UserError(f"no Dask scheduler answers at features.dask_address = {address} ({err}): start it, or set "
                     f"features.dask_address: null for a local cluster")


def check_scheduler(params: FeaturesParams, timeout: float = 5.0) -> None:
    """With features.executor: dask and a dask_address, that something listens there (a TCP connect, not Dask's
    30 s of retries): a run stops at once, before it changes anything, instead of failing at its features stage."""
    from urllib.parse import urlsplit

    if params.executor != "dask" or not params.dask_address:
        return
    address = urlsplit(params.dask_address if "://" in params.dask_address else f"tcp://{params.dask_address}")
    try:
        port = address.port
    except ValueError:
        raise UserError(f"features.dask_address = {params.dask_address} is not scheme://host:port (an IPv6 host in "
                        "brackets, a port up to 65535)") from None
    if address.scheme not in ("tcp", "tls") or not address.hostname or not port:
        return  # another transport: Dask's own connect says what is wrong
    try:
        socket.create_connection((address.hostname, port), timeout=timeout).close()  # the scheduler logs a bare close
    except OSError as err:
        raise _unreachable(params.dask_address, err) from None


@contextmanager
def dask_client(params: FeaturesParams) -> Iterator[tuple[object, int | None]]:
    """(client, torch threads per worker): the scheduler at features.dask_address, or a LocalCluster of
    features.dask_workers processes started for this run and stopped after it."""
    from distributed import Client

    if params.dask_address:
        check_scheduler(params)
        try:
            client = Client(params.dask_address)  # waits distributed.comm.timeouts.connect (30 s)
        except (OSError, TimeoutError) as err:
            raise _unreachable(params.dask_address, err) from None
        with client:
            yield client, None  # a real cluster's workers are sized by whoever runs them (docs/scaling.md)
        return
    with local_cluster(params.dask_workers) as (cluster, threads), Client(cluster) as client:
        yield client, threads


def dask_images(vectors, keys: list[str], first_path: dict[str, Path], params: FeaturesParams, *,
                precision: str) -> tuple[np.ndarray, int]:
    """Vectors for `keys` through the shared cache, the missing shards computed on the cluster."""
    computed = 0
    if vectors.missing(keys):
        with vectors.writer():
            todo = vectors.missing(keys)  # another run may have computed them while this one waited
            shards = [todo[s:s + params.shard_size] for s in range(0, len(todo), params.shard_size)]
            if shards:
                computed = _on_cluster(vectors, shards, first_path, params, precision)
        lost = vectors.missing(keys)
        if lost:
            raise UserError(f"the Dask workers wrote {len(lost)} vector(s) where this machine cannot see them: "
                            f"features.cache_dir ({vectors.dir.parent}) and the images must be one shared folder, "
                            f"at the same absolute path on every worker")
    return vectors.get(keys), computed


def _on_cluster(vectors, shards: list[list[str]], first_path: dict[str, Path], params: FeaturesParams,
                precision: str) -> int:
    from distributed import as_completed

    from fusionops.progress import progress_bar

    computed = 0
    with dask_client(params) as (client, threads), progress_bar(unit="img") as bar:
        log.info("%d shard(s) of image vectors on the Dask scheduler %s", len(shards), client.scheduler.address)
        task = bar.add_task("image vectors (dask)", total=sum(map(len, shards)))
        futures = {client.submit(
            compute_shard, str(vectors.dir.parent.resolve()), vectors.dir.name, vectors.dim,
            params.image.model_dump_json(), [(k, str(Path(first_path[k]).resolve())) for k in shard],
            batch_size=params.batch_size, device=params.device, precision=precision, torch_threads=threads,
            pure=False,
        ): len(shard) for shard in shards}
        for future in as_completed(futures):
            computed += future.result()
            bar.advance(task, futures[future])
    return computed
