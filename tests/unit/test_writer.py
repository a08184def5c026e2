"""writer.write_file: the O_DIRECT path (aligned ring buffers) and the buffered path (writev from
tensor memory) write the same bytes and checksums, whatever the piece sizes, gaps and tail; where the
filesystem refuses O_DIRECT the buffered path takes over. Real files in pytest's tmp dir (ext4 here)."""
from __future__ import annotations

import errno
import random
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest

from pyckpt import writer
from pyckpt.manifest import checksum
from pyckpt.planner import Slice
from tests.conftest import accepts_direct_io


def _layout(seed: int, count: int, max_len: int):
    """Random pieces at 64-byte aligned offsets with gaps, as the planner lays them out, plus a tail."""
    rng = random.Random(seed)
    slices, pos = [], 0
    for i in range(count):
        length = rng.randint(0, max_len)
        src = rng.randint(0, 100)
        view = memoryview(np.frombuffer(rng.randbytes(src + length + rng.randint(0, 9)), dtype=np.uint8))
        pos += -pos % 64 + rng.choice([0, 0, 64, 4096])
        slices.append((Slice(i, src, pos, length), view))
        pos += length
    return slices, pos + rng.randint(0, 5000)


def _expected(slices, size: int) -> bytes:
    out = bytearray(size)
    for (_, src, offset, length), view in slices:
        out[offset: offset + length] = view[src: src + length]
    return bytes(out)


@pytest.mark.parametrize("seed,count,max_len", [(1, 1, 10), (2, 300, 5000), (3, 40, 3 << 20), (4, 5, 20 << 20)])
@pytest.mark.parametrize("direct", [True, False])
def test_file_holds_exactly_the_slices_and_their_checksums(tmp_path, seed, count, max_len, direct):
    slices, size = _layout(seed, count, max_len)
    path = str(tmp_path / "data-0.bin")
    digests = writer.write_file(path, slices, size, direct=direct)
    with open(path, "rb") as f:
        assert f.read() == _expected(slices, size)
    assert digests == [checksum(view[src: src + length]) for (_, src, _, length), view in slices]


def test_direct_io_is_used_where_the_filesystem_takes_it(tmp_path, monkeypatch):
    if not accepts_direct_io(str(tmp_path)):
        pytest.skip("this filesystem refuses O_DIRECT")
    modes = []
    original = writer._set_direct
    monkeypatch.setattr(writer, "_set_direct", lambda fd, on: modes.append(on) or original(fd, on))
    slices, size = _layout(5, 50, 100_000)
    writer.write_file(str(tmp_path / "d.bin"), slices, size)
    assert modes == [True]      # switched on once, never switched back off (no fallback)


def test_filesystem_refusing_direct_writes_gets_the_buffered_path(tmp_path, monkeypatch):
    """A filesystem that accepts the O_DIRECT flag but fails the writes with EINVAL (alignment it
    does not take): the file is rewritten the buffered way, and the result is the same."""
    def refuse(fd, data, offset):
        raise OSError(errno.EINVAL, "Invalid argument")
    monkeypatch.setattr(writer, "_pwrite_all", refuse)
    slices, size = _layout(6, 200, 200_000)
    path = str(tmp_path / "d.bin")
    digests = writer.write_file(path, slices, size)
    with open(path, "rb") as f:
        assert f.read() == _expected(slices, size)
    assert len(digests) == len(slices)


def test_a_write_error_other_than_einval_is_raised(tmp_path, monkeypatch):
    def full(fd, data, offset):
        raise OSError(errno.ENOSPC, "No space left on device")
    monkeypatch.setattr(writer, "_pwrite_all", full)
    slices, size = _layout(7, 20, 2 << 20)
    with pytest.raises(OSError) as info:
        writer.write_file(str(tmp_path / "d.bin"), slices, size)
    assert info.value.errno == errno.ENOSPC


def test_two_files_written_at_once_share_no_buffer(tmp_path):
    """Two coordinators in one process may write at the same time: the reused direct-write buffers
    go to one writer at a time, so neither file gets the other's bytes."""
    jobs = [_layout(seed, 60, 1 << 20) for seed in (8, 9)]
    with ThreadPoolExecutor(2) as pool:
        list(pool.map(lambda k: writer.write_file(str(tmp_path / f"{k}.bin"), *jobs[k]), (0, 1)))
    for k, (slices, size) in enumerate(jobs):
        with open(tmp_path / f"{k}.bin", "rb") as f:
            assert f.read() == _expected(slices, size)
