"""The POSIX backend of the storage seam (storage.py): snapshots in a directory on a local disk or NFS.

For a user path P (e.g. /shared/snapshots/checkpoint.bin):
  P                      the commit record: names the committed versions, newest first
  P.pyckpt/v00000012/    one committed version: manifest.json + data-<rank>.bin
  P.pyckpt/v00000013.stage-<id>/   a snapshot being written (ignored by readers)
  P.pyckpt/.lock         flock held by the writing leader or gc; it names its holder (pid, host, since)
  P.pyckpt/.spare/       data files of a dropped version, overwritten by the next snapshot (reuse_files)
A version becomes visible only when the record at P is atomically replaced (write, fsync, rename,
fsync dir) after every data file and the manifest are durable. Every file operation goes through
safe_fs (no symlink followed); data files are written by writer.py (O_DIRECT where allowed).
"""
from __future__ import annotations

import ctypes
import errno
import mmap
import fcntl
import json
import logging
import os
import re
import socket
import stat
import time
import uuid
from contextlib import contextmanager, suppress
from typing import Iterator

import numpy as np

from . import safe_fs
from .testhooks import crash_point
from .errors import IntegrityError, PyckptError, SnapshotNotFoundError
from .manifest import MAX_MANIFEST, CommitRecord, Manifest, VersionRef, checksum, data_file_name
from .paths import check_file_path
from .planner import Slice
from .storage import (LOCK, LOCK_WAIT, MANIFEST, SUFFIX, DataSource, Stage, Uncommitted,
                      next_version, verified_manifest, wait_for_lock)
from .sysio import libc_function
from .writer import write_file

log = logging.getLogger("pyckpt")
SPARE_DIR = ".spare"          # under P.pyckpt/: data files of a dropped version, overwritten by the next snapshot
_NUMBERED = re.compile(r"^v([0-9]{8})(\.stage-[0-9a-f]+)?$")
_DATA_FILE = re.compile(r"^data-[0-9]+\.bin$")
_MAX_RECORD = 1 << 20
_DIR_MODE = 0o755           # snapshots are readable by the cluster, writable only by their owner
_LEFTOVER_MANIFEST = 64 << 20   # ls shows step/epoch of a stage from its manifest only up to this size


class PosixStore:
    def __init__(self, path: str | os.PathLike):
        raw = os.fspath(path)
        check_file_path(raw)
        self.path = os.path.abspath(raw)
        self.root = self.path + SUFFIX

    # -- reading ---------------------------------------------------------------------------
    def exists(self) -> bool:
        """Whether anything is at P (read_commit says whether it is a valid record)."""
        return safe_fs.lstat(self.path) is not None

    def read_commit(self) -> CommitRecord:
        try:
            data = safe_fs.read_file(self.path, _MAX_RECORD, "commit record")
        except FileNotFoundError:
            raise SnapshotNotFoundError(
                f"no snapshot at {self.path}; check the path (and that the shared filesystem is mounted), "
                "or pass missing_ok=True to start fresh"
            ) from None
        return CommitRecord.from_json(data, self.path)

    def version_dir(self, name: str) -> str:
        return os.path.join(self.root, name)

    def read_manifest(self, ref: VersionRef) -> Manifest:
        directory = self.version_dir(ref.name)
        where = os.path.join(directory, MANIFEST)
        if not (safe_fs.is_dir(self.root) and safe_fs.is_dir(directory)):
            raise IntegrityError(f"{directory}: directory of version {ref.name}, committed in {self.path}, is "
                                 "missing (deleted, or the record was edited)", file=where)
        try:
            data = safe_fs.read_file(where, min(ref.manifest_size, MAX_MANIFEST), "manifest")
        except FileNotFoundError:
            raise IntegrityError(f"{where}: manifest of version {ref.name}, committed in {self.path}, is missing",
                                 file=where) from None
        return verified_manifest(data, ref, where, self.path)

    def where(self, name: str, file: str | None = None) -> str:
        return os.path.join(self.version_dir(name), file) if file else self.version_dir(name)

    def open_data(self, ref: VersionRef, manifest: Manifest) -> dict[int, DataSource]:
        """Open every data file of the version (regular files, no links) and check its size against
        the manifest before any tensor memory is allocated."""
        sources: dict[int, DataSource] = {}
        try:
            for index, record in enumerate(manifest.files):
                path = self.where(ref.name, record.name)
                try:
                    fd, info = safe_fs.open_file(path)
                except FileNotFoundError:
                    raise IntegrityError(f"{path}: data file missing", file=path) from None
                sources[index] = PosixSource(fd, path, info.st_size)
                if info.st_size != record.size:
                    raise IntegrityError(f"{path}: {info.st_size} bytes on disk, manifest says {record.size} "
                                         "(truncated or replaced)", file=path)
        except BaseException:
            for source in sources.values():
                source.close()
            raise
        return sources

    def uncommitted(self) -> list[Uncommitted]:
        """Stages and unlisted versions in P.pyckpt (a directory that cannot be listed is one "broken" entry)."""
        try:
            record = self.committed()
        except PyckptError:   # a damaged record names nothing: every version shows up
            record = None
        listed = {v.name for v in record.versions} if record else set()
        try:
            entries = sorted(safe_fs.list_dir(self.root))
        except FileNotFoundError:
            return []
        except PyckptError as exc:
            return [Uncommitted("-", "broken", None, 0, None, str(exc))]
        out = []
        for entry in entries:
            match = _NUMBERED.match(entry)
            if match and entry not in listed:
                found = self._leftover(entry, "stage" if match.group(2) else "orphan")
                if found is not None:
                    out.append(found)
        return out

    def _leftover(self, entry: str, status: str) -> Uncommitted | None:
        """A stage or unlisted version (None if it was removed meanwhile)."""
        directory = os.path.join(self.root, entry)
        info = None
        try:
            info = safe_fs.lstat(directory)
            if info is None:
                return None
            if not stat.S_ISDIR(info.st_mode):
                raise safe_fs.refused(directory, info.st_mode, "directory")
            size = _dir_bytes(directory)
        except FileNotFoundError:
            return None
        except PyckptError as exc:
            return Uncommitted(entry, "broken", info.st_mtime if info else None, 0, None, str(exc))
        return Uncommitted(entry, status, info.st_mtime, size, _leftover_manifest(os.path.join(directory, MANIFEST)))

    # -- writing (leader only, under lock) -------------------------------------------------
    @contextmanager
    def locked(self, what: str = "snapshot") -> Iterator[None]:
        """Hold the path's lock (P.pyckpt/.lock) for `what` ("snapshot" or "gc"), writing who holds it
        into the file for the messages of the others. Held by a snapshot: SnapshotLockedError at once
        (another job); held by gc (short maintenance): wait up to LOCK_WAIT seconds first."""
        safe_fs.is_file(self.path)  # P is a record or nothing: refused before P.pyckpt is made next to it
        safe_fs.make_dirs(self.root, _DIR_MODE)
        where = os.path.join(self.root, LOCK)
        fd, _ = safe_fs.open_file(where, os.O_RDWR | os.O_CREAT)
        try:
            self._acquire(fd, where)
            holder = {"pid": os.getpid(), "host": socket.gethostname(), "what": what, "since": time.time()}
            with suppress(OSError):  # only for messages: gc must run on a full disk
                os.ftruncate(fd, 0)
                os.pwrite(fd, json.dumps(holder).encode(), 0)
            try:
                yield
            finally:
                with suppress(OSError):  # an empty file: free, or being taken (waiters read it that way)
                    os.ftruncate(fd, 0)
        finally:
            os.close(fd)

    def _acquire(self, fd: int, where: str) -> None:
        """flock the lock file, waiting while gc holds it (or its holder has not said who it is yet)."""
        deadline = time.monotonic() + LOCK_WAIT
        while True:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                return
            except OSError as exc:
                if exc.errno not in (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES):
                    raise
            wait_for_lock(self.path, where, _holder(fd), deadline)

    def committed(self) -> CommitRecord | None:
        """The record, or None if there is none yet. A record that is there but cannot be read raises:
        whoever deletes versions must never take it for "no snapshot yet"."""
        try:
            return self.read_commit()
        except SnapshotNotFoundError:  # raised only when nothing is at P
            return None

    def _leftovers(self, keep: set[str]) -> list[str]:
        """Version and stage directories in P.pyckpt that are not in `keep`, sorted; an entry of such a
        name that is not a real directory is refused before anything is removed."""
        names = sorted(e for e in safe_fs.list_dir(self.root) if _NUMBERED.match(e) and e not in keep)
        return [e for e in names if safe_fs.is_dir(os.path.join(self.root, e))]

    def begin(self) -> Stage:
        """Clean leftovers of crashed writers, then create a stage directory."""
        record = self.committed()
        committed = [int(v.name[1:]) for v in record.versions] if record else []
        leftovers = self._leftovers({v.name for v in record.versions} if record else set())
        tmps = self._record_tmps()
        for entry in leftovers:
            safe_fs.remove_tree(os.path.join(self.root, entry))
        for tmp in tmps:
            safe_fs.remove_file(tmp)
        name = next_version(self.path, committed, [int(e[1:9]) for e in leftovers])
        stage = os.path.join(self.root, f"{name}.stage-{uuid.uuid4().hex[:12]}")
        safe_fs.make_dir(stage, _DIR_MODE)
        crash_point("stage-created")
        return Stage(name, stage)

    def write_data(self, stage: Stage, rank: int, segments: list[tuple[Slice, memoryview]], size: int,
                   reuse: bool = False) -> list[str]:
        name = data_file_name(rank)
        spare = os.path.join(self.root, SPARE_DIR, name) if reuse else None
        return write_file(os.path.join(stage.handle, name), segments, size, reuse=spare)

    def keep_spares(self, keep_last: int | None) -> None:
        """Leader, under the lock, before publishing: hard-link the data files of the newest version that
        this commit drops from the record into P.pyckpt/.spare/, so deleting that version only removes
        names and the next snapshot overwrites these files in place (writer._take_spare). Until the new
        record is in place the spares are still linked from their committed version (st_nlink 2), and a
        writer never overwrites such a file. keep_last None: remove the spares (reuse turned off)."""
        spare_dir = os.path.join(self.root, SPARE_DIR)
        if safe_fs.is_dir(spare_dir):
            for entry in safe_fs.list_dir(spare_dir):  # spares nobody took (fewer ranks now, or reuse turned off)
                safe_fs.remove_file(os.path.join(spare_dir, entry))
        if keep_last is None:
            return
        record = self.committed()
        dropped = record.versions[keep_last - 1:] if record else []
        if not dropped:
            return
        source = self.version_dir(dropped[0].name)
        try:
            safe_fs.make_dir(spare_dir, _DIR_MODE)
            for entry in safe_fs.list_dir(source):
                if _DATA_FILE.match(entry):
                    safe_fs.link_file(os.path.join(source, entry), os.path.join(spare_dir, entry))
        except OSError as exc:  # no hard links (some filesystems): the old version is simply deleted
            log.debug("pyckpt: no spare data files kept: %s", exc)

    def publish(self, stage: Stage, manifest: bytes, meta: dict, keep_last: int) -> CommitRecord:
        """Make the staged version the current one. Data files must already be durable. The versions
        the new record drops stay on disk until gc() (the coordinator runs it on a helper thread).
        If this fails, the version is removed again unless the record already names it."""
        name = stage.name
        safe_fs.write_new_file(os.path.join(stage.handle, MANIFEST), manifest)
        safe_fs.fsync_dir(stage.handle)
        crash_point("manifest-written")
        ref = VersionRef(name, checksum(manifest), len(manifest), meta.get("step"), meta.get("epoch"),
                         meta.get("created"))
        previous = self.committed()
        record = CommitRecord([ref] + (previous.versions[: max(0, keep_last - 1)] if previous else []))
        os.rename(stage.handle, self.version_dir(name))
        try:
            safe_fs.fsync_dir(self.root)
            crash_point("stage-renamed")
            self._replace_record(record)
        except BaseException:
            self._drop_unpublished(name)
            raise
        crash_point("record-renamed")
        return record

    def _drop_unpublished(self, name: str) -> None:
        """After a failed publish: remove the version unless the record names it (the failure may have
        come after the rename over P). If the record cannot be read, gc decides later."""
        try:
            record = self.committed()
        except (PyckptError, OSError):
            return
        if record is None or name not in {v.name for v in record.versions}:
            safe_fs.remove_tree(self.version_dir(name))

    def _replace_record(self, record: CommitRecord) -> None:
        """Atomically replace the record at P: write a tmp file, fsync, rename over P, fsync the dir."""
        tmp = f"{self.path}.tmp-{uuid.uuid4().hex[:12]}"
        safe_fs.write_new_file(tmp, record.to_json())
        try:
            crash_point("record-tmp-written")
            os.rename(tmp, self.path)
        except BaseException:
            with suppress(OSError):
                safe_fs.remove_file(tmp)
            raise
        safe_fs.fsync_dir(os.path.dirname(self.path))

    def _record_tmps(self) -> list[str]:
        """Record tmp files left next to P by writers that crashed; one that is not a regular file is
        refused before anything is removed."""
        parent, base = os.path.split(self.path)
        pattern = re.compile(re.escape(base) + r"\.tmp-[0-9a-f]{12}$")
        try:
            names = sorted(e for e in safe_fs.list_dir(parent, user_dir=True) if pattern.match(e))
        except FileNotFoundError:
            return []
        return [os.path.join(parent, e) for e in names if safe_fs.is_file(os.path.join(parent, e))]

    def abort(self, stage: Stage) -> None:
        safe_fs.remove_tree(stage.handle)

    def gc(self, keep_last: int, spares: bool = False, dry_run: bool = False) -> list[str]:
        """Trim history to keep_last versions and remove stages, unlisted versions and stale record tmps;
        with spares=True also the spare data files kept for reuse_files (SPARE_DIR). Returns the names
        removed under P.pyckpt/; dry_run=True decides the same way (under the lock) and removes nothing.

        Takes the path's lock (SnapshotLockedError while a snapshot is being written): never call it
        from inside `locked()`. A record that cannot be read raises: nothing is removed then.
        """
        if not safe_fs.is_dir(self.root) and not self.exists():
            return []
        with self.locked("gc"):
            record = self.committed()
            kept = record.versions[: max(1, keep_last)] if record else []
            removed = self._leftovers({v.name for v in kept})
            if spares and safe_fs.is_dir(os.path.join(self.root, SPARE_DIR)):
                removed.append(SPARE_DIR)  # only names: committed versions keep their links
            tmps = self._record_tmps()
            if dry_run:
                return removed
            if record and len(kept) < len(record.versions):
                self._replace_record(CommitRecord(kept))
            for tmp in tmps:
                safe_fs.remove_file(tmp)
            for entry in removed:
                safe_fs.remove_tree(os.path.join(self.root, entry))
            return removed


def _holder(fd: int) -> dict:
    """Who holds the lock, as its holder wrote it into the lock file ({} if not (yet) written)."""
    try:
        holder = json.loads(os.pread(fd, 4096, 0) or b"{}")
    except (OSError, ValueError):
        return {}
    return holder if isinstance(holder, dict) else {}


def _dir_bytes(directory: str) -> int:
    """Bytes of the regular files in a real directory (links are not followed)."""
    total = 0
    for entry in safe_fs.list_dir(directory):
        info = safe_fs.lstat(os.path.join(directory, entry))
        if info is not None and stat.S_ISREG(info.st_mode):
            total += info.st_size
    return total


def _leftover_manifest(path: str) -> Manifest | None:
    """A crash between writing the manifest and publishing leaves it in the stage: ls shows its step."""
    try:
        return Manifest.from_json(safe_fs.read_file(path, _LEFTOVER_MANIFEST, "manifest"), path)
    except (OSError, PyckptError):
        return None


def snapshot_paths(path: str | os.PathLike) -> list[str]:
    """PATH itself if it is a snapshot path, else every snapshot path directly inside directory PATH."""
    path = os.path.abspath(os.fspath(path))
    if path.endswith(SUFFIX) and _is_root(path):
        return [path[: -len(SUFFIX)]]
    if not os.path.isdir(path):
        if not (os.path.lexists(path) or os.path.lexists(path + SUFFIX)):
            raise SnapshotNotFoundError(f"{path}: no such snapshot path or directory")
        return [path]
    return sorted(os.path.join(path, entry[: -len(SUFFIX)]) for entry in safe_fs.list_dir(path, user_dir=True)
                  if entry.endswith(SUFFIX) and entry != SUFFIX and _is_root(os.path.join(path, entry)))


def _is_root(path: str) -> bool:
    """Whether path is a P.pyckpt directory, or a link in its place (listed so that the commands refuse
    it by name instead of skipping it)."""
    info = safe_fs.lstat(path)
    return info is not None and (stat.S_ISDIR(info.st_mode) or stat.S_ISLNK(info.st_mode))


class PosixSource:
    """A data file open for reading: preadv at any offset, the page cache asked with mincore, and a
    second O_DIRECT descriptor on request."""

    job_bytes = 16 << 20      # one preadv: large enough for the disk's full speed, small enough to share out

    def __init__(self, fd: int, where: str, size: int):
        self.fd, self.where, self.size = fd, where, size

    def read_into(self, offset: int, buffers: list[memoryview]) -> int:
        return os.preadv(self.fd, buffers, offset)

    def cached(self, start: int, end: int) -> bool:
        return _in_page_cache(self.fd, start, end)

    def direct(self) -> "PosixSource | None":
        try:
            return PosixSource(safe_fs.reopen(self.fd, os.O_RDONLY | os.O_DIRECT), self.where, self.size)
        except OSError:   # the filesystem refuses O_DIRECT (tmpfs, some FUSE)
            return None

    def copy(self) -> "PosixSource":
        return PosixSource(os.dup(self.fd), self.where, self.size)

    def close(self) -> None:
        fd, self.fd = self.fd, -1
        if fd >= 0:
            os.close(fd)


_mmap = libc_function("mmap", [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int, ctypes.c_int, ctypes.c_int,
                                ctypes.c_long], ctypes.c_void_p)
_mincore = libc_function("mincore", [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_char_p])
_munmap = libc_function("munmap", [ctypes.c_void_p, ctypes.c_size_t])
_MAP_FAILED = ctypes.c_void_p(-1).value


def _in_page_cache(fd: int, start: int, end: int) -> bool:
    """Whether every page of [start, end) of the file is in the page cache (mincore on a mapping that
    is never touched: no I/O). Such a range is copied from the cache, not read from the disk again."""
    if _mmap is None or _mincore is None or _munmap is None or end <= start:
        return False
    first = start - start % mmap.PAGESIZE
    length = end - first
    addr = _mmap(None, length, mmap.PROT_READ, mmap.MAP_SHARED, fd, first)
    if addr in (None, _MAP_FAILED):
        return False
    try:
        pages = ctypes.create_string_buffer(-(-length // mmap.PAGESIZE))
        if _mincore(addr, length, pages) != 0:
            return False
        return bool((np.frombuffer(pages, dtype=np.uint8) & 1).all())   # bit 0: resident
    finally:
        _munmap(addr, length)
