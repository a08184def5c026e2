"""Ranks on one machine read a replicated state once between them.

Each rank reads a share of the read jobs from the files (O_DIRECT, so every byte comes off the disk
once) and, while it does, copies the jobs its peers have finished straight out of their memory with
process_vm_readv (cross-memory attach, as MPI libraries do inside a node): one memory copy into the
destination tensors, no staging buffer and no page cache in between. Every copied piece is checked
against its checksum. A job that cannot be copied (the kernel refuses: ptrace rules, seccomp; the
peer failed to read it; a checksum does not match; the peer makes no progress) is read from the
files instead.
"""
from __future__ import annotations

import ctypes
import logging
import os
import time
from contextlib import contextmanager
from typing import Iterator, NamedTuple

from .reader import DONE, TensorRead
from .sysio import libc_function

log = logging.getLogger("pyckpt")


class Offer(NamedTuple):
    """What the peers need to copy one rank's share out of its memory."""

    pid: int
    progress_address: int                      # its TensorRead.progress bytes
    extents: dict[int, list[tuple[int, int]]]  # per job of its share: (address, length) of each piece


# Once its own share is read, a rank waits this long (or as long as its own share took, if longer)
# for the next peer job to finish, then reads what is still missing itself: a peer stuck in a read
# (a hung NFS server, a stopped process) must not hang its peers forever; they go on to the
# collective that ends the restore, which fails with the process group's timeout if it never comes.
PEER_PATIENCE = 2.0


def share(sizes: list[int], parts: int, part: int) -> list[int]:
    """The jobs (indices into `sizes`, bytes per job in file order) that reader `part` of `parts`
    reads: consecutive jobs of about equal bytes, so each reader reads a contiguous stretch."""
    total = sum(sizes) or 1
    out, before = [], 0
    for j, size in enumerate(sizes):
        if min((2 * before + size) * parts // (2 * total), parts - 1) == part:   # where the job's middle falls
            out.append(j)
        before += size
    return out


def offer(read: TensorRead, parts: int, part: int) -> Offer:
    """What the peers need to copy this rank's share: its pid, where its progress bytes are, and
    where each piece of its jobs lives in its memory."""
    return Offer(os.getpid(), read.progress_address,
                 {j: read.extents([j]) for j in share(read.job_sizes(), parts, part)})


def read_shared(read: TensorRead, offers: list[Offer], part: int) -> None:
    """Read share `part` of the jobs from the files and copy the others from the peers that read
    them (offers[i]: peer i's, from offer()), as each finishes; what peers still have not read
    PEER_PATIENCE s after our own share (and their last finished job) is read from the files. Raises
    the first error of this rank's own reads."""
    running = read.start(list(offers[part].extents))      # our own offer lists the jobs of our share
    waiting = {i: list(peer.extents) for i, peer in enumerate(offers) if i != part}
    from_files: list[int] = []
    progress = bytearray(len(read.jobs))               # a peer's progress bytes, fetched on each pass
    progress_extent = [(ctypes.addressof((ctypes.c_char * len(progress)).from_buffer(progress)), len(progress))]
    started = last_ready = time.monotonic()
    own_done_at = None                                 # when our own share was read
    try:
        while waiting:
            copied_any = False
            for i in list(waiting):
                pid, progress_address, extents = offers[i]
                if not copy_from(pid, [(progress_address, len(progress))], progress_extent):
                    from_files += waiting.pop(i)        # cannot see the peer: read the rest ourselves
                    continue
                ready = [j for j in waiting[i] if progress[j]]
                waiting[i] = [j for j in waiting[i] if not progress[j]]
                if not waiting[i]:
                    del waiting[i]
                done = [j for j in ready if progress[j] == DONE]
                from_files += [j for j in ready if progress[j] != DONE]
                if done and copy_from(pid, [e for j in done for e in extents[j]], read.extents(done)):
                    from_files += [j for j in done if not read.intact([j])]   # a copy is checked like a read
                else:
                    from_files += done
                copied_any = copied_any or bool(ready)
            now = time.monotonic()
            if copied_any:
                last_ready = now
            if own_done_at is None and running.done():
                own_done_at = now
            if waiting and own_done_at is not None and \
                    now - max(last_ready, own_done_at) > max(PEER_PATIENCE, own_done_at - started):
                stuck = [j for jobs in waiting.values() for j in jobs]
                log.warning("peer processes %s on this machine finished no read job for %.1f s; reading "
                            "their %d remaining jobs (%.0f MiB) from the files", sorted(offers[i].pid for i in waiting),
                            now - last_ready, len(stuck), sum(read.job_sizes()[j] for j in stuck) / (1 << 20))
                from_files += stuck
                waiting.clear()
            if waiting and not copied_any:
                time.sleep(0.001)
    finally:
        running.wait()                                   # our own reads (their first error is raised)
    if from_files:
        read.run(sorted(from_files), direct=False)       # peers in the same spot share the page cache


class _IoVec(ctypes.Structure):
    _fields_ = [("iov_base", ctypes.c_void_p), ("iov_len", ctypes.c_size_t)]


_IOV_MAX = 1024       # iovecs per process_vm_readv call (Linux UIO_MAXIOV)
_process_vm_readv = libc_function(
    "process_vm_readv", [ctypes.c_int, ctypes.POINTER(_IoVec), ctypes.c_ulong, ctypes.POINTER(_IoVec),
                         ctypes.c_ulong, ctypes.c_ulong], ctypes.c_ssize_t)


def copy_from(pid: int, remote: list[tuple[int, int]], local: list[tuple[int, int]]) -> bool:
    """Copy the (address, length) extents of process `pid` into ours, extent by extent. False if the
    two lists do not match or the kernel turns the copy down (nothing is half-trusted: the caller
    then reads those bytes from the files)."""
    if _process_vm_readv is None or [n for _, n in remote] != [n for _, n in local]:
        return False
    for first in range(0, len(local), _IOV_MAX):
        chunk = range(first, min(first + _IOV_MAX, len(local)))
        mine = (_IoVec * len(chunk))(*[_IoVec(*local[i]) for i in chunk])
        theirs = (_IoVec * len(chunk))(*[_IoVec(*remote[i]) for i in chunk])
        want = sum(local[i][1] for i in chunk)
        # Partial copies happen only at extent boundaries (EFAULT/EPERM on one): treat as refused.
        if _process_vm_readv(pid, mine, len(chunk), theirs, len(chunk), 0) != want:
            return False
    return True


_PR_SET_PTRACER = 0x59616D61
_PR_SET_PTRACER_ANY = ctypes.c_ulong(-1).value
_prctl = libc_function("prctl", [ctypes.c_int, ctypes.c_ulong, ctypes.c_ulong, ctypes.c_ulong, ctypes.c_ulong])


@contextmanager
def readable_by_peers() -> Iterator[None]:
    """Let processes of our user read this one's memory for the block. Only needed under Yama
    ptrace_scope 1 (Ubuntu's default), where a process may otherwise read only its descendants'
    memory; the permission is withdrawn again on the way out. Scopes 2 and 3 forbid it outright
    (copy_from then fails and the ranks read from the files)."""
    try:
        with open("/proc/sys/kernel/yama/ptrace_scope") as f:
            scope = f.read().strip()
    except OSError:
        scope = "0"
    relaxed = scope == "1" and _prctl is not None and _prctl(_PR_SET_PTRACER, _PR_SET_PTRACER_ANY, 0, 0, 0) == 0
    try:
        yield
    finally:
        if relaxed:
            _prctl(_PR_SET_PTRACER, 0, 0, 0, 0)
