"""The storage seam: what pyckpt asks of the place where snapshots live, whatever that place is.

The coordinator, the reader, inspect and the CLI talk only to a `Store` and the `DataSource`s it opens;
every name and layout on the medium (directories, data file names, the lock, spares) belongs to the
backend. `stores.open_store(path)` picks the backend for a path; the POSIX directory (posix_store.py,
local disk or NFS) is the first. A new backend implements these two protocols and passes the contract
suite in tests/unit/test_store_contract.py (one fixture per backend).

The guarantees every backend gives (the contract suite checks them):
- a version is visible (read_commit/read_manifest) only after publish(), never half-made;
- publish() keeps the newest `keep_last` versions in the record; gc() deletes what the record no
  longer names, stages of crashed writers, and (spares=True) the spare data files;
- locked() admits one writer (SnapshotLockedError for the other), and gc waits briefly for it;
- a DataSource reads exactly the bytes written by write_data(), and says where it reads from.
"""
from __future__ import annotations

import time
from typing import ContextManager, NamedTuple, Protocol

from .errors import IntegrityError, SnapshotError, SnapshotLockedError
from .manifest import CommitRecord, Manifest, VersionRef, checksum
from .planner import Slice

# The layout every backend shares (docs/FORMAT.md): for a snapshot path P, the record at P and the
# versions under P + SUFFIX, each holding MANIFEST and one data file per rank.
SUFFIX = ".pyckpt"
MANIFEST = "manifest.json"
LOCK = ".lock"                # the writer's lock, under P + SUFFIX
LOCK_WAIT = 5.0               # seconds a writer waits while gc (short maintenance) holds the lock
MAX_VERSION = 99_999_999      # version names have 8 digits


def next_version(path: str, committed: list[int], leftovers: list[int]) -> str:
    """The name of the next version: after every number in use. Leftovers' numbers are not reused while
    there is room; past the 8 digits of the format only the committed ones count (the caller has just
    removed the leftovers)."""
    number = max(committed + leftovers, default=0) + 1
    if number > MAX_VERSION:
        number = max(committed, default=0) + 1
    if number > MAX_VERSION:
        raise SnapshotError(f"{path}: version numbers are used up (v{MAX_VERSION} is committed); "
                            "snapshot to a new path")
    return f"v{number:08d}"


def verified_manifest(data: bytes, ref: VersionRef, where: str, record: str) -> Manifest:
    """A version's manifest from its bytes, once they are what the commit record (at `record`) says."""
    if len(data) != ref.manifest_size:
        raise IntegrityError(f"{where}: manifest is {len(data)} bytes, {record} says {ref.manifest_size} "
                             "(truncated, replaced or corrupted)", file=where)
    if checksum(data) != ref.manifest_xxh3:
        raise IntegrityError(f"{where}: manifest does not match its checksum in {record} "
                             "(corrupted or replaced)", file=where)
    return Manifest.from_json(data, where)


def wait_for_lock(path: str, lock: str, holder: dict, deadline: float) -> None:
    """A writer found the lock taken: SnapshotLockedError at once if a snapshot holds it (another job),
    or once `deadline` (time.monotonic) has passed; otherwise it waits a moment and tries again."""
    if holder.get("what") == "snapshot":
        raise SnapshotLockedError(
            f"another process is writing a snapshot to {path} (lock {lock} held by "
            f"{lock_holder_text(holder)}); two jobs must not share one snapshot path: give each job its own")
    if time.monotonic() >= deadline:
        raise SnapshotLockedError(
            f"{path} is locked by {lock_holder_text(holder)} (lock {lock}) for more than {LOCK_WAIT:g} s; "
            "nothing was done: try again once it has finished")
    time.sleep(0.05)


def lock_holder_text(holder: dict) -> str:
    """Who holds a lock, from what its holder wrote into it ({pid, host, what, since}), for messages."""
    if not holder:
        return "a process that has not said who it is (it is just taking the lock, or is an older pyckpt)"
    since = holder.get("since")
    when = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(since)) \
        if type(since) in (int, float) and 0 <= since < 1e11 else "?"
    return f"pid {holder.get('pid')} on host {holder.get('host')} ({holder.get('what')} since {when})"


class Stage(NamedTuple):
    """A version being written: its name (v00000012) and the backend's handle for it."""

    name: str
    handle: str


class Uncommitted(NamedTuple):
    """Something under the snapshot path that no commit names: a stage left by a writer that crashed
    ("stage") or a version the record dropped but nobody deleted yet ("orphan"); for `pyckpt ls`."""

    name: str
    status: str                    # "stage" | "orphan" | "broken" (what it is cannot be read)
    created: float | None
    bytes: int
    manifest: Manifest | None      # when one was written (a crash between manifest and publish)
    error: str | None = None


class DataSource(Protocol):
    """One data file of a committed version, opened for ranged reads (and kept open: a version pruned
    meanwhile stays readable through it on backends that allow it)."""

    where: str                     # for messages: the path or URL of the file
    size: int
    job_bytes: int                 # neighbouring pieces up to this size are read with one request

    def read_into(self, offset: int, buffers: list[memoryview]) -> int:
        """Read from `offset` into the buffers in order; returns the bytes read (short only at the end
        of the file, 0 past it)."""

    def cached(self, start: int, end: int) -> bool:
        """Whether [start, end) is already in memory (reading it costs no I/O)."""

    def direct(self) -> "DataSource | None":
        """A source of the same file whose reads bypass the cache (buffers and offsets aligned to
        4096), or None where the backend has no such reads."""

    def copy(self) -> "DataSource":
        """An independent handle on the same file (closed separately)."""

    def close(self) -> None: ...


class Store(Protocol):
    """One snapshot path: its commit record, its versions and their data."""

    path: str                      # the user's path, as given (absolute), for messages

    # -- reading -------------------------------------------------------------------------------
    def exists(self) -> bool: ...

    def read_commit(self) -> CommitRecord:
        """The record; SnapshotNotFoundError only when nothing is there, IntegrityError if damaged."""

    def committed(self) -> CommitRecord | None:
        """read_commit(), or None when there is no record yet."""

    def read_manifest(self, ref: VersionRef) -> Manifest:
        """A committed version's manifest, size- and checksum-verified against the record."""

    def open_data(self, ref: VersionRef, manifest: Manifest) -> dict[int, DataSource]:
        """Every data file of the version, opened and size-checked against the manifest."""

    def where(self, name: str, file: str | None = None) -> str:
        """For messages: where a version (or one of its files) lives."""

    def uncommitted(self) -> list[Uncommitted]:
        """Everything that looks like a version but is not committed."""

    # -- writing -------------------------------------------------------------------------------
    def locked(self, what: str = "snapshot") -> ContextManager[None]:
        """The path's writer lock: "snapshot" (a job) or "gc" (maintenance)."""

    def begin(self) -> Stage:
        """Leader, under the lock: clean leftovers of crashed writers and start a new version."""

    def write_data(self, stage: Stage, rank: int, segments: list[tuple[Slice, memoryview]], size: int,
                   reuse: bool = False) -> list[str]:
        """Any rank: write and make durable this rank's data file of the stage; returns the xxh3 of
        each segment. `reuse`: overwrite a spare file of a dropped version where one is kept."""

    def keep_spares(self, keep_last: int | None) -> None:
        """Leader, under the lock, before publish: keep the data files of the version this commit drops
        for reuse (None: drop any kept)."""

    def publish(self, stage: Stage, manifest: bytes, meta: dict, keep_last: int) -> CommitRecord:
        """Leader, under the lock, after every rank's data is durable: make the stage the current version."""

    def abort(self, stage: Stage) -> None:
        """Remove a stage that will never be published."""

    def gc(self, keep_last: int, spares: bool = False, dry_run: bool = False) -> list[str]:
        """Trim the record to keep_last versions and delete what no record names; returns what it removed."""
