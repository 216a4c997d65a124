"""Feature extraction on Dask: the local executor against LocalClusters of 1 and 2 workers, on the same data.

    python bench/scale.py [--json] [--items N] [--params params.yaml]

Every timed run starts from an empty (temporary) cache. The Dask speeds are steady state: the cluster is reached by
address (as a remote one would be) after a first run on other items has loaded each worker's encoder; those fixed
costs are reported apart (cluster start, first run). Also measured: what one shard costs to compute and what a shard
costs the scheduler when there is nothing to compute (its overhead). The last line of output is a JSON object;
docs/scaling.md turns these figures into what N machines would give.
"""

from __future__ import annotations

import tempfile
import time
from pathlib import Path

from _cli import parser as bench_parser
from _cli import report

from fusionops.config import load_params
from fusionops.data.manifest import read_manifest
from fusionops.features import extract_features
from fusionops.features.cache import content_key
from fusionops.features.image import build_image_encoder
from fusionops.features.text import build_text_encoder


def cold_run(df, root: Path, settings) -> tuple[float, int]:
    """Image vectors from an empty cache: (images per second, images computed)."""
    stats = extract_features(df, root, settings)
    return stats["image"]["computed"] / stats["image"]["seconds"], stats["image"]["computed"]


def dask_runs(df, warm_df, root: Path, settings, workers: int) -> dict:
    """On a LocalCluster of `workers` processes, reached by address as a remote cluster would be: its start, the
    first extraction (each worker imports torch and loads the encoder once), then the steady speed on `df`."""
    from distributed import Client

    from fusionops.features.distributed import local_cluster

    start = time.perf_counter()
    with local_cluster(workers) as (cluster, _), Client(cluster) as client:
        client.wait_for_workers(workers)
        started = time.perf_counter() - start
        address = {"executor": "dask", "dask_address": cluster.scheduler_address}
        start = time.perf_counter()
        extract_features(warm_df, root, settings(f"warm{workers}", **address))
        warmup = time.perf_counter() - start
        speed, _ = cold_run(df, root, settings(f"dask{workers}", **address))
    return {f"dask_{workers}_workers_img_s": speed, f"dask_{workers}_cluster_start_s": started,
            f"dask_{workers}_first_run_s": warmup}


def scheduling_overhead(settings, cache_dir: Path, shards: list[list[str]], precision: str) -> float:
    """Seconds per shard when every item is cached already: submit, check the cache, report back."""
    from distributed import Client, wait

    from fusionops.features.distributed import compute_shard, local_cluster

    space = next(cache_dir.glob("tf_efficientnet_lite0-*"))
    with local_cluster(2) as (cluster, _), Client(cluster) as client:
        args = (str(cache_dir), space.name, 1280, settings.image.model_dump_json())
        kw = dict(batch_size=settings.batch_size, device=settings.device, precision=precision, torch_threads=1)
        wait([client.submit(compute_shard, *args, [(k, "") for k in shards[0]], pure=False, **kw)])  # warm-up
        start = time.perf_counter()
        futures = [client.submit(compute_shard, *args, [(k, "") for k in shard], pure=False, **kw) for shard in shards]
        assert sum(f.result() for f in futures) == 0
        return (time.perf_counter() - start) / len(shards)


def main() -> None:
    parser = bench_parser(__doc__)
    parser.add_argument("--items", type=int, default=2000, help="items from the prepared manifest")
    args = parser.parse_args()

    params = load_params(args.params)
    df = read_manifest(params.data.prepared).head(args.items)
    root = Path(params.data.images_root)
    build_image_encoder(params.features.image)  # imports and weight hashing, once, outside the timings
    build_text_encoder(params.features.text)
    result: dict = {"items": len(df), "shard_size": params.features.shard_size}
    content_key(b"")  # what the coordinator does for every item before any shard is sent: read and hash it
    start = time.perf_counter()
    for path in df["image"]:
        content_key((root / path).read_bytes())
    result["coordinator_hash_img_s"] = len(df) / (time.perf_counter() - start)  # page cache now warm for every run
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)

        def settings(name: str, **kw):
            return params.features.model_copy(update={"cache_dir": tmp / name, "out_dir": tmp / f"out-{name}", **kw})

        result["local_img_s"], computed = cold_run(df, root, settings("local", executor="local"))
        warm_df = read_manifest(params.data.prepared).tail(64)  # other items: loads the workers' encoders
        for workers in (1, 2):
            result.update(dask_runs(df, warm_df, root, settings, workers))
        shard = params.features.shard_size
        result["shards"] = -(-computed // shard)
        result["per_shard_compute_s"] = shard / result["local_img_s"]
        from fusionops.device import autocast_dtype, precision_name, resolve_device
        from fusionops.features.cache import VectorCache

        precision = precision_name(autocast_dtype(resolve_device(params.features.device), params.features.precision))
        space = next((tmp / "dask2").glob("tf_efficientnet_lite0-*"))
        keys = sorted(VectorCache(tmp / "dask2", space.name, dim=1280).keys())
        shards = [keys[i:i + shard] for i in range(0, len(keys), shard)]
        result["per_shard_overhead_s"] = scheduling_overhead(settings("dask2"), tmp / "dask2", shards, precision)
    result = {k: round(v, 4) if isinstance(v, float) else v for k, v in result.items()}
    result["dask_2_vs_local"] = round(result["dask_2_workers_img_s"] / result["local_img_s"], 3)
    report(result, json_only=args.json)


if __name__ == "__main__":
    main()
