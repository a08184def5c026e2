"""Turn tensors into durable bytes: zero-copy views, batched writev, checksums, early writeback, fsync.

A data file is written in batches of up to 64 MiB straight from tensor memory (writev of views, no
copy). While one batch is written, its checksums are computed on a helper thread (xxh3 releases the
GIL), and each written batch is handed to the kernel for writeback at once (sync_file_range), so the
disk is busy while the next batch is written and the final fsync only waits for the tail.
"""
from __future__ import annotations

import ctypes
import ctypes.util
import errno
import os
import stat
import threading
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import torch

from .manifest import checksum
from .planner import Slice

_IOV_MAX = 1024               # iovecs per writev (Linux: IOV_MAX)
_BATCH_BUFFERS = 960          # buffers (pieces + alignment pads) per batch: one writev, one checksum job
_BATCH_BYTES = 64 << 20
_ZEROS = memoryview(bytes(64))
_SYNC_FILE_RANGE_WRITE = 2    # <linux/fs.h>: start writeback of dirty pages in the range, do not wait

_pool: ThreadPoolExecutor | None = None
_pool_pid = 0
_pool_lock = threading.Lock()


def helper_pool() -> ThreadPoolExecutor:
    """Threads for checksums and I/O (shared by writer and reader; work there releases the GIL).

    Recreated in a forked child, whose copy of the parent's pool has no threads."""
    global _pool, _pool_pid
    with _pool_lock:
        if _pool is None or _pool_pid != os.getpid():
            _pool = ThreadPoolExecutor(4, thread_name_prefix="pyckpt-io")
            _pool_pid = os.getpid()
        return _pool


def _load_libc(name: str, argtypes: list):
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or None, use_errno=True)
        fn = getattr(libc, name)
    except (OSError, AttributeError):  # not Linux/glibc: the plain path does all the work
        return None
    fn.argtypes = argtypes
    fn.restype = ctypes.c_int
    return fn


_sync_file_range = _load_libc("sync_file_range", [ctypes.c_int, ctypes.c_longlong, ctypes.c_longlong, ctypes.c_uint])
# fallocate(2), not posix_fallocate: where the filesystem cannot allocate (older NFS) it fails with
# EOPNOTSUPP instead of being emulated by writing every block twice.
_fallocate = _load_libc("fallocate", [ctypes.c_int, ctypes.c_int, ctypes.c_longlong, ctypes.c_longlong])


def preallocate(fd: int, size: int) -> None:
    """Reserve the file's blocks in one go before writing it (ext4/xfs: one allocation instead of one
    per writeback; measured here 0.55 s instead of 0.65-4 s for 1.5 GiB + fsync). A full disk fails
    now, before anything is written; a filesystem that cannot preallocate is simply written."""
    if _fallocate is None or size <= 0:
        return
    if _fallocate(fd, 0, 0, size) != 0:
        err = ctypes.get_errno()
        if err in (errno.ENOSPC, errno.EDQUOT, errno.EFBIG):
            raise OSError(err, f"cannot reserve {size} bytes: {os.strerror(err)}")


def start_writeback(fd: int, offset: int, length: int) -> None:
    """Ask the kernel to start writing this range to disk now (a hint: errors are ignored, fsync decides)."""
    if _sync_file_range is not None and length > 0:
        _sync_file_range(fd, offset, length, _SYNC_FILE_RANGE_WRITE)


# torch dtypes that Tensor.numpy() supports (not bfloat16, float8, ...)
_NUMPY_NATIVE = frozenset({torch.float16, torch.float32, torch.float64, torch.complex64, torch.complex128,
                          torch.int8, torch.int16, torch.int32, torch.int64, torch.uint8, torch.bool})


def byte_view(obj: torch.Tensor | np.ndarray) -> memoryview:
    """A flat uint8 view of a tensor's bytes (a copy only when it is on a GPU or not contiguous)."""
    if isinstance(obj, np.ndarray):
        return memoryview(np.ascontiguousarray(obj).reshape(-1).view(np.uint8))
    t = obj.detach() if obj.requires_grad else obj
    if not t.is_cpu:
        t = t.cpu()
    if not t.is_contiguous():
        t = t.contiguous()
    if t.nbytes == 0:
        return memoryview(b"")
    if t.dtype in _NUMPY_NATIVE:  # numpy's reshape/view cost half of torch's per call (20k tensors)
        return memoryview(t.numpy().reshape(-1).view(np.uint8))
    return memoryview(t.reshape(-1).view(torch.uint8).numpy())



def _digests(views: list[memoryview]) -> list[str]:
    return [checksum(v) for v in views]


def write_file(path: str, slices: list[tuple[Slice, memoryview]], size: int, reuse: str | None = None) -> list[str]:
    """Write `size` bytes made of the slices (in file order, gaps zero-filled), fsync, return checksums.

    `reuse`: a spare file (the data file of a version that is no longer committed) to move to `path`
    and overwrite in place instead of creating a new file; used only if it is a regular file that no
    version directory links any more."""
    pool = helper_pool()
    pending = []                                  # checksum futures, one per batch, in file order
    fd = _take_spare(reuse, path, size) if reuse else None
    if fd is None:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
    try:
        preallocate(fd, size)
        batch: list[memoryview] = []
        pieces: list[memoryview] = []
        batch_bytes = pos = flushed = 0
        zeros, max_pad = _ZEROS, len(_ZEROS)

        def flush() -> None:
            nonlocal batch, pieces, batch_bytes, flushed
            if pieces:
                pending.append(pool.submit(_digests, pieces))
            _writev_all(fd, batch)
            start_writeback(fd, flushed, pos - flushed)
            flushed = pos
            batch, pieces, batch_bytes = [], [], 0

        for piece, view in slices:
            _, src, offset, length = piece
            while pos < offset:          # alignment padding
                pad = zeros[: min(max_pad, offset - pos)]
                batch.append(pad)
                pos += len(pad)
            data = view if src == 0 and length == len(view) else view[src: src + length]
            pieces.append(data)
            batch.append(data)
            pos += length
            batch_bytes += length
            if len(batch) >= _BATCH_BUFFERS or batch_bytes >= _BATCH_BYTES:
                flush()
        while pos < size:
            pad = zeros[: min(max_pad, size - pos)]
            batch.append(pad)
            pos += len(pad)
        flush()
        os.fsync(fd)
    finally:
        os.close(fd)
    return [digest for future in pending for digest in future.result()]


def _take_spare(spare: str, path: str, size: int) -> int | None:
    """Move a spare data file to `path` and open it for overwriting; None (and no spare) if unusable.

    Overwriting a file's existing blocks is faster than allocating new ones (here 0.35 s vs 0.55-4 s
    for 1.5 GiB + fsync: ext4 with online discard on a thin-provisioned virtual disk), and deleting
    the old version then only removes a name instead of freeing 1.5 GiB. A spare still linked from a
    version directory (st_nlink > 1: the writer crashed before that version was dropped from the
    record) is never written to."""
    try:
        os.rename(spare, path)
    except OSError:
        return None
    try:
        fd = os.open(path, os.O_WRONLY | os.O_NOFOLLOW)
    except OSError:
        os.unlink(path)
        return None
    try:
        info = os.fstat(fd)
        if not stat.S_ISREG(info.st_mode) or info.st_nlink != 1:
            raise OSError("spare data file is still part of a version")
        if info.st_size != size:
            os.ftruncate(fd, size)
    except OSError:
        os.close(fd)
        os.unlink(path)
        return None
    return fd


def _writev_all(fd: int, buffers: list[memoryview]) -> None:
    i, count = 0, len(buffers)
    while i < count:
        written = os.writev(fd, buffers[i: i + _IOV_MAX])
        # Skip what was written; a short write leaves part of one buffer.
        while i < count and written >= len(buffers[i]):
            written -= len(buffers[i])
            i += 1
        if written:
            buffers[i] = buffers[i][written:]


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
