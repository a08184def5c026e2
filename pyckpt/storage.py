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
import uuid
from contextlib import contextmanager
from typing import Iterator

from .errors import IntegrityError, SnapshotLockedError, SnapshotNotFoundError
from .manifest import CommitRecord, Manifest, VersionRef, checksum
from .writer import fsync_dir, write_bytes_durably

MANIFEST = "manifest.json"
_NUMBERED = re.compile(r"^v([0-9]{8})(\.stage-[0-9a-f]+)?$")
_MAX_RECORD = 1 << 20


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
        where = os.path.join(self.version_dir(ref.name), MANIFEST)
        try:
            with open(where, "rb") as f:
                data = f.read(ref.manifest_size + 1)
        except FileNotFoundError:
            raise IntegrityError(f"{where}: manifest missing for committed version {ref.name}", file=where) from None
        if len(data) != ref.manifest_size or checksum(data) != ref.manifest_xxh3:
            raise IntegrityError(f"{where}: manifest does not match its checksum in {self.path} "
                                 "(corrupted or replaced)", file=where)
        return Manifest.from_json(data, where)

    # -- writing (leader only, under lock) -------------------------------------------------
    @contextmanager
    def locked(self) -> Iterator[None]:
        os.makedirs(self.root, mode=0o755, exist_ok=True)
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
        name = f"v{max(numbers, default=0) + 1:08d}"
        stage = os.path.join(self.root, f"{name}.stage-{uuid.uuid4().hex[:12]}")
        os.mkdir(stage, 0o755)
        return name, stage

    def publish(self, stage: str, name: str, manifest: bytes, meta: dict, keep_last: int) -> CommitRecord:
        """Make the staged version the current one. Data files must already be durable."""
        write_bytes_durably(os.path.join(stage, MANIFEST), manifest)
        fsync_dir(stage)
        final = self.version_dir(name)
        os.rename(stage, final)
        fsync_dir(self.root)
        ref = VersionRef(name, checksum(manifest), len(manifest), meta.get("step"), meta.get("epoch"),
                         meta.get("created"))
        previous = self.committed()
        older = previous.versions if previous else []
        record = CommitRecord([ref] + older[: max(0, keep_last - 1)])
        tmp = f"{self.path}.tmp-{uuid.uuid4().hex[:12]}"
        write_bytes_durably(tmp, record.to_json())
        os.rename(tmp, self.path)
        fsync_dir(os.path.dirname(self.path))
        self._drop_unlisted(record)
        return record

    def abort(self, stage: str) -> None:
        shutil.rmtree(stage, ignore_errors=True)

    def gc(self, keep_last: int) -> list[str]:
        """Trim history to keep_last versions and remove stages and unlisted versions."""
        record = self.committed()
        if record and len(record.versions) > keep_last:
            record = CommitRecord(record.versions[: max(1, keep_last)])
            tmp = f"{self.path}.tmp-{uuid.uuid4().hex[:12]}"
            write_bytes_durably(tmp, record.to_json())
            os.rename(tmp, self.path)
            fsync_dir(os.path.dirname(self.path))
        return self._drop_unlisted(record)

    def _drop_unlisted(self, record: CommitRecord | None) -> list[str]:
        keep = {v.name for v in record.versions} if record else set()
        removed = []
        for entry in sorted(os.listdir(self.root)) if os.path.isdir(self.root) else []:
            if _NUMBERED.match(entry) and entry not in keep:
                shutil.rmtree(os.path.join(self.root, entry), ignore_errors=True)
                removed.append(entry)
        return removed
