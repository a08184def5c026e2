"""Where snapshots live: a POSIX directory (local disk or NFS), published atomically.

For a user path P (e.g. /shared/snapshots/checkpoint.bin):
  P                      the commit record: names the committed versions, newest first
  P.pyckpt/v00000012/    one committed version: manifest.json + data-<rank>.bin
  P.pyckpt/v00000013.stage-<id>/   a snapshot being written (ignored by readers)
  P.pyckpt/.lock         flock held by the writing leader
A version becomes visible only when the record at P is atomically replaced (write, fsync, rename,
fsync dir) after every data file and the manifest are durable.
"""
from __future__ import annotations

import errno
import fcntl
import os
import re
import shutil
import signal
import stat
import uuid
from contextlib import contextmanager
from typing import Iterator

from .errors import IntegrityError, SnapshotLockedError, SnapshotNotFoundError
from .manifest import CommitRecord, Manifest, VersionRef, checksum
from .writer import fsync_dir, write_bytes_durably

MANIFEST = "manifest.json"
SPARE_DIR = ".spare"          # under P.pyckpt/: data files of a dropped version, overwritten by the next snapshot
_NUMBERED = re.compile(r"^v([0-9]{8})(\.stage-[0-9a-f]+)?$")
_MAX_RECORD = 1 << 20
_MAX_MANIFEST = 1 << 30
_DIR_MODE = 0o755           # snapshots are readable by the cluster, writable only by their owner
_crash_hits: dict[str, int] = {}


def _crash_point(name: str) -> None:
    """Test hook (tests/reliability): PYCKPT_TEST_CRASH_AT=name[:n] SIGKILLs this process at the n-th `name`."""
    wanted = os.environ.get("PYCKPT_TEST_CRASH_AT")
    if not wanted or wanted.partition(":")[0] != name:
        return
    _crash_hits[name] = _crash_hits.get(name, 0) + 1
    if _crash_hits[name] == int(wanted.partition(":")[2] or 1):
        os.kill(os.getpid(), signal.SIGKILL)


def _makedirs(path: str) -> None:
    """os.makedirs with an explicit mode for every level (its parents otherwise get 0o777 & ~umask)."""
    if os.path.isdir(path):
        return
    parent = os.path.dirname(path)
    if parent and parent != path:
        _makedirs(parent)
    try:
        os.mkdir(path, _DIR_MODE)
    except FileExistsError:
        if not os.path.isdir(path):
            raise


class SnapshotStore:
    def __init__(self, path: str | os.PathLike):
        self.path = os.path.abspath(os.fspath(path))
        self.root = self.path + ".pyckpt"

    # -- reading ---------------------------------------------------------------------------
    def exists(self) -> bool:
        return os.path.isfile(self.path)

    def read_commit(self) -> CommitRecord:
        if os.path.isdir(self.path):
            raise SnapshotNotFoundError(f"{self.path} is a directory, not a pyckpt snapshot path")
        try:
            with open(self.path, "rb") as f:
                data = f.read(_MAX_RECORD + 1)
        except FileNotFoundError:
            raise SnapshotNotFoundError(
                f"no snapshot at {self.path}; check the path (and that the shared filesystem is mounted), "
                "or pass missing_ok=True to start fresh"
            ) from None
        if len(data) > _MAX_RECORD:
            raise IntegrityError(f"{self.path}: too large for a commit record; not a pyckpt snapshot", file=self.path)
        return CommitRecord.from_json(data, self.path)

    def version_dir(self, name: str) -> str:
        return os.path.join(self.root, name)

    def read_manifest(self, ref: VersionRef) -> Manifest:
        directory = self.version_dir(ref.name)
        where = os.path.join(directory, MANIFEST)
        try:
            info = os.lstat(directory)
        except FileNotFoundError:
            raise IntegrityError(f"{directory}: directory of version {ref.name}, committed in {self.path}, "
                                 "is missing (deleted, or the record was edited)", file=where) from None
        if not stat.S_ISDIR(info.st_mode):  # a symlink could point the reader anywhere
            raise IntegrityError(f"{directory}: version {ref.name} is not a plain directory (symlink or file); "
                                 "refusing to read it", file=where)
        try:
            fd = os.open(where, os.O_RDONLY | os.O_NOFOLLOW)
        except FileNotFoundError:
            raise IntegrityError(f"{where}: manifest of version {ref.name}, committed in {self.path}, is missing",
                                 file=where) from None
        except OSError as exc:
            raise IntegrityError(f"{where}: cannot open manifest ({exc.strerror}); a symlink or unreadable "
                                 "manifest is not allowed", file=where) from None
        with os.fdopen(fd, "rb") as f:
            size = os.fstat(fd).st_size
            if size != ref.manifest_size or size > _MAX_MANIFEST:  # before reading: never allocate a claimed size
                raise IntegrityError(f"{where}: manifest is {size} bytes, {self.path} says {ref.manifest_size} "
                                     "(truncated, replaced or corrupted)", file=where)
            data = f.read(size + 1)
        if len(data) != ref.manifest_size or checksum(data) != ref.manifest_xxh3:
            raise IntegrityError(f"{where}: manifest does not match its checksum in {self.path} "
                                 "(corrupted or replaced)", file=where)
        return Manifest.from_json(data, where)

    # -- writing (leader only, under lock) -------------------------------------------------
    @contextmanager
    def locked(self) -> Iterator[None]:
        _makedirs(self.root)
        fd = os.open(os.path.join(self.root, ".lock"), os.O_RDWR | os.O_CREAT, 0o644)
        try:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except OSError as exc:
                if exc.errno not in (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES):
                    raise
                raise SnapshotLockedError(
                    f"another process is writing a snapshot to {self.path} (lock {self.root}/.lock is held); "
                    "two jobs must not share one snapshot path: give each job its own"
                ) from None
            yield
        finally:
            os.close(fd)

    def committed(self) -> CommitRecord | None:
        try:
            return self.read_commit()
        except SnapshotNotFoundError:
            return None

    def begin(self) -> tuple[str, str]:
        """Clean leftovers of crashed writers, then create a stage; returns (version name, stage dir)."""
        record = self.committed()
        keep = {v.name for v in record.versions} if record else set()
        numbers = [int(v.name[1:]) for v in record.versions] if record else []
        for entry in os.listdir(self.root):
            match = _NUMBERED.match(entry)
            if match:
                numbers.append(int(match.group(1)))
                if entry not in keep:
                    shutil.rmtree(os.path.join(self.root, entry), ignore_errors=True)
        self._drop_record_tmps()
        name = f"v{max(numbers, default=0) + 1:08d}"
        stage = os.path.join(self.root, f"{name}.stage-{uuid.uuid4().hex[:12]}")
        os.mkdir(stage, _DIR_MODE)
        _crash_point("stage-created")
        return name, stage

    def publish(self, stage: str, name: str, manifest: bytes, meta: dict, keep_last: int) -> CommitRecord:
        """Make the staged version the current one. Data files must already be durable. The versions
        the new record drops stay on disk until gc() (the coordinator runs it on a helper thread)."""
        write_bytes_durably(os.path.join(stage, MANIFEST), manifest)
        fsync_dir(stage)
        _crash_point("manifest-written")
        final = self.version_dir(name)
        os.rename(stage, final)
        fsync_dir(self.root)
        _crash_point("stage-renamed")
        ref = VersionRef(name, checksum(manifest), len(manifest), meta.get("step"), meta.get("epoch"),
                         meta.get("created"))
        previous = self.committed()
        older = previous.versions if previous else []
        record = CommitRecord([ref] + older[: max(0, keep_last - 1)])
        self._replace_record(record)
        _crash_point("record-renamed")
        return record

    def _replace_record(self, record: CommitRecord) -> None:
        """Atomically replace the record at P: write a tmp file, fsync, rename over P, fsync the dir."""
        tmp = f"{self.path}.tmp-{uuid.uuid4().hex[:12]}"
        try:
            write_bytes_durably(tmp, record.to_json())
            _crash_point("record-tmp-written")
            os.rename(tmp, self.path)
        except BaseException:
            try:
                os.unlink(tmp)
            except OSError:
                pass
            raise
        fsync_dir(os.path.dirname(self.path))

    def _drop_record_tmps(self) -> None:
        """Remove record tmp files left next to P by a writer that crashed (caller holds the lock)."""
        parent, base = os.path.split(self.path)
        pattern = re.compile(re.escape(base) + r"\.tmp-[0-9a-f]{12}$")
        for entry in os.listdir(parent) if os.path.isdir(parent) else []:
            if pattern.match(entry):
                try:
                    os.unlink(os.path.join(parent, entry))
                except FileNotFoundError:
                    pass

    def abort(self, stage: str) -> None:
        shutil.rmtree(stage, ignore_errors=True)

    def gc(self, keep_last: int, spares: bool = False) -> list[str]:
        """Trim history to keep_last versions and remove stages, unlisted versions and stale record tmps;
        with spares=True also the spare data files kept for reuse_files (SPARE_DIR).

        Takes the path's lock (SnapshotLockedError while a snapshot is being written): never call it
        from inside `locked()`.
        """
        if not os.path.isdir(self.root) and not self.exists():
            return []
        with self.locked():
            record = self.committed()
            if record and len(record.versions) > keep_last:
                record = CommitRecord(record.versions[: max(1, keep_last)])
                self._replace_record(record)
            self._drop_record_tmps()
            removed = self._drop_unlisted(record)
            spare_dir = os.path.join(self.root, SPARE_DIR)
            if spares and os.path.isdir(spare_dir):
                shutil.rmtree(spare_dir, ignore_errors=True)  # only names: committed versions keep their links
                removed.append(SPARE_DIR)
            return removed

    def _drop_unlisted(self, record: CommitRecord | None) -> list[str]:
        keep = {v.name for v in record.versions} if record else set()
        removed = []
        for entry in sorted(os.listdir(self.root)) if os.path.isdir(self.root) else []:
            if _NUMBERED.match(entry) and entry not in keep:
                shutil.rmtree(os.path.join(self.root, entry), ignore_errors=True)
                removed.append(entry)
        return removed
