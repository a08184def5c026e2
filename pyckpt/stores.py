"""Which storage backend serves a snapshot path (the seam is storage.py): s3://bucket/key is an
object in S3-compatible storage (s3_store.py), anything else a POSIX path (posix_store.py)."""
from __future__ import annotations

import os

from .paths import is_s3
from .posix_store import PosixStore, snapshot_paths as posix_snapshot_paths
from .storage import Store


def open_store(path: str | os.PathLike) -> Store:
    """The store of a snapshot path: S3 for s3:// URLs, else a POSIX path (local disk or NFS)."""
    if is_s3(path):
        from .s3_store import S3Store   # boto3 loads only for S3 paths

        return S3Store(path)
    return PosixStore(path)


def snapshot_paths(path: str | os.PathLike) -> list[str]:
    """PATH itself if it is a snapshot path, else every snapshot path directly inside directory PATH."""
    if is_s3(path):
        from .s3_store import snapshot_paths as s3_snapshot_paths

        return s3_snapshot_paths(path)
    return posix_snapshot_paths(path)
