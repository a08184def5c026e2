"""The syntax of a snapshot path, checked without touching any store: s3://BUCKET/KEY names an object in
S3-compatible storage (s3_store.py), anything else a file (posix_store.py). The stores and the config
(SNAPSHOT_PATH) share these checks."""
from __future__ import annotations

import os

from .errors import SnapshotPathError


def is_s3(path: str | os.PathLike) -> bool:
    return isinstance(path, str) and path.startswith("s3://")


def split_url(url: str) -> tuple[str, str]:
    """s3://bucket/key -> (bucket, key); the key may be empty."""
    bucket, _, key = url[len("s3://"):].partition("/")
    if not bucket:
        raise SnapshotPathError(f"{url!r} names no bucket: write s3://BUCKET/prefix/checkpoint.bin")
    return bucket, key


def snapshot_object(url: str) -> tuple[str, str]:
    """A snapshot path s3://bucket/key -> (bucket, key); SnapshotPathError unless it names an object."""
    bucket, key = split_url(url)
    if not key or key.endswith("/"):
        raise SnapshotPathError(f"{url!r} cannot be a snapshot path: it must name an object, e.g. "
                                "s3://bucket/snapshots/checkpoint.bin (its data goes to checkpoint.bin.pyckpt/)")
    return bucket, key


def check_file_path(raw: str) -> None:
    """A filesystem snapshot path must name a file: "", "/", "dir/" would put the store beside or above it."""
    if os.path.basename(raw) in ("", ".", ".."):
        raise SnapshotPathError(f"{raw!r} cannot be a snapshot path: it must name a file, e.g. "
                                "/shared/snapshots/checkpoint.bin (its data goes to checkpoint.bin.pyckpt/)")
