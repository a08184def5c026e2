"""The S3 backend under faults and crashes: throttling (503 SlowDown) and cut connections in the
middle of a multipart upload, a server that never takes a part, a writer SIGKILLed mid-upload, lost
answers to requests that took effect (conditional PUTs, CompleteMultipartUpload), faulted reads during
restore, and the server gone mid-upload.

Server: moto's standalone S3 server (tests/s3server.py, an emulator over real HTTP) behind the
fault-injecting proxy of tests/s3faults.py (real HTTP too, on 127.0.0.1), which answers 503 SlowDown,
cuts connections, holds requests, forwards a request and drops its answer, or truncates an answer,
on rules, and counts what it did. Neither emulates a real network's latency or partial packet loss;
moto's conditional PUT is not atomic (no test here races two writers), its ETags are MD5s (stores
with other ETags: see the renewal tests) and it completes a retried CompleteMultipartUpload again
(the proxy answers NoSuchUpload where a test needs what other stores answer)."""
from __future__ import annotations

import os
import signal
import subprocess
import threading
import sys
import time

import pytest
import torch
from typer.testing import CliRunner

import pyckpt
import pyckpt.s3_store as s3_store
from pyckpt import DistributedCoordinator, TrainingRuntime, load_config
from pyckpt.cli import app
from pyckpt.s3_store import S3Store, client
from tests.conftest import REPO, StateHolder
from tests.s3faults import FaultProxy
from tests.s3server import ENV, endpoint, new_bucket

pytestmark = pytest.mark.reliability
PART = 5 << 20                       # S3's (and moto's) smallest part: a 12 MiB object is 3 parts


@pytest.fixture(autouse=True)
def small_parts(monkeypatch):
    monkeypatch.setattr(s3_store, "PART_SIZE", PART)


def _state(seed: int, mib: int = 12) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return {"w": torch.randn(mib << 18, generator=g), "b": torch.randint(0, 1 << 30, (1000,), generator=g)}


def _runtime(state: dict, step: int) -> TrainingRuntime:
    runtime = TrainingRuntime()
    runtime.register("state", StateHolder(state))
    runtime.set_step(step)
    return runtime


def _coordinator(tmp_path) -> DistributedCoordinator:
    return DistributedCoordinator(load_config(environ={}, config_dir=str(tmp_path)), keep_last=2)


def _snapshot(tmp_path, url: str, state: dict, step: int) -> None:
    with _coordinator(tmp_path) as coordinator:
        coordinator.snapshot(url, _runtime(state, step))


def _assert_restores(tmp_path, url: str, state: dict, step: int) -> None:
    """restore() into fresh tensors and pyckpt.load in this process: the bytes of `state` at `step`."""
    fresh = {k: torch.zeros_like(v) for k, v in state.items()}
    runtime = _runtime(fresh, 0)
    with _coordinator(tmp_path) as coordinator:
        assert coordinator.restore(url, runtime)
    assert runtime.step == step
    loaded = pyckpt.load(url)
    assert loaded["progress"]["step"] == step
    for key, tensor in state.items():
        assert torch.equal(fresh[key], tensor) and torch.equal(loaded["objects"]["state"][key], tensor), key


def _uploads(store: S3Store) -> list[dict]:
    """The unfinished multipart uploads under the snapshot's prefix, asked of moto directly."""
    return client().list_multipart_uploads(Bucket=store.bucket, Prefix=store.root).get("Uploads", [])


def _lock_left(store: S3Store) -> bool:
    return client().list_objects_v2(Bucket=store.bucket, Prefix=store.root + s3_store.LOCK)["KeyCount"] > 0


def _versions_in_bucket(store: S3Store) -> set[str]:
    listed = client().list_objects_v2(Bucket=store.bucket, Prefix=store.root).get("Contents", [])
    return {o["Key"][len(store.root):].split("/")[0] for o in listed} - {s3_store.LOCK}


@pytest.mark.parametrize("method, query, action, times", [
    ("PUT", "partNumber=", "slowdown", 2),       # UploadPart throttled twice
    ("PUT", "partNumber=", "cut", 1),            # UploadPart's connection cut mid-body
    ("POST", "uploads", "slowdown", 1),          # CreateMultipartUpload throttled
    ("POST", "uploadId=", "cut", 1),             # CompleteMultipartUpload's connection cut
])
def test_a_throttled_or_cut_request_is_retried_and_the_snapshot_commits(tmp_path, method, query, action, times):
    """Server: moto behind the fault proxy. The faulted requests never reach moto, so a retry is
    always safe here; a lost answer to a request moto did carry out is not emulated."""
    url = f"s3://{new_bucket()}/runs/faults/checkpoint.bin"
    state = _state(1)
    with FaultProxy(endpoint()) as proxy:
        rule = proxy.add(method, query, action, first=1, last=times)
        with proxy.environment():
            _snapshot(tmp_path, url, state, 7)
        assert rule.fired == times                                   # the faults really happened
        assert proxy.count(method, query) == rule.seen > times       # and the request was sent again
        assert proxy.count("PUT", "partNumber=") >= 3                # a multipart upload (12 MiB, 5 MiB parts)
    _assert_restores(tmp_path, url, state, 7)
    assert _uploads(S3Store(url)) == []


def test_a_server_that_refuses_every_part_gives_a_clean_snapshot_error_and_keeps_the_previous_version(
        tmp_path, monkeypatch, capfd):
    """Server: moto behind the fault proxy answering 503 SlowDown to every UploadPart (a bucket
    throttled for good, or a gateway in front of a dead server). AWS_MAX_ATTEMPTS=3 bounds the test's
    time: pyckpt honours it (its default, 9 tries, gave up after ~50 s here)."""
    url = f"s3://{new_bucket()}/runs/refused/checkpoint.bin"
    before = _state(2)
    _snapshot(tmp_path, url, before, 1)
    monkeypatch.setenv("AWS_MAX_ATTEMPTS", "3")
    capfd.readouterr()
    with FaultProxy(endpoint()) as proxy:
        rule = proxy.add("PUT", "partNumber=", "slowdown")
        with proxy.environment():
            start = time.monotonic()
            with pytest.raises(pyckpt.SnapshotError) as err:
                _snapshot(tmp_path, url, _state(3), 2)
            took = time.monotonic() - start
        aborts = proxy.count("DELETE", "uploadId=")
    out, errors = capfd.readouterr()
    text = str(err.value)
    assert took < 30, f"gave up after {took:.1f} s"
    assert rule.fired == 3 * 3                                     # each of the 3 parts tried 3 times, no more
    assert aborts == 1                                             # the writer aborted its upload
    assert "previous snapshot is intact" in text and "SlowDown" in text
    assert f"s3://{S3Store(url).bucket}" in text and proxy.url in text          # the bucket and the endpoint
    assert ENV["AWS_SECRET_ACCESS_KEY"] not in text and "Traceback" not in out + errors
    store = S3Store(url)
    assert [v.step for v in store.read_commit().versions] == [1]
    assert _uploads(store) == [] and _versions_in_bucket(store) == {"v00000001"}   # no stage, no lock left
    _assert_restores(tmp_path, url, before, 1)


WRITER = """
import sys
import torch
import pyckpt.s3_store as s3_store
from pyckpt import DistributedCoordinator, TrainingRuntime, load_config
from tests.conftest import StateHolder
s3_store.PART_SIZE = 5 << 20
runtime = TrainingRuntime()
runtime.register("state", StateHolder({"w": torch.randn(6 << 20)}))     # 24 MiB: 5 parts
runtime.set_step(2)
with DistributedCoordinator(load_config(environ={}, config_dir=sys.argv[2]), keep_last=2) as coordinator:
    coordinator.snapshot(sys.argv[1], runtime)
print("committed", flush=True)
"""


@pytest.mark.parametrize("cleaner", ["next-writer", "gc"])
def test_a_writer_killed_mid_multipart_upload_leaves_the_previous_version_and_its_leftovers_are_cleaned(
        tmp_path, cleaner):
    """Server: moto behind the fault proxy, which holds every UploadPart (the parts are in flight)
    until the writer, a separate process, has been SIGKILLed. The lock the writer left is taken over
    at once: its holder was a process of this machine and is gone (a writer of another machine's lock
    only once its lease ran out: tests/unit/test_s3_store.py)."""
    url = f"s3://{new_bucket()}/runs/killed/checkpoint.bin"
    before = _state(4)
    _snapshot(tmp_path, url, before, 1)
    store = S3Store(url)
    with FaultProxy(endpoint()) as proxy:
        proxy.add("PUT", "partNumber=", "hold")
        writer = subprocess.Popen([sys.executable, "-c", WRITER, url, str(tmp_path)], cwd=REPO,
                                  env={**os.environ, "AWS_ENDPOINT_URL": proxy.url, "PYTHONPATH": str(REPO),
                                       "OMP_NUM_THREADS": "1"},
                                  stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        try:
            assert proxy.wait_for("PUT", "partNumber=", 1, timeout=90), "the writer never uploaded a part"
        finally:
            writer.send_signal(signal.SIGKILL)
            out = writer.communicate()[0]
        assert writer.returncode == -signal.SIGKILL and "committed" not in out, out
        assert proxy.count("POST", "uploads") == 1 and proxy.count("POST", "uploadId=") == 0
    # What the killed writer left: an open multipart upload, a stage no reader sees, its lock
    assert len(_uploads(store)) == 1
    assert _versions_in_bucket(store) == {"v00000001", "v00000002"}
    assert [(u.name, u.status) for u in store.uncommitted()] == [("v00000002", "stage")]
    assert store.read_commit().current.step == 1 and len(store.read_commit().versions) == 1
    _assert_restores(tmp_path, url, before, 1)

    if cleaner == "gc":
        done = CliRunner().invoke(app, ["gc", url, "--keep", "2"])
        assert done.exit_code == 0 and "removed v00000002" in done.output, done.output
        assert _versions_in_bucket(store) == {"v00000001"}
        _assert_restores(tmp_path, url, before, 1)
    else:
        after = _state(5)
        _snapshot(tmp_path, url, after, 3)
        assert _versions_in_bucket(store) == {"v00000001", "v00000003"}
        _assert_restores(tmp_path, url, after, 3)
    assert _uploads(store) == []


RECORD, LOCK_KEY = r"/checkpoint\.bin$", r"\.pyckpt/\.lock$"


@pytest.mark.parametrize("method, query, path, first, retry", [
    pytest.param("PUT", "", RECORD, 1, None, id="first-record"),   # If-None-Match: *, retried -> 412 against itself
    pytest.param("PUT", "", RECORD, 2, None, id="record"),         # If-Match: the ETag begin() read, retried -> 412
    pytest.param("PUT", "", LOCK_KEY, 1, None, id="lock-create"),  # If-None-Match: *, retried -> 412: its own lock
    pytest.param("POST", "uploadId=", "", 1, None, id="complete"),  # CompleteMultipartUpload: moto completes a retry
    pytest.param("POST", "uploadId=", "", 1, "no-such-upload", id="complete-nosuchupload"),   # as some stores answer
])
def test_a_lost_answer_to_a_request_that_took_effect_is_recognized_and_the_snapshot_commits(
        tmp_path, method, query, path, first, retry):
    """Server: moto behind the fault proxy, which forwards the request (moto carries it out) and then
    cuts the connection before the answer: botocore retries it, and the retry meets the request's own
    effect (a conditional PUT gets 412 PreconditionFailed; a second Complete is done again by moto,
    answered NoSuchUpload by the proxy in the last case). pyckpt must recognize its own write: the
    snapshot commits, nothing of it is deleted, no lock stays."""
    url = f"s3://{new_bucket()}/runs/lost/checkpoint.bin"
    old, new = _state(6), _state(7)
    with FaultProxy(endpoint()) as proxy:
        rule = proxy.add(method, query, "forward-cut", first=first, last=first, path=path)
        then = proxy.add(method, query, retry, first=first, last=first, path=path) if retry else None
        with proxy.environment():
            _snapshot(tmp_path, url, old, 1)
            _snapshot(tmp_path, url, new, 2)
        assert rule.fired == 1 and rule.seen > first                  # the fault happened, the request was retried
        assert then is None or then.fired == 1
    store = S3Store(url)
    assert [v.step for v in store.read_commit().versions] == [2, 1]
    assert _uploads(store) == [] and _versions_in_bucket(store) == {"v00000001", "v00000002"}
    assert not _lock_left(store)
    _assert_restores(tmp_path, url, new, 2)


def test_a_lost_answer_to_a_lock_renewal_keeps_the_lock_and_the_snapshot_commits(tmp_path, monkeypatch):
    """Server: moto behind the fault proxy, which forwards the first renewal of the lock and cuts its
    answer; the first UploadPart is held until the renewal was retried, so the renewal happens while
    the snapshot is under way. LOCK_LEASE is 1 s here (a renewal every 0.25 s). On moto (ETag = the
    body's MD5) the retried If-Match still matches; the next test covers stores where it does not."""
    monkeypatch.setattr(s3_store, "LOCK_LEASE", 1.0)
    url = f"s3://{new_bucket()}/runs/renewal/checkpoint.bin"
    state = _state(8)
    with FaultProxy(endpoint()) as proxy:
        renewal = proxy.add("PUT", "", "forward-cut", first=2, last=2, path=LOCK_KEY)   # 1: create, 2: renewal
        held = proxy.add("PUT", "partNumber=", "hold", first=1, last=1)
        with proxy.environment():
            waiter = threading.Thread(target=lambda: proxy.wait_for("PUT", "", 3, timeout=30, path=LOCK_KEY)
                                      and held.released.set())
            waiter.start()
            _snapshot(tmp_path, url, state, 4)
            waiter.join()
        assert renewal.fired == 1 and held.fired == 1 and proxy.count("PUT", path=LOCK_KEY) >= 3
    assert _versions_in_bucket(S3Store(url)) == {"v00000001"} and not _lock_left(S3Store(url))
    _assert_restores(tmp_path, url, state, 4)


def test_a_renewal_that_finds_its_own_lock_under_a_new_etag_keeps_it(monkeypatch):
    """Server: moto. Where ETags are not the body's MD5 (AWS with SSE-KMS), a renewal whose answer was
    lost leaves the writer with a stale ETag, and the retried If-Match gets 412 against its own write.
    moto's ETags are MD5s, so the test puts the lease in that state itself (a stale ETag, its own body
    in the bucket): the renewal must adopt the new ETag, keep the lock and release it at the end."""
    monkeypatch.setattr(s3_store, "LOCK_LEASE", 0.4)
    store = S3Store(f"s3://{new_bucket()}/runs/etag/checkpoint.bin")
    with store.locked():
        real = store._lease.etag
        store._lease.etag = '"00000000000000000000000000000000"'
        time.sleep(0.35)                                    # three renewals: 412, then with the adopted ETag
        assert not store._lease.lost and store._lease.etag == real
        store._check_lock()                                 # publish() would go ahead
    assert not _lock_left(store)                            # released


DATA, MANIFEST_KEY = r"/data-0\.bin$", r"/manifest\.json$"


@pytest.mark.parametrize("action, path, times", [
    pytest.param("slowdown", DATA, 2, id="data-slowdown"),        # ranged GETs of the data object throttled
    pytest.param("truncate", DATA, 2, id="data-cut-mid-body"),    # ... and cut in the middle of their body
    pytest.param("slowdown", RECORD, 1, id="record-slowdown"),
    pytest.param("truncate", RECORD, 1, id="record-cut-mid-body"),
    pytest.param("truncate", MANIFEST_KEY, 1, id="manifest-cut-mid-body"),
])
def test_a_throttled_or_cut_read_is_retried_and_restore_and_load_are_bit_exact(tmp_path, action, path, times):
    """Server: moto behind the fault proxy, faulting GETs during restore() and again during
    pyckpt.load(): a 503 is retried by botocore, a body cut mid-way is asked again by pyckpt."""
    url = f"s3://{new_bucket()}/runs/reads/checkpoint.bin"
    state = _state(9)
    _snapshot(tmp_path, url, state, 5)
    fresh = {k: torch.zeros_like(v) for k, v in state.items()}
    runtime = _runtime(fresh, 0)
    with FaultProxy(endpoint()) as proxy, proxy.environment():
        during_restore = proxy.add("GET", "", action, first=1, last=times, path=path)
        with _coordinator(tmp_path) as coordinator:
            assert coordinator.restore(url, runtime)
        assert during_restore.fired == times
        during_load = proxy.add("GET", "", action, first=1, last=times, path=path)
        loaded = pyckpt.load(url)
        assert during_load.fired == times and proxy.count("GET", path=path) > 2 * times    # and asked again
    assert runtime.step == 5 and loaded["progress"]["step"] == 5
    for key, tensor in state.items():
        assert torch.equal(fresh[key], tensor) and torch.equal(loaded["objects"]["state"][key], tensor), key


@pytest.mark.parametrize("path, key", [
    pytest.param("", "checkpoint.bin", id="every-get"),             # the commit record cannot be read
    pytest.param(DATA, "v00000001/data-0.bin", id="data-gets"),     # record and manifest read, the data not
])
def test_a_server_that_refuses_every_read_gives_a_clean_read_error_and_restores_nothing(
        tmp_path, monkeypatch, capfd, path, key):
    """Server: moto behind the fault proxy answering 503 SlowDown to every GET (or every GET of the
    data object). AWS_MAX_ATTEMPTS=2 keeps the test short."""
    url = f"s3://{new_bucket()}/runs/unreadable/checkpoint.bin"
    state = _state(10)
    _snapshot(tmp_path, url, state, 6)
    monkeypatch.setenv("AWS_MAX_ATTEMPTS", "2")
    runtime = _runtime({k: torch.zeros_like(v) for k, v in state.items()}, 0)
    capfd.readouterr()
    with FaultProxy(endpoint()) as proxy, proxy.environment():
        rule = proxy.add("GET", "", "slowdown", path=path)
        with pytest.raises(pyckpt.SnapshotReadError) as restoring, _coordinator(tmp_path) as coordinator:
            coordinator.restore(url, runtime)
        with pytest.raises(pyckpt.SnapshotReadError) as loading:
            pyckpt.load(url)
    out, errors = capfd.readouterr()
    assert rule.fired >= 2 * 2                                  # each refused read tried twice
    for err in (restoring, loading):
        text = str(err.value)
        assert f"s3://{S3Store(url).bucket}/runs/unreadable/checkpoint.bin" in text and key in text, text
        assert proxy.url in text and "SlowDown" in text, text
    assert runtime.step == 0 and "Traceback" not in out + errors       # nothing claimed restored
    _assert_restores(tmp_path, url, state, 6)                         # the server answers again: all there


def test_the_server_gone_mid_upload_fails_cleanly_in_bounded_time_and_the_next_snapshot_commits(
        tmp_path, monkeypatch, capfd):
    """Server: moto behind the fault proxy, which is stopped while it holds the UploadParts: the
    connections in flight are reset and new ones refused, which is how a killed server looks to the
    client. moto itself is not killed: it keeps every object in its process's memory, so killing it
    would lose the previous version too, which a real store (data on disk) does not; stopping the
    proxy gives the client the same view while the data survives, as on a store that comes back.
    AWS_MAX_ATTEMPTS=2 bounds the time. The lock the failed writer could not delete is a lease:
    LOCK_LEASE is 2 s here so that the next snapshot may take it over."""
    monkeypatch.setattr(s3_store, "LOCK_LEASE", 2.0)
    url = f"s3://{new_bucket()}/runs/gone/checkpoint.bin"
    store, before, after = S3Store(url), _state(11), _state(12)
    _snapshot(tmp_path, url, before, 1)
    monkeypatch.setenv("AWS_MAX_ATTEMPTS", "2")
    capfd.readouterr()
    with FaultProxy(endpoint()) as proxy:
        proxy.add("PUT", "partNumber=", "hold")
        killer = threading.Thread(target=lambda: proxy.wait_for("PUT", "partNumber=", timeout=30) and proxy.stop())
        killer.start()
        start = time.monotonic()
        with proxy.environment(), pytest.raises(pyckpt.SnapshotError) as err:
            _snapshot(tmp_path, url, after, 2)
        took = time.monotonic() - start
        killer.join()
        out, errors = capfd.readouterr()
        text = str(err.value)
        assert took < 15, f"gave up after {took:.1f} s"
        assert "previous snapshot is intact" in text and f"cannot reach {proxy.url}" in text, text
        assert "Traceback" not in out + errors
        # What the failed writer could not remove (the server was gone), asked of moto directly:
        # its upload, its stage and its lock
        assert len(_uploads(store)) == 1 and _lock_left(store)
        assert _versions_in_bucket(store) == {"v00000001", "v00000002"}
        assert store.read_commit().current.step == 1 and len(store.read_commit().versions) == 1
        proxy.rules.clear()
        proxy.start()                                   # the server is back, on the same address, without faults
        with proxy.environment():
            _assert_restores(tmp_path, url, before, 1)
            time.sleep(2.5)                             # the dead writer's lease runs out
            _snapshot(tmp_path, url, after, 3)
    assert _uploads(store) == [] and not _lock_left(store)
    assert _versions_in_bucket(store) == {"v00000001", "v00000003"}
    _assert_restores(tmp_path, url, after, 3)


@pytest.mark.parametrize("readable", [pytest.param(True, id="record-readable"),
                                      pytest.param(False, id="record-unreadable")])
def test_every_answer_to_the_commit_lost_commits_or_says_the_outcome_is_unknown(tmp_path, monkeypatch, readable):
    """Server: moto behind the fault proxy, which carries out the commit record's PUT and every retry
    of it and drops every answer (the retries are refused by moto with 412 and that answer is lost
    too), so botocore gives up with a connection error although the first PUT took effect. If the
    record can be read back, it is this writer's: committed. If not (the proxy refuses the record's
    GETs after begin() read it), the error says the outcome is unknown and the version is kept; once
    the server answers again, the record names it and it restores."""
    monkeypatch.setenv("AWS_MAX_ATTEMPTS", "2")
    url = f"s3://{new_bucket()}/runs/unknown/checkpoint.bin"
    old, new = _state(13), _state(14)
    _snapshot(tmp_path, url, old, 1)
    with FaultProxy(endpoint()) as proxy, proxy.environment():
        puts = proxy.add("PUT", "", "forward-cut", path=RECORD)
        if not readable:
            proxy.add("GET", "", "slowdown", first=2, path=RECORD)         # the first is begin()'s
            with pytest.raises(pyckpt.SnapshotError) as err:
                _snapshot(tmp_path, url, new, 2)
            assert "whether v00000002 is committed is unknown" in str(err.value), str(err.value)
        else:
            _snapshot(tmp_path, url, new, 2)
        assert puts.fired == 2                                   # the PUT and its retry, answers lost
    assert [v.step for v in S3Store(url).read_commit().versions] == [2, 1]
    _assert_restores(tmp_path, url, new, 2)
