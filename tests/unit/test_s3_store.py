"""The S3 backend beyond the storage contract (tests/unit/test_store_contract.py runs that against it):
multipart uploads, the leased lock, the conditional commit, abandoned uploads, errors.

Servers: the tests that take `url` (the s3_server fixture, tests/conftest.py) run twice: on moto's
standalone S3 server (tests/s3server.py), an emulator over real HTTP, and on a real Ceph RGW 16.2
(bench/cephrgw.py: one node on loopback, data in memory, one gateway). moto's conditional PUT is
check-then-write, not atomic, and it accepts any credentials: the tests that race writers or give
wrong keys run on Ceph only. Elsewhere the conflicts are made by changing the record or the lock
between a writer's steps, which any server must answer the same way. Neither server shows a real
network's latency and faults (tests/reliability/test_s3_faults.py injects faults)."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest
from xxhash import xxh3_64_hexdigest

import pyckpt
import pyckpt.s3_store as s3_store
from pyckpt.errors import SnapshotAccessError, SnapshotError, SnapshotLockedError, SnapshotReadError
from pyckpt.manifest import CommitRecord, VersionRef, checksum
from pyckpt.planner import Slice
from pyckpt.s3_store import LOCK, S3Source, S3Store, client
from tests.conftest import REPO
from tests.s3server import new_bucket, point_at
from tests.unit.test_store_contract import _write_version


@pytest.fixture
def url(s3_server) -> str:
    return f"s3://{new_bucket()}/runs/ck.bin"


def _keys(store: S3Store, prefix: str) -> list[str]:
    return [o["Key"] for o in client().list_objects_v2(Bucket=store.bucket, Prefix=prefix).get("Contents", [])]


def _uploads(store: S3Store) -> list[dict]:
    return client().list_multipart_uploads(Bucket=store.bucket, Prefix=store.root).get("Uploads", [])


def _big_segments() -> tuple[list[tuple[Slice, memoryview]], int, bytes]:
    rng = np.random.default_rng(0)
    a = rng.integers(0, 256, 7 << 20, dtype=np.uint8).tobytes()
    b = rng.integers(0, 256, 6 << 20, dtype=np.uint8).tobytes()
    segments = [(Slice(0, 0, 0, len(a)), memoryview(a)), (Slice(1, 0, len(a) + 4096, len(b)), memoryview(b))]
    return segments, len(a) + 4096 + len(b) + 100, a + bytes(4096) + b + bytes(100)


def test_a_large_data_object_goes_up_in_parts_and_reads_back_at_any_range(url, monkeypatch):
    monkeypatch.setattr(s3_store, "PART_SIZE", 5 << 20)        # S3's (and moto's) smallest part
    segments, size, expected = _big_segments()
    store = S3Store(url)
    with store.locked():
        stage = store.begin()
        digests = store.write_data(stage, 0, segments, size)
    assert digests == [xxh3_64_hexdigest(v) for _, v in segments]
    key = stage.handle + "data-0.bin"
    head = client().head_object(Bucket=store.bucket, Key=key)
    assert head["ContentLength"] == size and head["ETag"].strip('"').endswith("-3")   # a 3-part upload
    source = S3Source(store.s3, store.bucket, key, size)
    x, y = bytearray(1000), np.zeros(250, dtype=np.float32)   # a read across a part boundary, two buffers
    offset = (5 << 20) - 600
    assert source.read_into(offset, [memoryview(x), memoryview(y)]) == 2000
    assert bytes(x) + y.tobytes() == expected[offset: offset + 2000]
    whole = bytearray(size + 10)
    assert source.read_into(0, [memoryview(whole)]) == size and bytes(whole[:size]) == expected
    assert source.read_into(size, [memoryview(x)]) == 0


def test_a_read_whose_connection_drops_mid_body_asks_again_for_the_rest(url, monkeypatch):
    store = S3Store(url)
    data = np.random.default_rng(1).integers(0, 256, 100_000, dtype=np.uint8).tobytes()
    client().put_object(Bucket=store.bucket, Key="obj", Body=data)
    real, ranges = store.s3.get_object, []

    class Dropping:                    # the first body breaks after 3000 bytes, as a reset connection does
        def __init__(self, body):
            self.body, self.left = body, 3000

        def readinto(self, view):
            if self.left <= 0:
                raise s3_store.botocore.exceptions.ResponseStreamingError(error="connection reset")
            got = self.body.readinto(view[: self.left])
            self.left -= got
            return got

    def get_object(**kwargs):
        ranges.append(kwargs["Range"])
        got = real(**kwargs)
        return {**got, "Body": Dropping(got["Body"])} if len(ranges) == 1 else got
    monkeypatch.setattr(store.s3, "get_object", get_object)
    a, b = bytearray(2000), bytearray(50_000)
    assert S3Source(store.s3, store.bucket, "obj", len(data)).read_into(10, [memoryview(a), memoryview(b)]) == 52_000
    assert bytes(a + b) == data[10: 52_010] and ranges == ["bytes=10-52009", "bytes=3010-52009"]


def test_a_failed_part_aborts_the_upload_and_names_bucket_and_endpoint(url, s3_server, monkeypatch):
    monkeypatch.setattr(s3_store, "PART_SIZE", 5 << 20)
    segments, size, _ = _big_segments()
    store = S3Store(url)
    _write_version(store, step=1)
    real, calls = store.s3.upload_part, []

    def failing(**kwargs):
        calls.append(kwargs["PartNumber"])
        if kwargs["PartNumber"] == 2:
            raise s3_store.botocore.exceptions.ClientError(
                {"Error": {"Code": "InternalError", "Message": "injected"}}, "UploadPart")
        return real(**kwargs)
    monkeypatch.setattr(store.s3, "upload_part", failing)
    with store.locked():
        stage = store.begin()
        with pytest.raises(SnapshotError) as err:
            store.write_data(stage, 0, segments, size)
        store.abort(stage)
    assert 2 in calls and store.bucket in str(err.value) and s3_server.endpoint in str(err.value)
    assert _uploads(store) == [] and store.read_commit().current.step == 1


def test_publish_refuses_when_the_record_changed_since_begin(url):
    """Two writers never both win: the commit is a PUT conditional on the record begin() read."""
    store = S3Store(url)
    _write_version(store, step=1)
    with store.locked():
        stage = store.begin()
        store.write_data(stage, 0, [], 0)
        other = CommitRecord([VersionRef("v00000007", checksum(b"x"), 1, 99, None, None)])
        client().put_object(Bucket=store.bucket, Key=store.key, Body=other.to_json())   # another writer's commit
        with pytest.raises(SnapshotLockedError, match="another writer committed"):
            store.publish(stage, b"{}", {"step": 2}, 2)
    assert store.read_commit().current.step == 99 and _keys(store, stage.handle) == []


def test_the_first_commit_refuses_a_record_that_appeared_since_begin(url):
    store = S3Store(url)
    with store.locked():
        stage = store.begin()
        other = CommitRecord([VersionRef("v00000007", checksum(b"x"), 1, 99, None, None)])
        client().put_object(Bucket=store.bucket, Key=store.key, Body=other.to_json())
        with pytest.raises(SnapshotLockedError):
            store.publish(stage, b"{}", {"step": 1}, 2)
    assert store.read_commit().current.step == 99


def test_a_writer_whose_lock_was_taken_over_does_not_publish(url):
    store = S3Store(url)
    _write_version(store, step=1)
    with store.locked():
        stage = store.begin()
        taker = {"pid": 4242, "host": "elsewhere", "what": "snapshot", "since": time.time()}
        client().put_object(Bucket=store.bucket, Key=store.root + LOCK, Body=json.dumps(taker).encode())
        with pytest.raises(SnapshotLockedError, match="lost the lock.*pid 4242 on host elsewhere"):
            store.publish(stage, b"{}", {"step": 2}, 2)
    assert store.read_commit().current.step == 1 and _keys(store, stage.handle) == []
    assert _keys(store, store.root + LOCK) == [store.root + LOCK]    # the release left the other's lock alone


def test_a_live_writer_keeps_its_lock_by_renewing_it(url, monkeypatch):
    monkeypatch.setattr(s3_store, "LOCK_LEASE", 1.5)
    store = S3Store(url)
    with store.locked():
        time.sleep(3.5)                  # two leases: only renewals keep it
        with pytest.raises(SnapshotLockedError, match="another process is writing"):
            with S3Store(url).locked():
                pass
    assert _keys(store, store.root + LOCK) == []


HOLD_LOCK = """
import sys, time
from pyckpt.s3_store import S3Store
held = S3Store(sys.argv[1]).locked()   # kept referenced: a dropped context manager would release it
held.__enter__()
print("held", flush=True)
time.sleep(600)
"""


def _killed_holder(url: str) -> int:
    """The pid of a process that took the path's lock (for a snapshot) and was killed holding it."""
    holder = subprocess.Popen([sys.executable, "-c", HOLD_LOCK, url], stdout=subprocess.PIPE, text=True, cwd=REPO,
                              env={**os.environ, "PYTHONPATH": str(REPO)})
    try:
        assert holder.stdout.readline().strip() == "held"
    finally:
        holder.send_signal(signal.SIGKILL)
        holder.wait()
        holder.stdout.close()
    return holder.pid


def _lock_of(store: S3Store) -> dict:
    return json.loads(client().get_object(Bucket=store.bucket, Key=store.root + LOCK)["Body"].read())


def test_a_lock_left_by_a_killed_process_of_this_machine_is_taken_over_at_once(url):
    """A job killed while its snapshot (or gc) held the lock, started again on the same machine: its
    first snapshots failed with SnapshotLockedError for the rest of the lease (120 s), which made a
    killed-and-resumed training run fail in CI."""
    dead = _killed_holder(url)
    store = S3Store(url)
    assert _lock_of(store)["pid"] == dead and _lock_of(store)["machine"] == s3_store._this_machine()
    start = time.monotonic()
    with store.locked():
        assert _lock_of(store)["pid"] == os.getpid()
    assert time.monotonic() - start < s3_store.LOCK_WAIT
    assert _keys(store, store.root + LOCK) == []


def test_a_lock_of_another_machine_is_taken_over_only_once_its_lease_ran_out(url, monkeypatch):
    """Whether a process of another machine (or pid namespace) is alive cannot be seen from here: its
    lock is taken over only when it has not been renewed for LOCK_LEASE s."""
    dead = _killed_holder(url)
    store = S3Store(url)
    elsewhere = {**_lock_of(store), "host": "elsewhere", "machine": "another-boot/4026531836"}
    client().put_object(Bucket=store.bucket, Key=store.root + LOCK, Body=json.dumps(elsewhere).encode())
    with pytest.raises(SnapshotLockedError, match=f"pid {dead} on host elsewhere"):   # within the lease
        with store.locked():
            pass
    monkeypatch.setattr(s3_store, "LOCK_LEASE", 2.0)
    time.sleep(3.2)
    with store.locked():                                                 # not renewed for 2 s: taken over
        assert _lock_of(store)["pid"] == os.getpid()
    assert _keys(store, store.root + LOCK) == []


def test_abandoned_multipart_uploads_are_aborted_by_the_next_writer_and_by_gc(url):
    store = S3Store(url)
    _write_version(store, step=1)

    def abandon() -> None:             # what a rank killed mid-upload leaves: an open upload with a part
        key = store.root + "v00000009/data-1.bin"
        upload = client().create_multipart_upload(Bucket=store.bucket, Key=key)["UploadId"]
        client().upload_part(Bucket=store.bucket, Key=key, UploadId=upload, PartNumber=1, Body=b"x" * 1000)
    abandon()
    assert len(_uploads(store)) == 1
    store.gc(2)
    assert _uploads(store) == []
    abandon()
    with store.locked():
        store.abort(store.begin())
    assert _uploads(store) == [] and store.read_commit().current.step == 1


def test_a_missing_bucket_is_named_with_the_endpoint_and_no_secret(s3_server):
    store = S3Store("s3://no-such-bucket-here/runs/ck.bin")
    with pytest.raises(SnapshotReadError) as err:
        store.read_commit()
    text = str(err.value)
    assert "no-such-bucket-here" in text and s3_server.endpoint in text and "AWS_ENDPOINT_URL" in text
    assert s3_server.env["AWS_SECRET_ACCESS_KEY"] not in text
    with pytest.raises(SnapshotError, match="no-such-bucket-here"):
        with store.locked():
            pass


def test_missing_credentials_say_where_they_are_read_from(url, monkeypatch, tmp_path):
    for name in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_PROFILE"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("AWS_SHARED_CREDENTIALS_FILE", str(tmp_path / "none"))
    monkeypatch.setenv("AWS_CONFIG_FILE", str(tmp_path / "none"))
    with pytest.raises(SnapshotAccessError) as err:
        S3Store(url).read_commit()
    assert url.split("/")[2] in str(err.value) and "AWS_ACCESS_KEY_ID" in str(err.value)


def test_paths_that_name_no_object_are_refused():
    for bad in ("s3://", "s3://bucket", "s3://bucket/", "s3://bucket/dir/"):
        with pytest.raises(pyckpt.SnapshotPathError):
            S3Store(bad)


def test_the_lock_age_takes_a_date_header_that_names_no_zone_or_was_doubled_by_a_proxy():
    """A proxy in front of the server that adds its own Date header makes botocore join the two
    ("date, date"), which parses to a naive datetime: the lock check raised TypeError on it."""
    from datetime import datetime, timezone
    date = "Sun, 30 Nov 2025 04:50:00 GMT"
    utc = datetime(2025, 11, 30, 4, 50, tzinfo=timezone.utc)
    assert s3_store._server_now({"date": date}) == s3_store._server_now({"date": f"{date}, {date}"}) == utc
    assert s3_store._server_now({"date": "Sun, 30 Nov 2025 04:50:00 -0000"}) == utc
    assert s3_store._server_now({}).tzinfo is not None and s3_store._server_now({"date": "junk"}).tzinfo is not None


def test_in_a_versioned_bucket_pruned_versions_stay_as_noncurrent_object_versions(monkeypatch):
    """What retention and gc leave in a bucket with versioning on (README, "Snapshots in S3"): they
    delete as any S3 client does, without version ids, so each deleted object gets a delete marker
    and its bytes stay as a noncurrent version, which readers never see and which costs storage
    until a lifecycle rule (NoncurrentVersionExpiration) expires it; pyckpt does not delete by
    version id (that needs s3:DeleteObjectVersion and undoes the protection versioning was turned
    on for). Server: moto, which emulates versioning and stores lifecycle rules but never runs them.
    Not Ceph RGW 16: in a versioned bucket it ignores If-None-Match and refuses every If-Match, even
    on the object's own ETag (docs/RELIABILITY.md), so pyckpt refuses to commit there."""
    point_at("moto", monkeypatch)
    url = f"s3://{new_bucket()}/runs/ck.bin"
    store = S3Store(url)
    s3 = client()
    s3.put_bucket_versioning(Bucket=store.bucket, VersioningConfiguration={"Status": "Enabled"})
    for step in (1, 2, 3):
        _write_version(store, step, keep_last=2)
    assert store.gc(1) and [v.step for v in store.read_commit().versions] == [3]
    current = {k[len(store.root):].split("/")[0] for k in _keys(store, store.root)}
    assert current == {"v00000003"}                                         # what readers and ls see
    listed = s3.list_object_versions(Bucket=store.bucket, Prefix=store.root)
    noncurrent = {v["Key"][len(store.root):] for v in listed.get("Versions", []) if not v["IsLatest"]}
    markers = {m["Key"][len(store.root):] for m in listed.get("DeleteMarkers", []) if m["IsLatest"]}
    for gone in ("v00000001", "v00000002"):
        data = {f"{gone}/data-0.bin", f"{gone}/data-1.bin", f"{gone}/manifest.json", f"{gone}/.stage"}
        assert data <= noncurrent and data <= markers                       # still stored, behind markers
    assert S3Store(url).read_commit().current.step == 3
    # the lifecycle rule README suggests is one the S3 API takes
    s3.put_bucket_lifecycle_configuration(Bucket=store.bucket, LifecycleConfiguration={"Rules": [{
        "ID": "pyckpt-snapshots", "Status": "Enabled", "Filter": {"Prefix": "runs/"},
        "NoncurrentVersionExpiration": {"NoncurrentDays": 1},
        "Expiration": {"ExpiredObjectDeleteMarker": True},
        "AbortIncompleteMultipartUpload": {"DaysAfterInitiation": 2}}]})
    assert s3.get_bucket_lifecycle_configuration(Bucket=store.bucket)["Rules"][0]["ID"] == "pyckpt-snapshots"


def test_if_match_writes_succeed_where_the_server_matches_only_the_bare_etag(url, s3_server, monkeypatch):
    """Ceph RGW 16 matches PUT If-Match only against the unquoted ETag and answers 412 to the quoted
    form that AWS and moto take (RFC 7232's): every commit over an existing record then failed with
    "another writer committed", and the lock's first renewal lost it. A 412 while the object still has
    the ETag sent now makes pyckpt ask again unquoted (still conditional), and so from then on for
    that endpoint; moto never needs it."""
    monkeypatch.setattr(s3_store, "_UNQUOTED_IF_MATCH", set(), raising=False)
    monkeypatch.setattr(s3_store, "LOCK_LEASE", 1.0)             # a renewal every 0.25 s
    store = S3Store(url)
    _write_version(store, step=1)
    _write_version(store, step=2)                                 # If-Match on the record of step 1
    assert [v.step for v in store.read_commit().versions] == [2, 1]
    with store.locked():
        time.sleep(0.8)
        assert not store._lease.lost
    assert (s3_server.endpoint in s3_store._UNQUOTED_IF_MATCH) == (s3_server.name == "ceph")


@pytest.fixture
def ceph(monkeypatch):
    """For what only a real server shows (see the module docstring): Ceph RGW alone."""
    return point_at("ceph", monkeypatch)


def test_wrong_keys_are_refused_naming_bucket_endpoint_and_what_to_check(ceph, monkeypatch):
    """Ceph checks every request's signature (moto takes any keys)."""
    bucket = new_bucket()
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "not-the-secret-key")
    with pytest.raises(SnapshotAccessError) as err:
        S3Store(f"s3://{bucket}/runs/ck.bin").read_commit()
    text = str(err.value)
    assert bucket in text and ceph.endpoint in text and "AWS_ACCESS_KEY_ID" in text
    assert "SignatureDoesNotMatch" in text and "not-the-secret-key" not in text


def test_racing_commits_let_exactly_one_writer_win(ceph, monkeypatch):
    """Two writers never both win, even past the lock (two jobs given one path, a lease taken over from
    a paused writer): each replaces the record with a PUT conditional on the record it read, which Ceph
    checks atomically (moto checks, then writes: 2-3 of 8 racing 8 MB PUTs won there). 8 writers race the
    first commit (If-None-Match: *), then 8 race each next one (If-Match on the record all of them
    read, through the unquoted-ETag retry the first time); exactly one wins each round."""
    monkeypatch.setattr(s3_store, "_UNQUOTED_IF_MATCH", set(), raising=False)
    url, writers = f"s3://{new_bucket()}/race/ck.bin", 8
    for round in range(4):
        stores = [S3Store(url) for _ in range(writers)]
        etags = {store._record()[1] for store in stores}
        assert len(etags) == 1
        start = threading.Barrier(writers)

        def commit(i: int) -> int | None:
            record = CommitRecord([VersionRef(f"v{round * writers + i:08d}", checksum(b"x"), 1, i, None, None)])
            start.wait()
            try:
                stores[i]._replace_record(record, next(iter(etags)))
            except s3_store.botocore.exceptions.ClientError:
                return None
            return i
        with ThreadPoolExecutor(writers) as pool:
            winners = [i for i in pool.map(commit, range(writers)) if i is not None]
        assert len(winners) == 1, f"round {round}: writers {winners} all committed"
        assert S3Store(url).read_commit().current.step == winners[0]


def test_a_bucket_where_conditional_writes_do_not_hold_is_refused_saying_what_to_do(ceph):
    """Ceph RGW 16 in a versioned bucket ignores If-None-Match (a second create succeeds) and refuses
    every If-Match, even on the object's own ETag: its lock would not keep writers apart and no second
    commit could be made. pyckpt took that lock and then blamed "another writer"; now locking probes
    that a second create is refused, and an If-Match refused on the object's own ETag is named."""
    store = S3Store(f"s3://{new_bucket()}/runs/ck.bin")
    _write_version(store, step=1)
    client().put_bucket_versioning(Bucket=store.bucket, VersioningConfiguration={"Status": "Enabled"})
    with pytest.raises(SnapshotError, match="ignores conditional writes .*versioned bucket"):
        with store.locked():
            pass
    assert _keys(store, store.root + LOCK) == []                 # no lock left to block the next try
    record, etag = store._record()
    with pytest.raises(SnapshotError, match="refuses a conditional PUT .*own ETag"):
        store._replace_record(record, etag)
    assert store.read_commit() == record


def test_the_ceph_daemons_listen_on_loopback_only(ceph):
    """bench/cephrgw.py runs Ceph as plain processes, not in a container: fine only while nothing
    outside this machine can reach them."""
    import psutil

    from bench import cephrgw
    procs = cephrgw.cluster().procs
    listening = [(name, c.laddr) for name, proc in procs.items()
                 for c in psutil.Process(proc.pid).net_connections("inet") if c.status == psutil.CONN_LISTEN]
    assert {name for name, _ in listening} == set(procs)
    assert all(addr.ip == "127.0.0.1" for _, addr in listening), listening
