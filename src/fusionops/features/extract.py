"""Encode images and texts in batches, and the features stage that runs them through the cache."""

from __future__ import annotations

import json
import logging
import os
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
import torch

from fusionops.atomic import atomic_dir
from fusionops.config import FeaturesParams
from fusionops.device import autocast_dtype, precision_name, resolve_device
from fusionops.errors import DataError, UserError
from fusionops.features.cache import VectorCache, content_key
from fusionops.features.image import ImageEncoder, Pixels, build_image_encoder
from fusionops.features.text import TextEncoder, build_text_encoder
from fusionops.progress import progress_bar

log = logging.getLogger(__name__)

# Texts per forward pass in the features stage: a constant, so that no setting that only changes the speed
# (features.batch_size) changes a text vector's float rounding (TextEncoder.encode).
TEXT_BATCH = 32


class _Images(torch.utils.data.Dataset):
    """Decode in DataLoader workers (when there are any), so it overlaps with the forward pass; the loader's collate
    resizes the batch (`Pixels.batch`)."""

    def __init__(self, sources: Sequence[Path | bytes | tuple[Path, str]], pixels: Pixels):
        self.sources, self.pixels = sources, pixels

    def __len__(self) -> int:
        return len(self.sources)

    def __getitem__(self, i: int) -> torch.Tensor:
        source = self.sources[i]
        if isinstance(source, tuple):  # (path, content key): decode exactly the bytes the vector is stored under
            path, key = source
            source = Path(path).read_bytes()
            if content_key(source) != key:
                raise DataError(f"{path} changed while its vector was being computed: run `fusionops features` again")
        return self.pixels.one(source)


def aligned_batches(n: int, batch_size: int, shard_size: int) -> list[list[int]]:
    """Batches of at most batch_size that never straddle a shard: a resumed run (which starts at a shard boundary)
    then forms exactly the batches an uninterrupted run forms, and computes exactly the same vectors."""
    return [list(range(b, min(b + batch_size, s + shard_size, n)))
            for s in range(0, n, shard_size) for b in range(s, min(s + shard_size, n), batch_size)]


def loader_workers(requested: int | str) -> int:
    """How many DataLoader worker processes decode images beside the forward pass.

    'auto': one per core beyond two (at most 4). The forward pass already uses every core it gets; a worker pays off
    only where a core would otherwise idle (measured on 2 cores: decoding in-process is ~5% faster than 1 worker).
    Workers fork the process: safe in a single-threaded command, not beside other threads (a Prefect task, a web
    server), where a forked worker can inherit a held lock and die; there, decoding stays in-process.
    """
    if threading.active_count() > 1:
        return 0
    if requested == "auto":
        return max(0, min(4, (os.cpu_count() or 1) - 2))
    return int(requested)


def iter_image_vectors(encoder: ImageEncoder, sources: Sequence[Path | bytes], *, batch_size: int,
                       num_workers: int, device: torch.device, dtype: torch.dtype | None,
                       shard_size: int | None = None) -> Iterator[np.ndarray]:
    """Yield float32 vectors batch by batch, in the order of `sources` (one DataLoader, its workers kept busy).

    Every forward pass has `batch_size` images (a shorter last batch is filled with black ones): an image's vector
    depends on its pixels and the batch size, not on how many others were missing from the cache with it (the
    convolution kernels oneDNN picks, and so the float rounding, follow the input's shape)."""
    model = encoder.model_for(dtype).to(device).to(memory_format=torch.channels_last).eval()
    workers = num_workers  # resolved by the caller (loader_workers) before any progress-bar thread starts
    log.debug("encoding %d images, %d decoding worker process(es)", len(sources), workers)
    loader = torch.utils.data.DataLoader(
        _Images(sources, encoder.pixels), num_workers=workers, pin_memory=device.type == "cuda",
        batch_sampler=aligned_batches(len(sources), batch_size, shard_size or len(sources) or 1),
        collate_fn=encoder.pixels.batch,
    )
    with torch.inference_mode():
        for batch in loader:
            n = len(batch)
            if n < batch_size:
                batch = torch.cat([batch, batch.new_zeros((batch_size - n, *batch.shape[1:]))])
            batch = encoder.normalize(batch.to(device, non_blocking=True))
            with torch.autocast(device.type, dtype=dtype, enabled=dtype is not None):
                out = model(batch)
            yield out[:n].float().cpu().numpy()


def encode_images(encoder: ImageEncoder, sources: Sequence[Path | bytes], *,
                  on_batch: Callable[[int], None] | None = None, **kwargs) -> np.ndarray:
    """All vectors of `sources` as one (N, dim) float32 array."""
    parts = []
    for out in iter_image_vectors(encoder, sources, **kwargs):
        parts.append(out)
        if on_batch:
            on_batch(len(out))
    return np.concatenate(parts) if parts else np.empty((0, encoder.dim), np.float32)


@dataclass
class FeatureSet:
    """Vectors aligned row by row with the prepared manifest."""

    item_ids: list[str]
    image: np.ndarray
    text: np.ndarray
    encoders: dict[str, dict]

    def select(self, rows: np.ndarray) -> FeatureSet:
        """The vectors of some rows (a boolean mask or indices), still aligned."""
        rows = np.flatnonzero(rows) if np.asarray(rows).dtype == bool else np.asarray(rows)
        return FeatureSet([self.item_ids[i] for i in rows], self.image[rows], self.text[rows], self.encoders)


def _through_cache(cache: VectorCache, keys: list[str], compute: Callable[[list[str]], Iterator[np.ndarray]], *,
                   shard_size: int, description: str, unit: str) -> tuple[np.ndarray, int]:
    """Vectors for `keys`: cached ones read, missing ones computed (in order, by `compute`) and stored shard by
    shard as they complete, so a killed run keeps every finished shard. Returns the vectors and the count computed."""
    todo = cache.missing(keys)
    if todo:
        with cache.writer():
            todo = cache.missing(keys)  # what another process computed while this one waited is not redone
            with progress_bar(unit=unit) as bar:
                task = bar.add_task(description, total=len(todo))
                pending, stored = [], 0
                for out in compute(todo):
                    pending.append(out)
                    bar.advance(task, len(out))
                    ready = np.concatenate(pending)
                    while len(ready) >= shard_size or (stored + len(ready) == len(todo) and len(ready)):
                        n = min(shard_size, len(ready))
                        cache.put(todo[stored:stored + n], ready[:n])
                        stored, ready = stored + n, ready[n:]
                    pending = [ready]
    return cache.get(keys), len(todo)


def key_space(encoder_id: str, precision: str) -> str:
    """The cache folder of an encoder: its id plus the precision (bf16 vectors are close to fp32 ones, not equal)."""
    return f"{encoder_id}-{precision}"


def current_key_spaces(params: FeaturesParams) -> set[str]:
    """The key spaces params.yaml's encoders use on this machine."""
    precision = precision_name(autocast_dtype(resolve_device(params.device), params.precision))
    return {key_space(build_image_encoder(params.image).id, precision),
            key_space(build_text_encoder(params.text).id, precision)}


def _read(path: Path, item_id: str) -> bytes:
    try:
        return path.read_bytes()
    except OSError as err:
        reason = f"cannot read image {path} ({err.strerror})"
        raise DataError(f"row {item_id!r}: {reason}; run `fusionops validate` to list every such row") from None


def extract_features(df: pd.DataFrame, images_root: Path, params: FeaturesParams) -> dict:
    """Write vectors for every row of `df` to params.out_dir, computing only what the cache lacks.

    Returns counts and times per modality (what was computed and what came from the cache).
    """
    device = resolve_device(params.device)
    dtype = autocast_dtype(device, params.precision)
    precision = precision_name(dtype)
    workers = loader_workers(params.num_workers)  # now: a progress bar on a terminal adds a thread
    root = Path(images_root).resolve()
    stats: dict = {"device": device.type, "precision": precision}
    encoders: dict[str, dict] = {}

    t0 = time.perf_counter()
    paths = [root / p for p in df["image"]]
    keys = [content_key(_read(path, item_id)) for path, item_id in zip(paths, df["item_id"], strict=True)]
    image_encoder = build_image_encoder(params.image)
    first_path = dict(zip(reversed(keys), reversed(paths), strict=True))  # identical files: encode one of them
    cache = VectorCache(params.cache_dir, key_space(image_encoder.id, precision), dim=image_encoder.dim)
    if params.executor == "dask":
        from fusionops.features.distributed import dask_images

        image, computed = dask_images(cache, keys, first_path, params, precision=precision)
    else:
        image, computed = _through_cache(
            cache, keys, lambda todo: iter_image_vectors(
                image_encoder, [(first_path[k], k) for k in todo], batch_size=params.batch_size,
                num_workers=workers, device=device, dtype=dtype, shard_size=params.shard_size),
            shard_size=params.shard_size, description="image vectors", unit="img")
    stats["image"] = {"items": len(df), "computed": computed, "cached": len(set(keys)) - computed,
                      "seconds": round(time.perf_counter() - t0, 2)}

    t0 = time.perf_counter()
    texts = df["text"].tolist()
    keys = [content_key(t) for t in texts]
    by_key = dict(zip(keys, texts, strict=True))
    text_encoder = build_text_encoder(params.text)
    cache = VectorCache(params.cache_dir, key_space(text_encoder.id, precision), dim=text_encoder.dim)
    text, computed = _through_cache(
        cache, keys, lambda todo: (
            text_encoder.encode([by_key[k] for k in todo[s:s + params.shard_size]], batch_size=TEXT_BATCH,
                                device=device, autocast_dtype=dtype)
            for s in range(0, len(todo), params.shard_size)),
        shard_size=params.shard_size, description="text vectors", unit="texts")
    stats["text"] = {"items": len(df), "computed": computed, "cached": len(by_key) - computed,
                     "seconds": round(time.perf_counter() - t0, 2)}

    for name, enc, settings in (("image", image_encoder, params.image), ("text", text_encoder, params.text)):
        encoders[name] = {"id": enc.id, "dim": enc.dim, "weights_sha256": enc.weights_sha256,
                          "precision": precision, **settings.model_dump(mode="json")}
    # Timings stay out of meta.json: the stage's outputs depend only on its inputs, so DVC sees real changes only.
    with atomic_dir(params.out_dir) as tmp:
        np.save(tmp / "image.npy", image.astype(np.float32))
        np.save(tmp / "text.npy", text.astype(np.float32))
        (tmp / "meta.json").write_text(json.dumps(
            {"rows": len(df), "item_ids": df["item_id"].tolist(), "encoders": encoders}, indent=2) + "\n")
    return stats


def text_vectors(texts: list[str], encoder: TextEncoder, params: FeaturesParams, *,
                 precision: str) -> tuple[np.ndarray, int]:
    """The vectors of `texts` by `encoder` in `precision` through the cache (a tuned encoder has its own key
    space): the cached ones read, the rest computed and stored. Returns them and how many were computed."""
    device = resolve_device(params.device)
    keys = [content_key(t) for t in texts]
    by_key = dict(zip(keys, texts, strict=True))
    cache = VectorCache(params.cache_dir, key_space(encoder.id, precision), dim=encoder.dim)
    return _through_cache(
        cache, keys, lambda todo: (
            encoder.encode([by_key[k] for k in todo[s:s + params.shard_size]], batch_size=params.batch_size,
                           device=device, autocast_dtype=autocast_dtype(device, precision))
            for s in range(0, len(todo), params.shard_size)),
        shard_size=params.shard_size, description="text vectors", unit="texts")


def load_features(out_dir: Path) -> FeatureSet:
    """Read what extract_features wrote, checking that the three files agree."""
    out_dir = Path(out_dir)
    if not (out_dir / "meta.json").is_file():
        raise UserError(f"{out_dir} holds no features: run `fusionops features` first")
    meta = json.loads((out_dir / "meta.json").read_text())
    features = FeatureSet(item_ids=meta["item_ids"], image=np.load(out_dir / "image.npy"),
                          text=np.load(out_dir / "text.npy"), encoders=meta["encoders"])
    if not len(features.item_ids) == len(features.image) == len(features.text):
        raise UserError(f"{out_dir} is inconsistent ({len(features.item_ids)} ids, {len(features.image)} image and "
                        f"{len(features.text)} text vectors): run `fusionops features` again")
    return features
