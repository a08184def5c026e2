"""The S3 backend of the storage seam (storage.py): snapshots in S3-compatible object storage.

For a user path s3://BUCKET/K (e.g. s3://ckpt/run1/checkpoint.bin), in BUCKET:
  K                          the commit record: names the committed versions, newest first
  K.pyckpt/v00000012/        one version: manifest.json + data-<rank>.bin (+ .stage, see below)
  K.pyckpt/.lock             the writer's lock object: {pid, host, what, since, machine}, renewed while held
A version is written under its final prefix (S3 has no rename); until the record names it, it is a
stage that readers never see (`.stage` marks it from begin(), so even an empty one is listed). It
becomes visible when the record is replaced by a conditional PUT (If-Match on the ETag read at begin,
If-None-Match: * for the first), after every data object and the manifest are uploaded: two writers
never both win. Data objects go up as multipart uploads of PART_SIZE parts, UPLOADS_IN_FLIGHT at once;
reads are ranged GETs read straight into the destination buffers.

The lock is a lease: created with If-None-Match: *, its holder re-PUTs it (If-Match on its own ETag)
every LOCK_LEASE/4 s. One whose last write is older than LOCK_LEASE by the server's clock (a killed
writer's) is taken over with If-Match on its ETag, and so is one whose holder was a process of this
machine (same boot, same pid namespace) that no longer exists: a job killed while its snapshot or gc
held the lock and started again on the same machine would otherwise fail its first snapshots for the
rest of the lease. A holder that finds its lock taken over refuses to publish. A writer paused for
longer than the lease (SIGSTOP, a hung node) can thus lose the path to another: that is the price of
a lock that a crash cannot leave held forever.

botocore retries a request whose answer was lost; when the lost try had taken effect, the retry meets
it (412 on a conditional PUT, NoSuchUpload on CompleteMultipartUpload). That is recognized as done:
the record read back is the one this writer PUT, the lock holds this writer's body, the object has the
uploaded size. A failed snapshot's stage is deleted only if a readable record does not name it.

Servers that bend S3 (Ceph RGW 16, bench/cephrgw.py): If-Match is sent with the ETag as the server
gave it (quoted); one that answers 412 while the object still has that ETag matches only the bare
form, and is sent that from then on. Taking the lock checks that a second If-None-Match create is
refused: a server that ignores the condition (Ceph 16 in a versioned bucket) is refused with a
SnapshotError rather than trusted to keep writers apart.

Client: boto3 (well kept, reads AWS_ENDPOINT_URL/AWS_REGION/credentials/profiles like every AWS SDK).
obstore uploads with less CPU, but cannot list or abort multipart uploads (retention must abort the
uploads of crashed writers) and cannot read into a caller's buffer (a restore would copy every byte
once more); boto3 has both, conditional PUTs and deletes, and retries with backoff (standard mode).
Its CRC32 checksums by default break some S3-compatible stores: they are sent only when required;
pyckpt checksums every byte itself (xxh3 in the manifest).
"""
from __future__ import annotations

import functools
import json
import logging
import os
import re
import socket
import threading
import time
import uuid
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from datetime import datetime, timezone
from email.utils import parsedate_to_datetime
from typing import Iterator

import boto3
import botocore.exceptions
import botocore.session
from botocore.config import Config

from .errors import (IntegrityError, PyckptError, SnapshotAccessError, SnapshotError, SnapshotLockedError,
                     SnapshotNotFoundError, SnapshotReadError)
from .manifest import MAX_MANIFEST, CommitRecord, Manifest, VersionRef, checksum, data_file_name
from .paths import snapshot_object, split_url
from .planner import Slice
from .storage import (LOCK, LOCK_WAIT, MANIFEST, SUFFIX, DataSource, Stage, Uncommitted, lock_holder_text,
                      next_version, verified_manifest, wait_for_lock)
from .sysio import helper_pool
from .testhooks import crash_point

log = logging.getLogger("pyckpt")
PART_SIZE = 16 << 20          # multipart part size (S3: >= 5 MiB, <= 10,000 parts; grown for big files)
UPLOADS_IN_FLIGHT = 4         # parts of one data object uploading at once
MAX_ATTEMPTS = 9              # tries of one request, the first included (AWS_MAX_ATTEMPTS overrides): ~50 s
LOCK_LEASE = 120.0            # seconds after its last renewal that a lock counts as left by a dead writer
MARKER = ".stage"
_MAX_PARTS = 9000
_MAX_RECORD = 1 << 20
_LEFTOVER_MANIFEST = 64 << 20
_VERSION = re.compile(r"^v([0-9]{8})$")
_CONFLICT = {"PreconditionFailed", "ConditionalRequestConflict"}   # 412, and AWS's 409 on a race
_ACCESS = {"AccessDenied", "InvalidAccessKeyId", "SignatureDoesNotMatch", "ExpiredToken", "InvalidToken",
           "AllAccessDisabled"}
_UNQUOTED_IF_MATCH: set[str] = set()   # endpoints that match If-Match only on the bare ETag (Ceph RGW 16)
_clients: dict[tuple, object] = {}
_clients_lock = threading.Lock()


def client():
    """This process's S3 client for the current AWS settings (clients are thread-safe, not fork-safe)."""
    env = tuple(sorted((k, v) for k, v in os.environ.items() if k.startswith("AWS_")))
    key = (os.getpid(), env)
    with _clients_lock:
        if key not in _clients:
            # standard retries: 5xx, SlowDown/throttling and connection errors, with backoff; the
            # attempts (and "adaptive" mode) from AWS_MAX_ATTEMPTS / AWS_RETRY_MODE or the profile
            settings = botocore.session.get_session()
            mode = settings.get_config_variable("retry_mode")
            retries = {"mode": mode if mode == "adaptive" else "standard",
                       "total_max_attempts": settings.get_config_variable("max_attempts") or MAX_ATTEMPTS}
            config = Config(retries=retries, max_pool_connections=32, request_checksum_calculation="when_required",
                            response_checksum_validation="when_required")
            _clients[key] = boto3.session.Session(botocore_session=settings).client("s3", config=config)
        return _clients[key]


def _server_now(headers: dict) -> datetime:
    """The server's clock from an answer's Date header (UTC if it names no zone, as "-0000" or a
    header doubled by a proxy, "date, date", parse); this machine's clock if there is none."""
    try:
        now = parsedate_to_datetime(headers.get("date", ""))
    except (TypeError, ValueError):
        return datetime.now(timezone.utc)
    return now if now.tzinfo else now.replace(tzinfo=timezone.utc)


def _code(exc: Exception) -> str:
    return exc.response.get("Error", {}).get("Code", "") if isinstance(exc, botocore.exceptions.ClientError) else ""


def _status(exc: Exception) -> int:
    if not isinstance(exc, botocore.exceptions.ClientError):
        return 0
    return exc.response.get("ResponseMetadata", {}).get("HTTPStatusCode", 0)


def _missing(exc: Exception) -> bool:
    return _code(exc) in ("NoSuchKey", "404", "NotFound") or (_status(exc) == 404 and _code(exc) != "NoSuchBucket")


def s3_error(exc: Exception, bucket: str, doing: str, kind: type[PyckptError] = SnapshotError) -> PyckptError:
    """A pyckpt error for a failed S3 call: the bucket, the endpoint and what to check (no secrets:
    botocore's messages carry none)."""
    endpoint = client().meta.endpoint_url
    code = _code(exc)
    if isinstance(exc, botocore.exceptions.NoCredentialsError):
        return SnapshotAccessError(
            f"s3://{bucket}: {doing} needs credentials for {endpoint} and none were found; set "
            "AWS_ACCESS_KEY_ID/AWS_SECRET_ACCESS_KEY or AWS_PROFILE (or ~/.aws/credentials)")
    if code in _ACCESS:
        return SnapshotAccessError(
            f"s3://{bucket}: {doing} was refused ({code or exc}) by {endpoint}; check the credentials "
            "(AWS_ACCESS_KEY_ID/AWS_SECRET_ACCESS_KEY or AWS_PROFILE) and that they may use this bucket")
    if code == "NoSuchBucket":
        return kind(f"s3://{bucket}: {doing} failed: no bucket {bucket!r} at {endpoint}; check the bucket name "
                    "and the endpoint (AWS_ENDPOINT_URL, AWS_REGION), or create the bucket")
    if isinstance(exc, botocore.exceptions.EndpointConnectionError):
        return kind(f"s3://{bucket}: {doing} failed: cannot reach {endpoint}; check AWS_ENDPOINT_URL and the network")
    return kind(f"s3://{bucket}: {doing} failed at {endpoint}: {code or type(exc).__name__}: {exc}")


_ERRORS = (botocore.exceptions.BotoCoreError, botocore.exceptions.ClientError)
_STREAM_ERRORS = (botocore.exceptions.ResponseStreamingError, botocore.exceptions.ReadTimeoutError,
                  botocore.exceptions.IncompleteReadError, botocore.exceptions.ConnectionClosedError)
_READ_RETRIES = 3


def _list(s3, bucket: str, prefix: str, delimiter: str = "") -> Iterator[dict]:
    """Every page of a listing (objects in "Contents", sub-prefixes in "CommonPrefixes")."""
    args = {"Bucket": bucket, "Prefix": prefix, **({"Delimiter": delimiter} if delimiter else {})}
    try:
        yield from s3.get_paginator("list_objects_v2").paginate(**args)
    except _ERRORS as exc:
        raise s3_error(exc, bucket, f"listing s3://{bucket}/{prefix}", SnapshotReadError) from exc


class S3Store:
    def __init__(self, url: str):
        self.bucket, key = snapshot_object(url)
        self.path, self.key, self.root = url, key, key + SUFFIX + "/"
        self.s3 = client()
        self._base: tuple[CommitRecord | None, str | None] | None = None   # the record (and ETag) begin() read
        self._lease: _Lease | None = None

    def _url(self, key: str) -> str:
        return f"s3://{self.bucket}/{key}"

    def _get(self, key: str, limit: int, what: str) -> tuple[bytes, str]:
        """An object of at most `limit` bytes and its ETag; KeyError if there is none."""
        try:
            data, got = self._get_whole(key, limit)
        except _ERRORS as exc:
            if _code(exc) == "InvalidRange":    # an empty object has no byte 0
                return b"", ""
            if _missing(exc):
                raise KeyError(key) from None
            raise s3_error(exc, self.bucket, f"reading {self._url(key)}", SnapshotReadError) from exc
        if len(data) > limit:
            raise IntegrityError(f"{self._url(key)}: more than the {limit} bytes expected of this {what}; "
                                 "corrupted, replaced or not written by pyckpt", file=self._url(key))
        return data, got.get("ETag", "")

    def _get_whole(self, key: str, limit: int) -> tuple[bytes, dict]:
        """GET the first limit + 1 bytes, asked again (up to _READ_RETRIES times) when the connection
        drops mid-body: a read of a given size returns the bytes that came before the drop without an
        error, and a cut record or manifest would look corrupted."""
        drops = 0
        while True:
            try:
                got = self.s3.get_object(Bucket=self.bucket, Key=key, Range=f"bytes=0-{limit}")
                data = got["Body"].read(limit + 1)
                if len(data) < got["ContentLength"]:
                    raise botocore.exceptions.IncompleteReadError(actual_bytes=len(data),
                                                                  expected_bytes=got["ContentLength"])
                return data, got
            except _STREAM_ERRORS:
                drops += 1
                if drops > _READ_RETRIES:
                    raise

    def _put(self, key: str, body: bytes, doing: str, **condition) -> str:
        """PUT an object (If-Match=ETag / If-None-Match="*" when given); returns its ETag. A refused
        condition raises the ClientError: 412, 409 (AWS, on a race), or 404 (If-Match on a key gone)."""
        match = condition.get("IfMatch")
        endpoint = self.s3.meta.endpoint_url
        if match and endpoint in _UNQUOTED_IF_MATCH:
            condition["IfMatch"] = match.strip('"')
        try:
            return self.s3.put_object(Bucket=self.bucket, Key=key, Body=body, **condition)["ETag"]
        except _ERRORS as exc:
            if match and _status(exc) == 412 and self._etag(key) == '"' + match.strip('"') + '"':
                # the object still has the ETag sent, yet the server refused it
                if condition["IfMatch"].startswith('"'):
                    # it matched the quoted form (RFC 7232's, that AWS and moto take) against its bare
                    # ETag (Ceph RGW 16): ask again, still conditionally, and so from now on
                    log.info("pyckpt: %s matches If-Match only on unquoted ETags; sending them so", endpoint)
                    _UNQUOTED_IF_MATCH.add(endpoint)
                    return self._put(key, body, doing, **condition)
                raise SnapshotError(
                    f"{self._url(key)}: {endpoint} refuses a conditional PUT (If-Match) on the object's own ETag, "
                    "quoted or not (Ceph RGW 16 does so in a versioned bucket), so pyckpt cannot commit there: use "
                    "a bucket without versioning, or a server with conditional writes") from exc
            if _code(exc) in _CONFLICT or (match and _missing(exc)):
                raise
            raise s3_error(exc, self.bucket, doing) from exc

    def _etag(self, key: str) -> str | None:
        """The object's ETag now; None if there is none."""
        try:
            return self.s3.head_object(Bucket=self.bucket, Key=key)["ETag"]
        except _ERRORS as exc:
            if _missing(exc):
                return None
            raise s3_error(exc, self.bucket, f"reading {self._url(key)}", SnapshotReadError) from exc

    def _list(self, prefix: str, delimiter: str = "") -> Iterator[dict]:
        return _list(self.s3, self.bucket, prefix, delimiter)

    def _any(self, prefix: str) -> bool:
        """Whether any object's key starts with prefix (one short listing)."""
        try:
            return self.s3.list_objects_v2(Bucket=self.bucket, Prefix=prefix, MaxKeys=1).get("KeyCount", 0) > 0
        except _ERRORS as exc:
            raise s3_error(exc, self.bucket, f"listing {self._url(prefix)}", SnapshotReadError) from exc

    def _objects(self, prefix: str) -> list[dict]:
        return [obj for page in self._list(prefix) for obj in page.get("Contents", [])]

    def _versions(self) -> list[str]:
        """The names of the version prefixes under K.pyckpt/ (committed or not), sorted."""
        found = [p["Prefix"][len(self.root):].rstrip("/") for page in self._list(self.root, "/")
                 for p in page.get("CommonPrefixes", [])]
        return sorted(name for name in found if _VERSION.match(name))

    # -- reading ---------------------------------------------------------------------------
    def exists(self) -> bool:
        try:
            self.s3.head_object(Bucket=self.bucket, Key=self.key)
        except _ERRORS as exc:
            if _missing(exc):
                return False
            raise s3_error(exc, self.bucket, f"reading {self.path}", SnapshotReadError) from exc
        return True

    def _record(self) -> tuple[CommitRecord | None, str | None]:
        try:
            data, etag = self._get(self.key, _MAX_RECORD, "commit record")
        except KeyError:
            return None, None
        return CommitRecord.from_json(data, self.path), etag

    def read_commit(self) -> CommitRecord:
        record = self._record()[0]
        if record is None:
            raise SnapshotNotFoundError(f"no snapshot at {self.path}; check the path, the endpoint "
                                        f"({self.s3.meta.endpoint_url}), or pass missing_ok=True to start fresh")
        return record

    def committed(self) -> CommitRecord | None:
        return self._record()[0]

    def where(self, name: str, file: str | None = None) -> str:
        return self._url(self.root + name + "/" + (file or ""))

    def read_manifest(self, ref: VersionRef) -> Manifest:
        where = self.where(ref.name, MANIFEST)
        try:
            data, _ = self._get(self.root + ref.name + "/" + MANIFEST, min(ref.manifest_size, MAX_MANIFEST), "manifest")
        except KeyError:
            raise IntegrityError(f"{where}: manifest of version {ref.name}, committed in {self.path}, is missing",
                                 file=where) from None
        return verified_manifest(data, ref, where, self.path)

    def open_data(self, ref: VersionRef, manifest: Manifest) -> dict[int, DataSource]:
        """Every data object of the version, its size checked against the manifest (one listing)."""
        prefix = self.root + ref.name + "/"
        sizes = {obj["Key"][len(prefix):]: obj["Size"] for obj in self._objects(prefix)}
        sources: dict[int, DataSource] = {}
        for index, record in enumerate(manifest.files):
            where = self.where(ref.name, record.name)
            if record.name not in sizes:
                raise IntegrityError(f"{where}: data object missing", file=where)
            if sizes[record.name] != record.size:
                raise IntegrityError(f"{where}: {sizes[record.name]} bytes in the bucket, manifest says "
                                     f"{record.size} (truncated or replaced)", file=where)
            sources[index] = S3Source(self.s3, self.bucket, prefix + record.name, record.size)
        return sources

    def uncommitted(self) -> list[Uncommitted]:
        """Version prefixes the record does not name: "stage" above the newest committed version (a
        writer's, crashed or at work), "orphan" below it (dropped from the record, not yet deleted)."""
        try:
            record = self.committed()
        except PyckptError:
            record = None
        listed = {v.name for v in record.versions} if record else set()
        newest = max(listed, default="")
        try:
            names = self._versions()
        except PyckptError as exc:
            return [Uncommitted("-", "broken", None, 0, None, str(exc))]
        out = []
        for name in names:
            if name in listed:
                continue
            objects = self._objects(self.root + name + "/")
            if not objects:
                continue          # removed meanwhile
            created = min(obj["LastModified"].timestamp() for obj in objects)
            size = sum(obj["Size"] for obj in objects)
            out.append(Uncommitted(name, "stage" if name > newest else "orphan", created, size,
                                   self._leftover_manifest(name, objects)))
        return out

    def _leftover_manifest(self, name: str, objects: list[dict]) -> Manifest | None:
        """A crash between the manifest and the record leaves the manifest: ls shows its step."""
        key = self.root + name + "/" + MANIFEST
        if not any(obj["Key"] == key for obj in objects):
            return None
        try:
            return Manifest.from_json(self._get(key, _LEFTOVER_MANIFEST, "manifest")[0], self._url(key))
        except (KeyError, PyckptError):
            return None

    # -- the lock --------------------------------------------------------------------------
    @contextmanager
    def locked(self, what: str = "snapshot") -> Iterator[None]:
        """Hold the path's lock object for `what` ("snapshot" or "gc"). Held by a snapshot:
        SnapshotLockedError at once; held by gc: wait up to LOCK_WAIT s; left by a dead writer (not
        renewed for LOCK_LEASE s, or a process of this machine that is gone): taken over."""
        holder = {"pid": os.getpid(), "host": socket.gethostname(), "what": what, "since": time.time(),
                  "machine": _this_machine()}
        lease = _Lease(self, holder, self._acquire(json.dumps(holder).encode()))
        self._lease = lease
        try:
            yield
        finally:
            self._lease = None
            lease.release()

    def _acquire(self, body: bytes) -> str:
        """Create the lock object (or take over a stale one); returns its ETag."""
        key, deadline = self.root + LOCK, time.monotonic() + LOCK_WAIT
        while True:
            try:
                etag = self._put(key, body, f"locking {self.path}", IfNoneMatch="*")
                self._probe_conditions(key, body)
                return etag
            except botocore.exceptions.ClientError:
                pass                                        # held (or just being taken): see by whom
            found = self._lock_holder(key)
            if found is None:                               # released meanwhile: try again
                time.sleep(0.05)
                continue
            holder, etag, age = found
            if holder == json.loads(body):                  # its own: a retry met its first try's write
                return etag
            gone = _gone_from_this_machine(holder)
            if age > LOCK_LEASE or gone:
                try:
                    taken = self._put(key, body, f"locking {self.path}", IfMatch=etag)
                except botocore.exceptions.ClientError:    # someone else took it first
                    time.sleep(0.05)
                    continue
                log.warning("pyckpt: took over the lock of %s from %s: %s", self.path, lock_holder_text(holder),
                            "that process no longer exists" if gone else
                            f"not renewed for {age:.0f} s (a writer that died)")
                return taken
            wait_for_lock(self.path, self._url(key), holder, deadline)

    def _probe_conditions(self, key: str, body: bytes) -> None:
        """The lock just made must refuse a second If-None-Match: * PUT. A server that ignores the
        header (Ceph RGW 16 in a versioned bucket) keeps neither the lock nor the commit exclusive."""
        try:
            self._put(key, body, f"locking {self.path}", IfNoneMatch="*")
        except botocore.exceptions.ClientError:
            return                                          # refused: conditional writes work
        try:
            self.s3.delete_object(Bucket=self.bucket, Key=key)
        except _ERRORS:
            pass                                            # the lease runs out by itself
        raise SnapshotError(f"{self.path}: {self.s3.meta.endpoint_url} ignores conditional writes (If-None-Match) in "
                            f"bucket {self.bucket!r}, so pyckpt cannot keep two writers apart there (Ceph RGW 16 "
                            "does so in a versioned bucket): use a bucket without versioning, or a server with "
                            "conditional writes")

    def _lock_holder(self, key: str) -> tuple[dict, str, float] | None:
        """Who holds the lock, its ETag and seconds since its last renewal (server clock); None if gone."""
        try:
            got = self.s3.get_object(Bucket=self.bucket, Key=key)
            data = got["Body"].read(4096)
        except _ERRORS as exc:
            if _missing(exc):
                return None
            raise s3_error(exc, self.bucket, f"reading the lock {self._url(key)}") from exc
        try:
            holder = json.loads(data)
        except ValueError:
            holder = {}
        age = (_server_now(got["ResponseMetadata"]["HTTPHeaders"]) - got["LastModified"]).total_seconds()
        return (holder if isinstance(holder, dict) else {}), got["ETag"], age

    def _check_lock(self) -> None:
        """Before publishing: the lock must still be this writer's (not taken over while it stalled)."""
        lease = self._lease
        if lease is None:
            raise SnapshotError(f"{self.path}: publish() outside locked(); this is a pyckpt bug")
        found = self._lock_holder(self.root + LOCK)
        if lease.lost or found is None or found[1] != lease.etag:
            lease.lost = True              # not ours to release (delete) any more
            raise SnapshotLockedError(
                f"{self.path}: this writer lost the lock (not renewed for {LOCK_LEASE:g} s, then taken over by "
                f"{lock_holder_text(found[0]) if found else 'nobody'}); this snapshot was not committed")

    # -- writing (leader only, under lock) ---------------------------------------------------
    def begin(self) -> Stage:
        """Delete the leftovers of crashed writers (version prefixes and multipart uploads nobody
        commits), then start a new version: its prefix, marked by a .stage object."""
        self._base = self._record()
        record = self._base[0]
        committed = [int(v.name[1:]) for v in record.versions] if record else []
        listed = {v.name for v in record.versions} if record else set()
        leftovers = [n for n in self._versions() if n not in listed]
        self._delete_prefixes(leftovers)
        self._abort_uploads(self.root)
        name = next_version(self.path, committed, [int(n[1:]) for n in leftovers])
        handle = self.root + name + "/"
        marker = {"pid": os.getpid(), "host": socket.gethostname(), "id": uuid.uuid4().hex[:12]}
        self._put(handle + MARKER, json.dumps(marker).encode(), f"starting a snapshot in {self.path}")
        crash_point("stage-created")
        return Stage(name, handle)

    def write_data(self, stage: Stage, rank: int, segments: list[tuple[Slice, memoryview]], size: int,
                   reuse: bool = False) -> list[str]:
        """Upload this rank's data object (one PUT when small, else a multipart upload); `reuse` does
        nothing here: an object cannot be overwritten in place."""
        key = stage.handle + data_file_name(rank)
        digests = helper_pool().submit(lambda: [checksum(_piece(s, v)) for s, v in segments])
        need = -(-size // _MAX_PARTS)                  # parts big enough for S3's 10,000-part limit
        part = max(PART_SIZE, need + -need % (1 << 20))
        if size <= part:
            self._put(key, b"".join(_chunks(segments, 0, size)), f"uploading {self._url(key)}")
        else:
            _Upload(self, key).run(segments, size, part)
        return digests.result()

    def keep_spares(self, keep_last: int | None) -> None:
        """Nothing: objects cannot be overwritten in place, so there are no spares to keep."""

    def publish(self, stage: Stage, manifest: bytes, meta: dict, keep_last: int) -> CommitRecord:
        """Upload the manifest, then replace the record with a conditional PUT against the record that
        begin() read: if another writer committed meanwhile, SnapshotLockedError and the stage is gone."""
        self._put(stage.handle + MANIFEST, manifest, f"uploading the manifest to {self.where(stage.name)}")
        crash_point("manifest-written")
        previous, etag = self._base if self._base is not None else self._record()
        ref = VersionRef(stage.name, checksum(manifest), len(manifest), meta.get("step"), meta.get("epoch"),
                         meta.get("created"))
        record = CommitRecord([ref] + (previous.versions[: max(0, keep_last - 1)] if previous else []))
        try:
            self._check_lock()
            self._replace_record(record, etag)
        except BaseException as exc:
            landed = False if isinstance(exc, SnapshotLockedError) else self._landed(record)
            if landed is None:     # the record may name the version: abort() deletes it only if a readable one does not
                raise SnapshotError(f"{self.path}: writing the commit record failed and it cannot be read back, so "
                                    f"whether {stage.name} is committed is unknown (`pyckpt ls {self.path}` tells "
                                    f"once the store answers): {exc}") from exc
            if landed:
                log.warning("pyckpt: the answer to the commit of %s was lost; the commit record is this writer's: "
                            "committed", self.where(stage.name))
            else:
                self.abort(stage)
                if isinstance(exc, botocore.exceptions.ClientError):
                    raise SnapshotLockedError(f"{self.path}: another writer committed a snapshot while this one was "
                                              "being written (the record changed since it began); this snapshot "
                                              "was not committed: give each job its own snapshot path") from None
                raise
        crash_point("record-renamed")
        self._base = None
        return record

    def _replace_record(self, record: CommitRecord, etag: str | None) -> None:
        """The conditional PUT that commits: only over the record read before (or where none is)."""
        condition = {"IfMatch": etag} if etag else {"IfNoneMatch": "*"}
        self._put(self.key, record.to_json(), f"writing the commit record {self.path}", **condition)

    def _landed(self, record: CommitRecord) -> bool | None:
        """Whether the record in the bucket is the one this writer PUT though the PUT failed (its answer
        was lost and the retry got 412 against the write itself, or the retries failed after the first
        took effect); None if the record cannot be read."""
        try:
            current = self.committed()
        except (PyckptError, OSError):
            return None
        return current is not None and current.to_json() == record.to_json()

    def abort(self, stage: Stage) -> None:
        """Delete a stage that failed, and its uploads, unless the record names it (a commit whose
        answer was lost) or cannot be read (the server is gone: the next writer or gc cleans up).
        Never raises a storage error: it runs on failure paths, after the error that matters."""
        try:
            record = self.committed()
            if record is None or stage.name not in {v.name for v in record.versions}:
                self._abort_uploads(stage.handle)
                self._delete_prefixes([stage.handle[len(self.root):].rstrip("/")])
        except (PyckptError, OSError) as exc:
            log.warning("pyckpt: could not remove the failed snapshot %s (the next writer or `pyckpt gc` "
                        "will): %s", self.where(stage.name), exc)

    def gc(self, keep_last: int, spares: bool = False, dry_run: bool = False) -> list[str]:
        """Trim the record to keep_last versions, delete every version prefix it does not name and
        abort the multipart uploads of crashed writers; returns the version names removed (dry_run:
        decides the same way under the lock, removes nothing). `spares`: nothing to do here."""
        if not self.exists() and not self._any(self.root):
            return []
        with self.locked("gc"):
            record, etag = self._record()
            kept = record.versions[: max(1, keep_last)] if record else []
            removed = [n for n in self._versions() if n not in {v.name for v in kept}]
            if dry_run:
                return removed
            if record and len(kept) < len(record.versions):
                try:
                    self._replace_record(CommitRecord(kept), etag)
                except botocore.exceptions.ClientError:
                    raise SnapshotLockedError(f"{self.path}: the record changed while gc held the lock (another "
                                              "writer took it over); nothing was removed: run gc again") from None
            self._delete_prefixes(removed)
            self._abort_uploads(self.root)
            return removed

    def _delete_prefixes(self, names: list[str]) -> None:
        for name in names:
            keys = [obj["Key"] for obj in self._objects(self.root + name + "/")]
            for start in range(0, len(keys), 1000):   # DeleteObjects takes up to 1000 keys
                batch = [{"Key": k} for k in keys[start: start + 1000]]
                try:
                    failed = self.s3.delete_objects(Bucket=self.bucket, Delete={"Objects": batch, "Quiet": True})
                except _ERRORS as exc:
                    raise s3_error(exc, self.bucket, f"deleting {self.where(name)}") from exc
                if failed.get("Errors"):
                    error = failed["Errors"][0]
                    raise SnapshotError(f"s3://{self.bucket}: deleting {error.get('Key')} failed: "
                                        f"{error.get('Code')}: {error.get('Message')}")

    def _abort_uploads(self, prefix: str) -> None:
        """Abort the unfinished multipart uploads under prefix (a crashed writer's parts cost storage)."""
        try:
            pages = self.s3.get_paginator("list_multipart_uploads").paginate(Bucket=self.bucket, Prefix=prefix)
            for upload in (u for page in pages for u in page.get("Uploads", [])):
                self.s3.abort_multipart_upload(Bucket=self.bucket, Key=upload["Key"], UploadId=upload["UploadId"])
        except _ERRORS as exc:
            if not _missing(exc):    # NoSuchUpload: finished or aborted meanwhile
                raise s3_error(exc, self.bucket, f"aborting unfinished uploads under {self._url(prefix)}") from exc


@functools.cache   # fixed for the process's life; asked on every try while a lock is waited for
def _this_machine() -> str:
    """This machine's boot and pid namespace ("" where /proc does not say): two lock holders with the
    same value see the same processes under the same pids."""
    try:
        with open("/proc/sys/kernel/random/boot_id") as f:
            boot = f.read().strip()
        return f"{boot}/{os.stat('/proc/self/ns/pid').st_ino}"
    except OSError:
        return ""


def _gone_from_this_machine(holder: dict) -> bool:
    """Whether a lock's holder was another process of this machine and pid namespace that no longer
    exists (its pid unused, or taken by a process of another boot: then the machine value differs)."""
    pid, here = holder.get("pid"), _this_machine()
    if not here or holder.get("machine") != here or type(pid) is not int or pid <= 0 or pid == os.getpid():
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return True
    except OSError:            # EPERM: it exists (another user's)
        pass
    return False


class _Lease:
    """A held lock object, renewed on a thread (If-Match on its own ETag) until released."""

    def __init__(self, store: S3Store, holder: dict, etag: str):
        self.store, self.body, self.etag, self.lost = store, json.dumps(holder).encode(), etag, False
        self.key = store.root + LOCK
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._renew, name="pyckpt-s3-lease", daemon=True)
        self._thread.start()

    def _renew(self) -> None:
        while not self._stop.wait(LOCK_LEASE / 4):
            try:
                self.etag = self.store._put(self.key, self.body, "renewing the lock", IfMatch=self.etag)
            except botocore.exceptions.ClientError:
                if not self._still_ours():
                    self.lost = True        # taken over: publish() refuses
                    return
            except PyckptError as exc:      # unreachable for now: try again at the next tick
                log.warning("pyckpt: could not renew the lock of %s: %s", self.store.path, exc)

    def _still_ours(self) -> bool:
        """After a 412 on renewal: whether the lock still holds this writer's body (a renewal whose answer
        was lost changed the ETag on a store whose ETags are not the body's MD5, e.g. SSE-KMS); then
        its new ETag is adopted. Unreadable: assumed ours until the next renewal or publish() checks."""
        try:
            found = self.store._lock_holder(self.key)
        except PyckptError as exc:
            log.warning("pyckpt: could not read the lock of %s: %s", self.store.path, exc)
            return True
        if found is None or found[0] != json.loads(self.body):
            return False
        self.etag = found[1]
        return True

    def release(self) -> None:
        self._stop.set()
        self._thread.join()
        if self.lost:
            return
        try:
            # Ceph RGW 16 ignores If-Match on DELETE: look first, so that a lock taken over meanwhile
            # is left to its new holder there too (but for a moment between the look and the delete)
            if self.store._etag(self.key) == self.etag:
                self.store.s3.delete_object(Bucket=self.store.bucket, Key=self.key, IfMatch=self.etag)
        except (*_ERRORS, PyckptError) as exc:   # taken over (412), or unreachable: the lease runs out
            log.warning("pyckpt: could not release the lock of %s: %s", self.store.path, exc)


class _Upload:
    """One multipart upload of a data object: parts of the file's bytes (segments with zero-filled
    gaps), UPLOADS_IN_FLIGHT at once; aborted if any part fails."""

    def __init__(self, store: S3Store, key: str):
        self.store, self.key = store, key

    def run(self, segments: list[tuple[Slice, memoryview]], size: int, part: int) -> None:
        s3, bucket = self.store.s3, self.store.bucket
        doing = f"uploading {self.store._url(self.key)}"
        try:
            upload = s3.create_multipart_upload(Bucket=bucket, Key=self.key)["UploadId"]
        except _ERRORS as exc:
            raise s3_error(exc, bucket, doing) from exc
        try:
            with ThreadPoolExecutor(UPLOADS_IN_FLIGHT, thread_name_prefix="pyckpt-s3-upload") as pool:
                futures, done = [], []
                for number, start in enumerate(range(0, size, part), 1):
                    if len(futures) - len(done) >= UPLOADS_IN_FLIGHT:   # bounded memory: a few parts at once
                        done.append(futures[len(done)].result())
                    body = b"".join(_chunks(segments, start, min(start + part, size)))
                    futures.append(pool.submit(s3.upload_part, Bucket=bucket, Key=self.key, UploadId=upload,
                                               PartNumber=number, Body=body))
                parts = [{"PartNumber": n, "ETag": f.result()["ETag"]} for n, f in enumerate(futures, 1)]
            self._complete(upload, parts, size)
        except BaseException as exc:
            try:
                s3.abort_multipart_upload(Bucket=bucket, Key=self.key, UploadId=upload)
            except _ERRORS:
                pass              # begin() or gc aborts it later
            if isinstance(exc, _ERRORS):
                raise s3_error(exc, bucket, doing) from exc
            raise

    def _complete(self, upload: str, parts: list[dict], size: int) -> None:
        """CompleteMultipartUpload. A retry whose first try completed the upload (its answer lost) gets
        NoSuchUpload from some stores: then the object there, in this writer's stage, with this size is
        the upload completed (its bytes are checked on every read against the manifest's checksums)."""
        s3, bucket = self.store.s3, self.store.bucket
        try:
            s3.complete_multipart_upload(Bucket=bucket, Key=self.key, UploadId=upload, MultipartUpload={"Parts": parts})
        except botocore.exceptions.ClientError as exc:
            if _code(exc) != "NoSuchUpload":
                raise
            try:
                found = s3.head_object(Bucket=bucket, Key=self.key)["ContentLength"]
            except _ERRORS:
                found = None
            if found != size:
                raise
            log.warning("pyckpt: the answer to completing %s was lost; the object is there, %d bytes: completed",
                        self.store._url(self.key), size)


def _piece(piece: Slice, view: memoryview) -> memoryview:
    _, src, _, length = piece
    return view if src == 0 and length == len(view) else view[src: src + length]


def _chunks(segments: list[tuple[Slice, memoryview]], start: int, end: int) -> Iterator[memoryview | bytes]:
    """The bytes [start, end) of the file the segments make (in file order; gaps are zeros)."""
    pos = start
    for piece, view in segments:
        offset, length = piece.file_offset, piece.length
        if offset + length <= start or length == 0:
            continue
        if offset >= end:
            break
        if offset > pos:
            yield bytes(offset - pos)
            pos = offset
        lo = pos - offset
        hi = min(length, end - offset)
        yield _piece(piece, view)[lo:hi]
        pos = offset + hi
    if end > pos:
        yield bytes(end - pos)


class S3Source:
    """A data object open for ranged reads: each read_into is one ranged GET read into the buffers."""

    # Each GET has a fixed cost (a round trip; moto copies the whole object per GET): with 16 MiB
    # a 16 + 6 MiB tensor took two GETs; 32 MiB reads most tensors of up to 32 MiB with one.
    job_bytes = 32 << 20

    def __init__(self, s3, bucket: str, key: str, size: int):
        self.s3, self.bucket, self.key, self.size = s3, bucket, key, size
        self.where = f"s3://{bucket}/{key}"

    def read_into(self, offset: int, buffers: list[memoryview]) -> int:
        """One ranged GET read into the buffers; a connection dropped mid-body is asked again for the
        rest (botocore retries a request, not a body being read), up to _READ_RETRIES times."""
        views = [b if b.format == "B" and b.ndim == 1 else b.cast("B") for b in buffers]
        end = min(offset + sum(len(v) for v in views), self.size)
        done, drops = 0, 0
        while offset + done < end:
            try:
                body = self.s3.get_object(Bucket=self.bucket, Key=self.key,
                                          Range=f"bytes={offset + done}-{end - 1}")["Body"]
                for view in _window(views, done, end - offset):
                    filled = 0
                    while filled < len(view):
                        got = body.readinto(view[filled:])
                        if not got:         # the object is shorter than it was (replaced): a short read
                            return done
                        filled, done = filled + got, done + got
            except _STREAM_ERRORS as exc:
                drops += 1
                if drops > _READ_RETRIES:
                    raise s3_error(exc, self.bucket, f"reading {self.where}", SnapshotReadError) from exc
            except _ERRORS as exc:
                if _missing(exc):
                    raise SnapshotReadError(f"{self.where}: deleted while being read (a newer snapshot was "
                                            "committed and this version pruned): restore again") from None
                raise s3_error(exc, self.bucket, f"reading {self.where}", SnapshotReadError) from exc
        return done

    def cached(self, start: int, end: int) -> bool:
        return False

    def direct(self) -> None:
        return None

    def copy(self) -> "S3Source":
        return S3Source(self.s3, self.bucket, self.key, self.size)

    def close(self) -> None:
        pass


def _window(views: list[memoryview], start: int, stop: int) -> list[memoryview]:
    """The parts of the buffers that hold bytes [start, stop) of their concatenation."""
    out, pos = [], 0
    for view in views:
        lo, hi = max(start - pos, 0), min(stop - pos, len(view))
        if hi > lo:
            out.append(view[lo:hi])
        pos += len(view)
    return out


def snapshot_paths(url: str) -> list[str]:
    """The URL itself if it is a snapshot path, else every snapshot path directly under the prefix
    (s3://bucket/dir or s3://bucket/dir/)."""
    bucket, key = split_url(url)
    if key.endswith(SUFFIX):
        return [url[: -len(SUFFIX)]]
    if key and not key.endswith("/"):
        store = S3Store(url)
        if store.exists() or store._any(store.root):
            return [url]
        key += "/"
    found = [p["Prefix"] for page in _list(client(), bucket, key, "/") for p in page.get("CommonPrefixes", [])]
    paths = sorted(f"s3://{bucket}/{p[: -len(SUFFIX) - 1]}" for p in found
                   if p.endswith(SUFFIX + "/") and p != key + SUFFIX + "/")
    if not paths and not url.endswith("/") and key:
        raise SnapshotNotFoundError(f"{url}: no such snapshot path or prefix")
    return paths
