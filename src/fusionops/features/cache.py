"""Content-addressed vector cache: key = hash of the content (image bytes or text), one key space per encoder id.

A second run over unchanged data computes nothing; new items cost only themselves; another backbone or other
preprocessing gets its own key space. Vectors are stored in shards written atomically as they complete, each under
a unique name, so a killed run keeps its finished shards and concurrent writers never touch the same file.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import shutil
import time
import uuid
import zipfile
from pathlib import Path

import numpy as np
from filelock import FileLock

from fusionops.atomic import atomic_path, write_json
from fusionops.errors import DataError
from fusionops.locks import held

log = logging.getLogger(__name__)


def content_key(content: bytes | str) -> str:
    if isinstance(content, str):
        content = content.encode("utf-8")
    return hashlib.sha256(content).hexdigest()


class VectorCache:
    """The cached vectors of one encoder (one key space) under `root/<encoder id>/`.

    It keeps an index (key -> shard, row) in memory and reads vectors only when they are asked for, so checking
    what is missing stays cheap however large the cache grows; shards written since the last look (by this process
    or another one) are indexed on the next call.
    """

    def __init__(self, root: Path, encoder_id: str, *, dim: int):
        self.dir = Path(root) / encoder_id
        self.dim = dim
        self.dir.mkdir(parents=True, exist_ok=True)
        meta = self.dir / "encoder.json"
        if not meta.exists():
            write_json(meta, {"encoder_id": encoder_id, "dim": dim, "created": time.strftime("%Y-%m-%dT%H:%M:%S%z")})
        self._index: dict[str, tuple[str, int]] = {}
        self._seen: set[str] = set()

    def _set_aside(self, shard: Path, err: Exception) -> None:
        # Shards appear only by atomic rename, so an undecodable one was damaged after it was written:
        # it costs a recompute, never a wrong vector. (OSError, e.g. permissions, is not damage: it is raised.)
        log.warning("cache shard %s is damaged (%s): set aside as .damaged, its items are recomputed", shard, err)
        with contextlib.suppress(OSError):  # another process may have set it aside first
            shard.replace(shard.with_name(shard.name + ".damaged"))
        self._index = {k: v for k, v in self._index.items() if v[0] != shard.name}

    def _refresh(self) -> None:
        """Index the shards written since the last look (their keys only); forget shards removed since (pruned)."""
        shards = sorted(self.dir.glob("shard-*.npz"))
        gone = self._seen - {s.name for s in shards}
        if gone:
            self._seen -= gone
            self._index = {k: v for k, v in self._index.items() if v[0] not in gone}
        for shard in shards:
            if shard.name in self._seen:
                continue
            try:
                with np.load(shard, allow_pickle=False) as z:
                    keys = z["keys"].tolist()
                    shape = _stored_shape(z, "vectors")
                if shape != (len(keys), self.dim):
                    raise ValueError(f"{shape} vectors for {len(keys)} keys of dim {self.dim}")
            except _DAMAGE as err:
                self._set_aside(shard, err)
                continue
            except FileNotFoundError:  # pruned (or set aside) by another process since the listing
                continue
            self._seen.add(shard.name)
            self._index.update((k, (shard.name, row)) for row, k in enumerate(keys))

    def missing(self, keys: list[str]) -> list[str]:
        """Keys with no cached vector, without duplicates, in first-seen order."""
        self._refresh()
        return [k for k in dict.fromkeys(keys) if k not in self._index]

    def put(self, keys: list[str], vectors: np.ndarray) -> None:
        """Store one shard of vectors atomically."""
        vectors = np.asarray(vectors, dtype=np.float32)
        if len(keys) != len(vectors) or vectors.shape[1:] != (self.dim,):
            raise ValueError(f"{len(keys)} keys for vectors of shape {vectors.shape} (dim {self.dim})")
        name = f"shard-{time.strftime('%Y%m%dT%H%M%S')}-{os.getpid()}-{uuid.uuid4().hex[:8]}.npz"
        with atomic_path(self.dir / name) as tmp, open(tmp, "wb") as f:
            np.savez(f, keys=np.asarray(keys, dtype="U64"), vectors=vectors)
        self._seen.add(name)
        self._index.update((k, (name, row)) for row, k in enumerate(keys))

    def writer(self):
        """Hold the key space's write lock: a second extraction waits, then finds the vectors already cached."""
        return held(self.dir / ".write.lock", waiting=f"another process is computing {self.dir.name} vectors: waiting")

    def get(self, keys: list[str]) -> np.ndarray:
        """Vectors for `keys`, in order; every key must be cached. Each shard involved is read once."""
        self._refresh()
        out = np.empty((len(keys), self.dim), np.float32)
        by_shard: dict[str, list[tuple[int, int]]] = {}
        for i, key in enumerate(keys):
            shard, row = self._index[key]
            by_shard.setdefault(shard, []).append((i, row))
        for shard, pairs in by_shard.items():
            try:
                with np.load(self.dir / shard, allow_pickle=False) as z:
                    vectors = z["vectors"]
            except _DAMAGE as err:
                self._set_aside(self.dir / shard, err)
                raise DataError(f"cache shard {shard} turned out damaged and was set aside: run again, its "
                                "items will be recomputed") from None
            except FileNotFoundError:
                raise DataError(f"cache shard {self.dir / shard} was removed while it was being read (a `fusionops "
                                f"cache prune`?): run again, its items will be recomputed") from None
            rows, targets = [r for _, r in pairs], [i for i, _ in pairs]
            out[targets] = vectors[rows]
        return out

    def keys(self) -> set[str]:
        self._refresh()
        return set(self._index)

    def __len__(self) -> int:
        self._refresh()
        return len(self._index)


_DAMAGE = (zipfile.BadZipFile, ValueError, EOFError, KeyError)


def _stored_shape(npz, name: str) -> tuple[int, ...]:
    """The shape of an array in an .npz, from its header alone (the vectors stay on disk until asked for)."""
    with npz.zip.open(f"{name}.npy") as f:
        version = np.lib.format.read_magic(f)
        reader = np.lib.format.read_array_header_1_0 if version == (1, 0) else np.lib.format.read_array_header_2_0
        return tuple(reader(f)[0])


def describe(root: Path) -> list[dict]:
    """Every key space under `root`: encoder id, entries, shards, bytes on disk, when it was created."""
    spaces = []
    for meta in sorted(Path(root).glob("*/encoder.json")):
        info = json.loads(meta.read_text())
        shards = sorted(meta.parent.glob("shard-*.npz"))
        entries = 0
        for shard in shards:
            with contextlib.suppress(zipfile.BadZipFile, ValueError, EOFError, KeyError, OSError):
                with np.load(shard, allow_pickle=False) as z:
                    entries += len(z["keys"])
        spaces.append({"key_space": meta.parent.name, "dim": info.get("dim"), "created": info.get("created"),
                       "entries": entries, "shards": len(shards),
                       "bytes": sum(f.stat().st_size for f in meta.parent.iterdir() if f.is_file())})
    return spaces


def prune(root: Path, keep: set[str], *, dry_run: bool = False) -> list[dict]:
    """Remove every key space not in `keep` (and damaged shards everywhere); return what was (or would be) removed.

    Each space is removed under its write lock, so an extraction writing to it is never cut short.
    """
    removed = []
    for space in describe(root):
        folder = Path(root) / space["key_space"]
        damaged = list(folder.glob("*.damaged"))
        if space["key_space"] in keep and not damaged:
            continue
        removed.append({**space, "whole": space["key_space"] not in keep, "damaged": len(damaged)})
        if dry_run:
            continue
        with FileLock(folder / ".write.lock"):
            if space["key_space"] in keep:
                for f in damaged:
                    f.unlink(missing_ok=True)
            else:
                shutil.rmtree(folder, ignore_errors=True)
    return removed
