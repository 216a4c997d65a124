"""File locks that say when they wait: one pipeline run per project folder, one writer per cache key space."""

from __future__ import annotations

import logging
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from filelock import FileLock, Timeout

log = logging.getLogger(__name__)


@contextmanager
def held(path: Path, *, waiting: str, reentrant: bool = False) -> Iterator[None]:
    """Hold the lock file at `path`; log `waiting` once if another process holds it first.

    `reentrant`: the same process may take it again while holding it (a flow calling another flow); otherwise a
    second holder in the same process waits like any other.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    lock = FileLock(path, is_singleton=True, thread_local=False) if reentrant else FileLock(path)
    try:
        lock.acquire(timeout=0)
    except Timeout:
        log.warning(waiting)
        lock.acquire()
    try:
        yield
    finally:
        lock.release()


def project_lock(root: Path):
    """One pipeline run, retrain or ingest per project folder at a time (DVC would fail a second on its own lock)."""
    path = Path(root) / ".cache" / "pipeline.lock"
    return held(path, waiting=f"another pipeline run holds {path}: waiting for it to finish", reentrant=True)
