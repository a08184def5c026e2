"""Timing helpers, page-cache dropping and the hardware limits (write+fdatasync, cold read, one copy)."""
from __future__ import annotations

import mmap
import os
import shutil
import statistics
import time
from typing import Callable

import torch

_CHUNK = 16 << 20


def median(values: list[float]) -> float:
    return statistics.median(values)


def spread(values: list[float]) -> float:
    """(max - min) / median: the run-to-run noise of one figure."""
    m = statistics.median(values)
    return (max(values) - min(values)) / m if m else 0.0


def files_under(path: str) -> list[str]:
    if os.path.isfile(path):
        return [path]
    out = []
    for root, _, names in os.walk(path):
        out.extend(os.path.join(root, n) for n in names)
    return out


def drop_cache(*paths: str, settle: float = 0.0) -> str:
    """Evict `paths` from the page cache, then wait `settle` seconds; returns the method used.

    "drop_caches": the whole page cache via /proc/sys/vm/drop_caches (needs root, not in every
    container); otherwise "fadvise": posix_fadvise(DONTNEED) on each file (evicts clean pages of
    those files only, which is what a cold restore needs).

    Why settle: on this VM a read started within seconds of a drop that freed much memory is slowed
    (likely the balloon's free page reporting handing the memory back to the host). Measured here (1.5 GiB restore, 1
    rank, drop before each): 0.72-0.88 s and 1.12-1.54 s alternating after a drop that freed 5 GiB,
    for as long as it was watched (12 s); 0.72-0.78 s every time with 4 s between drop and read."""
    os.sync()
    try:
        with open("/proc/sys/vm/drop_caches", "w") as f:
            f.write("1\n")
        time.sleep(settle)
        return "drop_caches"
    except OSError:
        pass
    for path in paths:
        for name in files_under(path):
            fd = os.open(name, os.O_RDONLY)
            try:
                os.fdatasync(fd)
                os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
            finally:
                os.close(fd)
    time.sleep(settle)
    return "fadvise"


def fsync_tree(path: str) -> None:
    """fsync every file and directory under path (durability for libraries that do not fsync)."""
    for name in files_under(path):
        fd = os.open(name, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
    dirs = [path] if os.path.isdir(path) else [os.path.dirname(path)]
    for d in dirs:
        fd = os.open(d, os.O_RDONLY | os.O_DIRECTORY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def clear(path: str) -> None:
    if os.path.isdir(path):
        shutil.rmtree(path)
    elif os.path.exists(path):
        os.unlink(path)


def timed(fn: Callable[[], object]) -> tuple[float, object]:
    start = time.perf_counter()
    out = fn()
    return time.perf_counter() - start, out


def pack(tensors: list[torch.Tensor], into: torch.Tensor) -> None:
    """One in-memory copy of every tensor's bytes into a preallocated buffer (the stall limit)."""
    pos = 0
    for t in tensors:
        n = t.numel() * t.element_size()
        into[pos: pos + n].copy_(t.reshape(-1).view(torch.uint8))
        pos += n


def write_limit(path: str, buffer: torch.Tensor, overwrite: bool = False) -> None:
    """Sequential write of the buffer in large chunks, then fdatasync: what the disk allows.

    overwrite=True writes over the blocks of an existing file of that size (no allocation): the limit
    for pyckpt with reuse_files=True, which overwrites the data files of a dropped version."""
    view = memoryview(buffer.numpy())
    fd = os.open(path, os.O_WRONLY if overwrite else os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
    try:
        for off in range(0, len(view), _CHUNK):
            chunk = view[off: off + _CHUNK]
            while chunk:
                chunk = chunk[os.write(fd, chunk):]
        os.fdatasync(fd)
    finally:
        os.close(fd)


def aligned_buffer(nbytes: int) -> torch.Tensor:
    """A touched uint8 tensor in 2 MiB-aligned memory backed by huge pages where the kernel gives
    them, nbytes rounded up to whole pages (O_DIRECT moves whole, aligned blocks; in scattered 4 KiB
    pages a 4 MiB transfer is cut into ~1 MiB requests and the "limit" would measure that instead)."""
    from pyckpt.sysio import aligned_buffers
    return torch.frombuffer(aligned_buffers(1, max(nbytes, 1) + (-nbytes % mmap.PAGESIZE))[0], dtype=torch.uint8)


def fresh_buffer(nbytes: int) -> torch.Tensor:
    """An untouched, page-aligned uint8 tensor: a new anonymous mapping, as the allocator gives a
    large new tensor. Reading into it pays for faulting the memory in, as any loader that returns
    new tensors does (on this VM 1.5 GiB of new memory costs 0.7-4.4 s before a byte is read)."""
    return torch.frombuffer(mmap.mmap(-1, max(nbytes, 1) + (-nbytes % mmap.PAGESIZE)), dtype=torch.uint8)


def write_direct_limit(path: str, buffer: torch.Tensor) -> bool:
    """Sequential O_DIRECT writes of an aligned_buffer (64 MiB each), then fdatasync: the disk
    without the page cache. False where the filesystem refuses O_DIRECT."""
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_DIRECT, 0o644)
    except OSError:
        return False
    try:
        view = memoryview(buffer.numpy())
        for off in range(0, len(view), 4 * _CHUNK):
            os.pwrite(fd, view[off: off + 4 * _CHUNK], off)
        os.fdatasync(fd)
    except OSError:
        return False
    finally:
        os.close(fd)
    return True


def read_direct_limit(path: str, buffer: torch.Tensor) -> bool:
    """Sequential O_DIRECT reads (64 MiB each) of the file into an aligned_buffer: the disk without
    the page cache. False where the filesystem refuses O_DIRECT."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_DIRECT)
    except OSError:
        return False
    try:
        view = memoryview(buffer.numpy())
        for off in range(0, len(view), 4 * _CHUNK):
            os.preadv(fd, [view[off: off + 4 * _CHUNK]], off)
    except OSError:
        return False
    finally:
        os.close(fd)
    return True


def read_limit(path: str, buffer: torch.Tensor) -> None:
    """Sequential read of the file into a preallocated buffer (cold when the cache was dropped)."""
    view = memoryview(buffer.numpy())
    with open(path, "rb", buffering=0) as f:
        pos = 0
        while pos < len(view):
            got = f.readinto(view[pos: pos + _CHUNK])
            if not got:
                break
            pos += got


def fs_type(path: str) -> str:
    """The filesystem type holding `path` (from /proc/mounts), so results say what they measured."""
    best, kind = "", "unknown"
    real = os.path.realpath(path)
    try:
        with open("/proc/mounts") as f:
            for line in f:
                parts = line.split()
                if len(parts) >= 3 and (real == parts[1] or real.startswith(parts[1].rstrip("/") + "/")) \
                        and len(parts[1]) >= len(best):
                    best, kind = parts[1], parts[2]
    except OSError:
        pass
    return kind
