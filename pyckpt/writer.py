"""Turn tensors into durable bytes: zero-copy views, batched writev, checksums, fsync."""
from __future__ import annotations

import os

import numpy as np
import torch

from .manifest import checksum
from .planner import Slice

_BATCH_BUFFERS = 512          # iovecs per writev (Linux allows 1024)
_BATCH_BYTES = 64 << 20
_ZEROS = memoryview(bytes(64))


def byte_view(obj: torch.Tensor | np.ndarray) -> memoryview:
    """A flat uint8 view of a tensor's bytes (a copy only when it is on a GPU or not contiguous)."""
    if isinstance(obj, np.ndarray):
        return memoryview(np.ascontiguousarray(obj).reshape(-1).view(np.uint8))
    t = obj.detach()
    if t.device.type != "cpu":
        t = t.cpu()
    t = t.contiguous().reshape(-1)
    if t.numel() == 0:
        return memoryview(b"")
    return memoryview(t.view(torch.uint8).numpy())


def write_file(path: str, slices: list[tuple[Slice, memoryview]], size: int) -> list[str]:
    """Write `size` bytes made of the slices (in file order, gaps zero-filled), fsync, return checksums."""
    digests: list[str] = []
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
    try:
        batch: list[memoryview] = []
        batch_bytes = pos = 0
        for piece, view in slices:
            while pos < piece.file_offset:          # alignment padding
                pad = _ZEROS[: min(len(_ZEROS), piece.file_offset - pos)]
                batch.append(pad)
                pos += len(pad)
            data = view[piece.src_offset: piece.src_offset + piece.length]
            digests.append(checksum(data))
            batch.append(data)
            pos += piece.length
            batch_bytes += piece.length
            if len(batch) >= _BATCH_BUFFERS or batch_bytes >= _BATCH_BYTES:
                _writev_all(fd, batch)
                batch, batch_bytes = [], 0
        while pos < size:
            pad = _ZEROS[: min(len(_ZEROS), size - pos)]
            batch.append(pad)
            pos += len(pad)
        _writev_all(fd, batch)
        os.fsync(fd)
    finally:
        os.close(fd)
    return digests


def _writev_all(fd: int, buffers: list[memoryview]) -> None:
    while buffers:
        written = os.writev(fd, buffers[:_BATCH_BUFFERS * 2])
        # Drop what was written; a short write leaves part of one buffer.
        while buffers and written >= len(buffers[0]):
            written -= len(buffers[0])
            buffers = buffers[1:]
        if written:
            buffers[0] = buffers[0][written:]


def write_bytes_durably(path: str, data: bytes) -> None:
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
    try:
        view = memoryview(data)
        while view:
            view = view[os.write(fd, view):]
        os.fsync(fd)
    finally:
        os.close(fd)


def fsync_dir(path: str) -> None:
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
