"""Feature extraction on Dask: the local executor against LocalClusters of 1 and 2 workers, on the same data.

    python bench/scale.py [--json] [--items N] [--params params.yaml]

Every run starts from an empty (temporary) cache. Also measured: what one shard costs to compute, what a shard costs
the scheduler when there is nothing to compute (its overhead), and how long a LocalCluster takes to start. The last
line of output is a JSON object; docs/scaling.md turns these figures into what N machines would give.
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

from fusionops.config import load_params
from fusionops.data.manifest import read_manifest
from fusionops.features import extract_features
from fusionops.features.image import build_image_encoder
from fusionops.features.text import build_text_encoder


def cold_run(df, root: Path, settings) -> tuple[float, int]:
    """Image vectors from an empty cache: (images per second, images computed)."""
    stats = extract_features(df, root, settings)
    return stats["image"]["computed"] / stats["image"]["seconds"], stats["image"]["computed"]


def scheduling_overhead(settings, cache_dir: Path, shards: list[list[str]], precision: str) -> float:
    """Seconds per shard when every item is cached already: submit, check the cache, report back."""
    from distributed import Client, LocalCluster, wait

    from fusionops.features.distributed import compute_shard

    space = next(cache_dir.glob("tf_efficientnet_lite0-*"))
    with LocalCluster(n_workers=2, threads_per_worker=1, processes=True, dashboard_address=None) as cluster, \
            Client(cluster) as client:
        args = (str(cache_dir), space.name, 1280, settings.image.model_dump_json())
        kw = dict(batch_size=settings.batch_size, device=settings.device, precision=precision, torch_threads=1)
        wait([client.submit(compute_shard, *args, [(k, "") for k in shards[0]], pure=False, **kw)])  # warm-up
        start = time.perf_counter()
        futures = [client.submit(compute_shard, *args, [(k, "") for k in shard], pure=False, **kw) for shard in shards]
        assert sum(f.result() for f in futures) == 0
        return (time.perf_counter() - start) / len(shards)


def cluster_start() -> float:
    from distributed import Client, LocalCluster

    start = time.perf_counter()
    with LocalCluster(n_workers=2, threads_per_worker=1, processes=True, dashboard_address=None) as cluster, \
            Client(cluster) as client:
        client.run(lambda: __import__("torch"))  # a worker is ready when torch is imported
        return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--json", action="store_true", help="print only the JSON result")
    parser.add_argument("--items", type=int, default=2000, help="items from the prepared manifest")
    parser.add_argument("--params", type=Path, default=Path("params.yaml"))
    args = parser.parse_args()

    params = load_params(args.params)
    df = read_manifest(params.data.prepared).head(args.items)
    root = Path(params.data.images_root)
    build_image_encoder(params.features.image)  # imports and weight hashing, once, outside the timings
    build_text_encoder(params.features.text)
    result: dict = {"items": len(df), "shard_size": params.features.shard_size}
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)

        def settings(name: str, **kw):
            return params.features.model_copy(update={"cache_dir": tmp / name, "out_dir": tmp / f"out-{name}", **kw})

        result["local_img_s"], computed = cold_run(df, root, settings("local", executor="local"))
        for workers in (1, 2):
            speed, _ = cold_run(df, root, settings(f"dask{workers}", executor="dask", dask_workers=workers))
            result[f"dask_{workers}_workers_img_s"] = speed
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
    result["cluster_start_s"] = cluster_start()
    result = {k: round(v, 4) if isinstance(v, float) else v for k, v in result.items()}
    result["dask_2_vs_local"] = round(result["dask_2_workers_img_s"] / result["local_img_s"], 3)
    if not args.json:
        for key, value in result.items():
            print(f"{key:>24}: {value}")
    print(json.dumps(result))


if __name__ == "__main__":
    main()
