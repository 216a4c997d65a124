"""Encode images and texts in batches, and the features stage that runs them through the cache."""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
import torch

from fusionops.atomic import atomic_path, write_json
from fusionops.config import FeaturesParams
from fusionops.device import autocast_dtype, resolve_device
from fusionops.errors import DataError
from fusionops.features.cache import VectorCache, content_key
from fusionops.features.image import ImageEncoder, build_image_encoder, load_rgb
from fusionops.features.text import TextEncoder, build_text_encoder
from fusionops.progress import progress_bar

log = logging.getLogger(__name__)


class _Images(torch.utils.data.Dataset):
    """Decode + preprocess in DataLoader workers, so it overlaps with the forward pass."""

    def __init__(self, sources: Sequence[Path | bytes], encoder: ImageEncoder):
        self.sources, self.transform, self.background = sources, encoder.transform, encoder.background

    def __len__(self) -> int:
        return len(self.sources)

    def __getitem__(self, i: int) -> torch.Tensor:
        return self.transform(load_rgb(self.sources[i], self.background))


def iter_image_vectors(encoder: ImageEncoder, sources: Sequence[Path | bytes], *, batch_size: int,
                       num_workers: int, device: torch.device, dtype: torch.dtype | None) -> Iterator[np.ndarray]:
    """Yield float32 vectors batch by batch, in the order of `sources`."""
    model = encoder.model.to(device).to(memory_format=torch.channels_last).eval()
    loader = torch.utils.data.DataLoader(
        _Images(sources, encoder), batch_size=batch_size, num_workers=num_workers,
        pin_memory=device.type == "cuda", shuffle=False,
    )
    with torch.inference_mode():
        for batch in loader:
            batch = batch.to(device, non_blocking=True).contiguous(memory_format=torch.channels_last)
            with torch.autocast(device.type, dtype=dtype, enabled=dtype is not None):
                out = model(batch)
            yield out.float().cpu().numpy()


@dataclass
class FeatureSet:
    """Vectors aligned row by row with the prepared manifest."""

    item_ids: list[str]
    image: np.ndarray
    text: np.ndarray
    encoders: dict[str, dict]


def _cached_images(keys: list[str], paths: list[Path], encoder: ImageEncoder, params: FeaturesParams,
                   device: torch.device, dtype: torch.dtype | None) -> tuple[np.ndarray, int]:
    cache = VectorCache(params.cache_dir, encoder.id, dim=encoder.dim)
    first_path = dict(zip(reversed(keys), reversed(paths), strict=True))  # first row wins
    todo = cache.missing(keys)
    if todo:
        with progress_bar(unit="img") as bar:
            task = bar.add_task("image vectors", total=len(todo))
            # Shards are stored as they complete: a killed run keeps everything finished before the kill.
            for start in range(0, len(todo), params.shard_size):
                shard = todo[start:start + params.shard_size]
                vectors = []
                for out in iter_image_vectors(encoder, [first_path[k] for k in shard], batch_size=params.batch_size,
                                              num_workers=params.num_workers, device=device, dtype=dtype):
                    vectors.append(out)
                    bar.advance(task, len(out))
                cache.put(shard, np.concatenate(vectors))
    return cache.get(keys), len(todo)


def _cached_texts(texts: list[str], encoder: TextEncoder, params: FeaturesParams,
                  device: torch.device, dtype: torch.dtype | None) -> tuple[np.ndarray, int]:
    cache = VectorCache(params.cache_dir, encoder.id, dim=encoder.dim)
    keys = [content_key(t) for t in texts]
    by_key = dict(zip(keys, texts, strict=True))
    todo = cache.missing(keys)
    if todo:
        with progress_bar(unit="texts") as bar:
            task = bar.add_task("text vectors", total=len(todo))
            for start in range(0, len(todo), params.shard_size):
                shard = todo[start:start + params.shard_size]
                cache.put(shard, encoder.encode([by_key[k] for k in shard], batch_size=params.batch_size,
                                                device=device, autocast_dtype=dtype,
                                                on_batch=lambda n: bar.advance(task, n)))
    return cache.get(keys), len(todo)


def _read(path: Path, item_id: str) -> bytes:
    try:
        return path.read_bytes()
    except OSError as err:
        reason = f"cannot read image {path} ({err.strerror})"
        raise DataError(f"row {item_id!r}: {reason}; run `fusionops validate` to list every such row") from None


def extract_features(df: pd.DataFrame, images_root: Path, params: FeaturesParams) -> dict:
    """Write vectors for every row of `df` to params.out_dir, computing only what the cache lacks.

    Returns counts and rates per modality (what was computed and what came from the cache).
    """
    device = resolve_device(params.device)
    dtype = autocast_dtype(device, params.precision)
    root = Path(images_root).resolve()
    paths = [root / p for p in df["image"]]
    stats: dict = {"device": device.type, "precision": str(dtype).removeprefix("torch.") if dtype else "fp32"}

    t0 = time.perf_counter()
    image_keys = [content_key(_read(path, item_id)) for path, item_id in zip(paths, df["item_id"], strict=True)]
    image_encoder = build_image_encoder(params.image)
    image, computed = _cached_images(image_keys, paths, image_encoder, params, device, dtype)
    stats["image"] = {"items": len(df), "computed": computed, "cached": len(set(image_keys)) - computed,
                      "seconds": round(time.perf_counter() - t0, 2)}

    t0 = time.perf_counter()
    text_encoder = build_text_encoder(params.text)
    text, computed = _cached_texts(df["text"].tolist(), text_encoder, params, device, dtype)
    stats["text"] = {"items": len(df), "computed": computed, "cached": df["text"].nunique() - computed,
                     "seconds": round(time.perf_counter() - t0, 2)}

    encoders = {
        "image": {"id": image_encoder.id, "dim": image_encoder.dim, **params.image.model_dump(mode="json")},
        "text": {"id": text_encoder.id, "dim": text_encoder.dim, **params.text.model_dump(mode="json")},
    }
    out = Path(params.out_dir)
    for name, array in (("image", image), ("text", text)):
        with atomic_path(out / f"{name}.npy") as tmp, open(tmp, "wb") as f:
            np.save(f, array.astype(np.float32))
    # Timings stay out of meta.json: the stage's outputs depend only on its inputs, so DVC sees real changes only.
    write_json(out / "meta.json", {"rows": len(df), "item_ids": df["item_id"].tolist(), "encoders": encoders})
    return stats


def load_features(out_dir: Path) -> FeatureSet:
    """Read what extract_features wrote."""
    out_dir = Path(out_dir)
    meta = json.loads((out_dir / "meta.json").read_text())
    return FeatureSet(
        item_ids=meta["item_ids"],
        image=np.load(out_dir / "image.npy"),
        text=np.load(out_dir / "text.npy"),
        encoders=meta["encoders"],
    )
