"""Which storage backend serves a snapshot path (the seam is storage.py)."""
from __future__ import annotations

import os

from .posix_store import PosixStore, snapshot_paths as posix_snapshot_paths
from .storage import Store


def open_store(path: str | os.PathLike) -> Store:
    """The store of a snapshot path: today every path is a POSIX path (local disk or NFS)."""
    return PosixStore(path)


def snapshot_paths(path: str | os.PathLike) -> list[str]:
    """PATH itself if it is a snapshot path, else every snapshot path directly inside directory PATH."""
    return posix_snapshot_paths(path)
