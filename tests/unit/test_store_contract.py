"""The contract of the storage seam (pyckpt/storage.py): what every backend must do, checked through
the Store and DataSource protocols only. A new backend passes by adding one entry to BACKENDS (a
function that makes an empty store for a test); nothing here may know a backend's layout.

Backends run for real: the POSIX directory on this machine's disk (tmp_path); S3 on two servers, a
bucket per test (tests/s3server.py): moto's ("s3-moto", an emulator over real HTTP: its conditional
writes are not atomic, which no test here races, and it accepts any credentials) and a real Ceph RGW
16.2 ("s3-ceph", bench/cephrgw.py: one node on loopback, data in memory; checks signatures and
conditions, but shows no real network nor several gateways)."""
from __future__ import annotations

import dataclasses
import threading
import time

import numpy as np
import pytest
from xxhash import xxh3_64_hexdigest

from pyckpt.errors import IntegrityError, SnapshotLockedError, SnapshotNotFoundError
from pyckpt.manifest import FileRecord, Manifest, Piece, TensorRecord, checksum, data_file_name
from pyckpt.planner import Slice
from pyckpt.posix_store import PosixStore
from pyckpt.storage import Stage, Store
from pyckpt.stores import open_store
from tests.s3server import new_bucket, point_at


def _s3(server: str):
    def make(tmp_path, monkeypatch) -> Store:
        point_at(server, monkeypatch)
        return open_store(f"s3://{new_bucket()}/snapshots/ck.bin")
    return make


BACKENDS = {
    "posix": lambda tmp_path, monkeypatch: PosixStore(tmp_path / "ck.bin"),
    "s3-moto": _s3("moto"),
    "s3-ceph": _s3("ceph"),
}


@pytest.fixture(params=sorted(BACKENDS))
def store(request, tmp_path, monkeypatch) -> Store:
    return BACKENDS[request.param](tmp_path, monkeypatch)


def _payload(rank: int, step: int, size: int = 300_000) -> bytes:
    return np.random.default_rng(1000 * step + rank).integers(0, 256, size, dtype=np.uint8).tobytes()


def _segments(data: bytes, cut: int = 4096 * 3 + 17) -> list[tuple[Slice, memoryview]]:
    """Two slices of one tensor's bytes (each with the whole tensor's view, as capture gives them) with
    a zero-filled gap between them in the file (as the planner's alignment leaves)."""
    view = memoryview(data)
    return [(Slice(0, 0, 0, cut), view), (Slice(0, cut, cut + 47, len(data) - cut), view)]


def _file_bytes(data: bytes, cut: int = 4096 * 3 + 17) -> bytes:
    return data[:cut] + bytes(47) + data[cut:]


def _write_version(store: Store, step: int, world: int = 2, keep_last: int = 2, reuse: bool = False) -> str:
    """One whole snapshot through the seam, as the commit protocol drives it; returns the version name."""
    with store.locked():
        stage = store.begin()
        files, tensors = [], []
        for rank in range(world):
            data = _payload(rank, step)
            digests = store.write_data(stage, rank, _segments(data), len(_file_bytes(data)), reuse=reuse)
            assert digests == [xxh3_64_hexdigest(data[s.src_offset: s.src_offset + s.length])
                               for s, _ in _segments(data)]
            files.append(FileRecord(data_file_name(rank), len(_file_bytes(data))))
            tensors.append(TensorRecord("uint8", [len(data)], len(data),
                                        [Piece(rank, s.file_offset, s.length, d)
                                         for (s, _), d in zip(_segments(data), digests)]))
        tree = {"D": [[f"t{r}", {"T": r}] for r in range(world)]}
        manifest = Manifest(world, files, tensors, tree, [{"D": []}] * world, {"step": step})
        store.keep_spares(keep_last if reuse else None)
        store.publish(stage, manifest.to_json(), {"step": step}, keep_last)
    return stage.name


def _read_all(store: Store, name: str | None = None) -> dict[int, bytes]:
    record = store.read_commit()
    ref = record.current if name is None else next(v for v in record.versions if v.name == name)
    manifest = store.read_manifest(ref)
    sources = store.open_data(ref, manifest)
    try:
        out = {}
        for index, source in sources.items():
            buf = bytearray(source.size)
            assert source.read_into(0, [memoryview(buf)]) == source.size
            out[index] = bytes(buf)
        return out
    finally:
        for source in sources.values():
            source.close()


def test_an_empty_store_has_no_snapshot(store):
    assert not store.exists() and store.committed() is None and store.uncommitted() == []
    with pytest.raises(SnapshotNotFoundError):
        store.read_commit()


def test_a_published_version_reads_back_exactly(store):
    name = _write_version(store, step=1)
    record = store.read_commit()
    assert [v.name for v in record.versions] == [name] and record.current.step == 1
    manifest = store.read_manifest(record.current)
    assert manifest.meta["step"] == 1 and manifest.world_size == 2
    assert _read_all(store) == {r: _file_bytes(_payload(r, 1)) for r in range(2)}
    assert store.uncommitted() == []


def test_a_stage_is_invisible_until_published_and_listed_as_uncommitted(store):
    first = _write_version(store, step=1)
    with store.locked():
        stage = store.begin()
        store.write_data(stage, 0, _segments(_payload(0, 2)), len(_file_bytes(_payload(0, 2))))
        assert store.read_commit().current.name == first       # readers still see the committed version
        assert _read_all(store)[0] == _file_bytes(_payload(0, 1))
    assert [(u.name.split(".")[0], u.status) for u in store.uncommitted()] == [(stage.name, "stage")]
    assert stage.name > first


def test_abort_removes_the_stage_and_version_names_still_increase(store):
    first = _write_version(store, step=1)
    with store.locked():
        stage = store.begin()
        store.write_data(stage, 0, _segments(_payload(0, 2)), len(_file_bytes(_payload(0, 2))))
        store.abort(stage)
    assert store.uncommitted() == []
    second = _write_version(store, step=3)
    assert first < stage.name <= second and store.read_commit().current.name == second


def test_publish_keeps_the_newest_and_gc_deletes_what_the_record_dropped(store):
    names = [_write_version(store, step=s, keep_last=2) for s in (1, 2, 3)]
    assert [v.name for v in store.read_commit().versions] == names[:0:-1]
    dropped = [u.name for u in store.uncommitted()]
    assert dropped == [names[0]] and all(u.status == "orphan" for u in store.uncommitted())
    assert store.gc(2, dry_run=True) == dropped and [u.name for u in store.uncommitted()] == dropped
    assert store.gc(2) == dropped
    assert store.uncommitted() == [] and _read_all(store, names[1]) == {r: _file_bytes(_payload(r, 2)) for r in (0, 1)}
    store.gc(1)
    assert [v.name for v in store.read_commit().versions] == [names[2]]


def test_gc_removes_stages_of_crashed_writers(store):
    _write_version(store, step=1)
    with store.locked():
        store.begin()               # a writer that never finishes
    assert [u.status for u in store.uncommitted()] == ["stage"]
    store.gc(2)
    assert store.uncommitted() == []
    assert store.read_commit().current.step == 1


def test_reused_files_hold_the_new_bytes(store):
    for step in range(1, 6):
        _write_version(store, step=step, keep_last=1, reuse=True)
        store.gc(1)
        assert _read_all(store) == {r: _file_bytes(_payload(r, step)) for r in range(2)}
    store.gc(1, spares=True)
    assert store.uncommitted() == []


def test_one_writer_at_a_time(store):
    with store.locked():
        with pytest.raises(SnapshotLockedError):
            with store.locked():
                pass
    with store.locked():      # released
        pass


def test_gc_waits_for_a_short_maintenance_lock_and_a_writer_waits_for_gc(store):
    _write_version(store, step=1)
    release = threading.Event()

    def hold_gc_lock():
        with store.locked("gc"):
            release.wait(10)
    holder = threading.Thread(target=hold_gc_lock)
    holder.start()
    time.sleep(0.2)
    threading.Timer(0.5, release.set).start()
    started = time.monotonic()
    name = _write_version(store, step=2)        # waits for gc, then commits
    holder.join()
    assert time.monotonic() - started >= 0.3 and store.read_commit().current.name == name


def test_a_manifest_that_does_not_match_the_record_is_refused(store):
    _write_version(store, step=1)
    ref = store.read_commit().current
    for wrong in (dataclasses.replace(ref, manifest_xxh3=checksum(b"other")),
                  dataclasses.replace(ref, manifest_size=ref.manifest_size + 1)):
        with pytest.raises(IntegrityError):
            store.read_manifest(wrong)


def test_data_sources_read_any_range_and_stop_at_the_end(store):
    _write_version(store, step=1)
    ref = store.read_commit().current
    sources = store.open_data(ref, store.read_manifest(ref))
    expected = _file_bytes(_payload(1, 1))
    source = sources[1]
    try:
        assert source.size == len(expected) and isinstance(source.where, str) and source.where
        a, b = bytearray(100), bytearray(5000)
        assert source.read_into(12_345, [memoryview(a), memoryview(b)]) == 5100
        assert bytes(a + b) == expected[12_345: 17_445]
        tail = bytearray(1000)
        assert source.read_into(len(expected) - 10, [memoryview(tail)]) == 10
        assert source.read_into(len(expected), [memoryview(tail)]) == 0
        assert isinstance(source.cached(0, 4096), bool)
        other = source.copy()
        source.close()                       # copies are independent handles
        assert other.read_into(0, [memoryview(a)]) == 100 and bytes(a) == expected[:100]
        direct = other.direct()
        if direct is not None:               # aligned reads that bypass the cache read the same bytes
            window = memoryview(np.zeros(8192 + 4096, dtype=np.uint8))
            start = (-window.obj.ctypes.data) % 4096
            aligned = window[start: start + 8192]
            assert direct.read_into(4096, [aligned]) == 8192 and bytes(aligned) == expected[4096: 12_288]
            direct.close()
        other.close()
    finally:
        for s in sources.values():
            s.close()


def test_where_names_the_version(store):
    name = _write_version(store, step=1)
    assert name in store.where(name) and data_file_name(0) in store.where(name, data_file_name(0))


def test_the_stage_type_is_what_begin_returns(store):
    with store.locked():
        stage = store.begin()
        assert isinstance(stage, Stage) and stage.name.startswith("v")
        store.abort(stage)
