"""Snapshot reads: the O_DIRECT path (aligned 4 MiB windows copied out into the tensors) and the
buffered path (preadv straight into the tensors) return the same exact state, for tensors that
straddle windows, are split into several pieces or are empty; where the filesystem refuses direct
reads the buffered path takes over; a flipped byte on disk is caught on either path. Real files in
pytest's tmp dir (ext4 here)."""
from __future__ import annotations

import errno
import os

import pytest
import torch

import pyckpt
from pyckpt import IntegrityError, posix_store, reader
from tests.conftest import StateHolder, accepts_direct_io


def _state() -> dict:
    """Sizes chosen around the 4 MiB read window and the 16 MiB piece limit, several dtypes."""
    g = torch.Generator().manual_seed(3)
    sizes = {"empty": 0, "one": 1, "odd": 4099, "under_window": (4 << 20) - 3, "over_window": (4 << 20) + 5,
             "straddles": 9 << 20, "tiny": 17, "several_pieces": (70 << 20) + 11}
    out = {name: torch.randint(0, 256, (n,), dtype=torch.uint8, generator=g) for name, n in sizes.items()}
    out["half"] = torch.randn(1000, 37, generator=g).half()
    out["long"] = torch.randint(-2**40, 2**40, (3, 5000), generator=g)
    return out


@pytest.fixture
def saved(snap_path):
    state = _state()
    runtime = pyckpt.TrainingRuntime(capture_rng=False)
    runtime.register("holder", StateHolder(state))
    with pyckpt.DistributedCoordinator(pyckpt.load_config(environ={})) as c:
        c.snapshot(snap_path, runtime)
    _evict(pyckpt.Snapshot.open(snap_path))
    return snap_path, state


def _evict(snap) -> None:
    """Drop the data files from the page cache (a cold read)."""
    for index in range(len(snap.manifest.files)):
        fd = os.open(snap.file_path(index), os.O_RDONLY)
        try:
            os.fdatasync(fd)
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        finally:
            os.close(fd)


def _assert_exact(loaded: dict, state: dict) -> None:
    assert loaded.keys() == state.keys()
    for name, tensor in state.items():
        assert loaded[name].dtype == tensor.dtype and torch.equal(loaded[name], tensor), name


def _count_direct(monkeypatch) -> list:
    results = []
    original = reader._read_direct
    monkeypatch.setattr(reader, "_read_direct", lambda *a: results.append(original(*a)) or results[-1])
    return results


@pytest.mark.parametrize("direct", [True, False])
def test_both_paths_read_the_exact_state(saved, monkeypatch, direct):
    path, state = saved
    results = _count_direct(monkeypatch)
    loaded = pyckpt.Snapshot.open(path).replicated(direct=direct)
    _assert_exact(loaded["objects"]["holder"], state)
    if not direct:
        assert results == []
    elif accepts_direct_io(os.path.dirname(path)):
        assert results and all(results)   # every read job went direct, none fell back


def test_ranges_in_the_page_cache_are_copied_from_it(saved, monkeypatch):
    """A warm file is not read from the disk again: direct reads only for what is not cached."""
    path, state = saved
    if not accepts_direct_io(os.path.dirname(path)):
        pytest.skip("this filesystem refuses O_DIRECT")
    snap = pyckpt.Snapshot.open(path)
    snap.replicated(direct=False)            # through the page cache: now it holds the files
    cached = []                               # one verdict per read job
    real_in_page_cache = posix_store._in_page_cache
    monkeypatch.setattr(posix_store, "_in_page_cache",
                        lambda *a: cached.append(real_in_page_cache(*a)) or cached[-1])
    results = _count_direct(monkeypatch)
    _assert_exact(snap.replicated()["objects"]["holder"], state)
    # The kernel may reclaim some of those pages in between (memory pressure, DAMON reclaim):
    # exactly the jobs found uncached go direct, and the just-read files are mostly still cached.
    assert cached.count(True) > cached.count(False), cached
    assert len(results) == cached.count(False) and all(results)
    cached.clear()
    results.clear()
    _evict(snap)
    _assert_exact(snap.replicated()["objects"]["holder"], state)
    assert cached and not any(cached)
    assert len(results) == len(cached) and all(results)


def test_direct_reads_turned_down_fall_back_to_buffered(saved, monkeypatch):
    """A filesystem that takes the O_DIRECT flag but fails the reads with EINVAL."""
    path, state = saved
    direct_fds: set[int] = set()
    real_open_direct, real_preadv = reader._open_direct, os.preadv

    def open_direct(sources):
        out = real_open_direct(sources)
        direct_fds.update(source.fd for source in out.values())
        return out

    def preadv(fd, iov, offset):
        if fd in direct_fds:
            raise OSError(errno.EINVAL, "Invalid argument")
        return real_preadv(fd, iov, offset)
    monkeypatch.setattr(reader, "_open_direct", open_direct)
    monkeypatch.setattr(reader.os, "preadv", preadv)
    results = _count_direct(monkeypatch)
    _assert_exact(pyckpt.Snapshot.open(path).replicated()["objects"]["holder"], state)
    if accepts_direct_io(os.path.dirname(path)):
        assert results and not any(results)


def test_filesystem_refusing_the_direct_flag_is_read_buffered(saved, monkeypatch):
    path, state = saved
    real_open = os.open

    def refuse_direct(name, flags, *args):
        if flags & os.O_DIRECT:
            raise OSError(errno.EINVAL, "Invalid argument")
        return real_open(name, flags, *args)
    monkeypatch.setattr(reader.os, "open", refuse_direct)
    results = _count_direct(monkeypatch)
    _assert_exact(pyckpt.Snapshot.open(path).replicated()["objects"]["holder"], state)
    assert results == []


@pytest.mark.parametrize("direct", [True, False])
def test_flipped_byte_is_caught_on_both_paths(saved, direct):
    path, _ = saved
    snap = pyckpt.Snapshot.open(path)
    names = snap.manifest.tensor_names()
    index = next(i for i, name in names.items() if name.endswith("several_pieces"))
    piece = snap.manifest.tensors[index].pieces[1]           # inside the second 16 MiB piece
    with open(snap.file_path(piece.file), "r+b") as f:
        f.seek(piece.offset + 5_000_000)
        byte = f.read(1)
        f.seek(-1, os.SEEK_CUR)
        f.write(bytes([byte[0] ^ 1]))
        os.fsync(f.fileno())
    with pytest.raises(IntegrityError, match="checksum mismatch in tensor .*several_pieces") as err:
        snap.replicated(direct=direct)
    assert err.value.file == snap.file_path(piece.file)


@pytest.mark.parametrize("direct", [True, False])
def test_snapshots_with_64_mib_pieces_still_read(snap_path, monkeypatch, direct):
    """Pieces were up to 64 MiB before they were cut to 16 MiB: the reader takes any piece size."""
    monkeypatch.setattr(pyckpt.planner, "MAX_PIECE", 64 << 20)
    g = torch.Generator().manual_seed(5)
    state = {"big": torch.randint(0, 256, ((70 << 20) + 11,), dtype=torch.uint8, generator=g)}
    runtime = pyckpt.TrainingRuntime(capture_rng=False)
    runtime.register("holder", StateHolder(state))
    with pyckpt.DistributedCoordinator(pyckpt.load_config(environ={})) as c:
        c.snapshot(snap_path, runtime)
    snap = pyckpt.Snapshot.open(snap_path)
    assert [p.length for p in snap.manifest.tensors[0].pieces] == [64 << 20, (6 << 20) + 11]
    _evict(snap)
    _assert_exact(snap.replicated(direct=direct)["objects"]["holder"], state)
