"""pyckpt.reader.ShardRead on a real data file: a resharded read takes part of the pieces at the
edges of what a rank needs (and, for a column block, of every piece under it), reads them whole (a
checksum covers a whole piece), and gives them scratch memory only as their read job runs. Before,
every edge piece got its scratch when the read was planned and kept it to the end: a 20,000-tensor
state restored 1 -> 4 ranks held 1.3 GiB of scratch per rank for 384 MiB of state
(docs/PERFORMANCE.md, "Sharded bench"); a column block (a tensor-parallel reshard) held scratch for
all the pieces under it. Each helper thread now reuses one scratch buffer for all its jobs."""
from __future__ import annotations

import contextlib
import os
import threading
import time
from types import SimpleNamespace

import pytest
import torch

from pyckpt.boxes import Box
from pyckpt.errors import IntegrityError
from pyckpt.manifest import Chunk, FileRecord, Manifest, Piece, TensorRecord, checksum
from pyckpt.posix_store import PosixSource
from pyckpt import reader
from pyckpt.reader import ShardRead, Snapshot
from pyckpt.shards import Edge, Strided, Target
from pyckpt.sysio import helper_pool

ROWS, COLS, PIECE = 64, 256, 16 << 10       # a 64 KiB float32 tensor in four 16 KiB pieces
TENSORS = 40


def _snapshot(tmp_path) -> tuple[Snapshot, list[torch.Tensor], str]:
    """TENSORS tensors saved as one chunk each (a 1-rank save) in a real data file."""
    torch.manual_seed(0)
    tensors = [torch.randn(ROWS, COLS) for _ in range(TENSORS)]
    path = str(tmp_path / "data-0.bin")
    records, offset = [], 0
    with open(path, "wb") as f:
        for t in tensors:
            data = t.numpy().tobytes()
            f.write(data)
            pieces = [Piece(0, offset + start, PIECE, checksum(data[start: start + PIECE]))
                      for start in range(0, len(data), PIECE)]
            offset += len(data)
            records.append(TensorRecord("float32", [ROWS, COLS], len(data), [],
                                        [Chunk([0, 0], [ROWS, COLS], pieces, [0])], "(Shard(dim=0),)"))
    manifest = Manifest(1, [FileRecord("data-0.bin", offset)], records, {"L": []}, [{"D": []}], {}, 2)
    fd = os.open(path, os.O_RDONLY)
    store = SimpleNamespace(where=lambda *parts: str(tmp_path / "/".join(parts)))
    snap = Snapshot(store, SimpleNamespace(name="v1"), manifest, {0: PosixSource(fd, path, offset)})
    return snap, tensors, path


def _rows(first: int, stop: int) -> Target:
    """What a rank holding rows [first, stop) of each tensor needs (an FSDP2 shard on another world size)."""
    box = Box((first, 0), (stop - first, COLS))
    return Target([(box, Box((0, 0), box.sizes))], box.sizes, None, lambda value: value)


def _cols(first: int, stop: int) -> Target:
    """What a rank holding columns [first, stop) of each tensor needs (a Shard(1) tensor-parallel shard)."""
    box = Box((0, first), (ROWS, stop - first))
    return Target([(box, Box((0, 0), box.sizes))], box.sizes, None, lambda value: value)


def _read(snap: Snapshot, first: int, stop: int, direct: bool, of=_rows) -> tuple[list, int, list]:
    """Rows (or columns, of=_cols) [first, stop) of every tensor: the planned destinations of the pieces
    (before any is read), the bytes read, and the values."""
    with ShardRead(snap, list(range(TENSORS)), [of(first, stop) for _ in range(TENSORS)]) as read:
        planned = [item.view for job in read.jobs for item in job.pieces]
        read_bytes = read.bytes_read
        read.run(direct=direct)
        return planned, read_bytes, read.values()


@pytest.mark.parametrize("direct", [True, False], ids=["direct", "buffered"])
def test_edge_pieces_are_read_whole_and_only_their_part_is_kept(tmp_path, direct):
    snap, tensors, _ = _snapshot(tmp_path)
    # rows 10-30 are bytes 10 KiB-30 KiB: parts of pieces 0 and 1, both edges
    planned, read_bytes, values = _read(snap, 10, 30, direct)
    # planned without scratch: every piece is an Edge, none holds memory yet
    assert [type(view) for view in planned] == [Edge] * (2 * TENSORS)
    assert read_bytes == 2 * PIECE * TENSORS
    for value, tensor in zip(values, tensors):
        assert torch.equal(value, tensor[10:30])


def test_whole_pieces_go_straight_into_place(tmp_path):
    snap, tensors, _ = _snapshot(tmp_path)
    # rows 16-48 are exactly pieces 1 and 2
    planned, read_bytes, values = _read(snap, 16, 48, direct=False)
    assert all(type(view) is memoryview for view in planned) and read_bytes == 2 * PIECE * TENSORS
    for value, tensor in zip(values, tensors):
        assert torch.equal(value, tensor[16:48])


def test_a_flipped_byte_in_an_edge_piece_is_caught(tmp_path):
    snap, tensors, path = _snapshot(tmp_path)
    # byte 100 of tensor 3: in its first piece, outside the rows kept (10-30), so only the whole-piece
    # checksum can see it
    with open(path, "r+b") as f:
        f.seek(3 * ROWS * COLS * 4 + 100)
        byte = f.read(1)
        f.seek(-1, os.SEEK_CUR)
        f.write(bytes([byte[0] ^ 0xFF]))
    with pytest.raises(IntegrityError, match="checksum mismatch"):
        _read(snap, 10, 30, direct=False)


@pytest.mark.parametrize("direct", [True, False], ids=["direct", "buffered"])
def test_a_column_block_is_read_piece_by_piece_into_job_scratch(tmp_path, direct):
    snap, tensors, _ = _snapshot(tmp_path)
    # columns 100-200 of every row: all four pieces hold some, none is contiguous in the destination
    planned, read_bytes, values = _read(snap, 100, 200, direct, of=_cols)
    assert [type(view) for view in planned] == [Strided] * (4 * TENSORS)   # no scratch at planning
    assert read_bytes == 4 * PIECE * TENSORS
    for value, tensor in zip(values, tensors):
        assert torch.equal(value, tensor[:, 100:200])


def test_a_flipped_byte_under_a_column_block_is_caught(tmp_path):
    snap, tensors, path = _snapshot(tmp_path)
    with open(path, "r+b") as f:   # tensor 5, row 40, column 0: outside the block, inside a piece read
        f.seek(5 * ROWS * COLS * 4 + 40 * COLS * 4)
        byte = f.read(1)
        f.seek(-1, os.SEEK_CUR)
        f.write(bytes([byte[0] ^ 0xFF]))
    with pytest.raises(IntegrityError, match="checksum mismatch"):
        _read(snap, 100, 200, direct=False, of=_cols)


@contextlib.contextmanager
def _counting_empty(monkeypatch):
    """The first argument (the size) of every torch.empty call made inside, from any thread."""
    sizes = []
    real_empty = torch.empty

    def counting_empty(*args, **kwargs):
        sizes.append(args[0])
        return real_empty(*args, **kwargs)

    monkeypatch.setattr(torch, "empty", counting_empty)
    try:
        yield sizes
    finally:
        monkeypatch.setattr(torch, "empty", real_empty)


def test_edge_jobs_reuse_one_scratch_buffer_per_thread(tmp_path, monkeypatch):
    """A new scratch tensor per job made glibc raise its mmap threshold once the first was freed; the
    later ones came from the threads' arenas and stayed (a first 1 -> 4 restore of the 20,000-tensor
    state kept 330-410 MiB per rank). Each helper thread now reuses one buffer for the whole read."""
    monkeypatch.setattr(PosixSource, "job_bytes", 2 * PIECE)   # one job per tensor: 40 jobs
    snap, tensors, _ = _snapshot(tmp_path)
    with ShardRead(snap, list(range(TENSORS)), [_rows(10, 30) for _ in range(TENSORS)]) as read:
        assert len(read.jobs) == TENSORS
        with _counting_empty(monkeypatch) as allocated:
            read.run(direct=False)
        values = read.values()
    assert 1 <= len(allocated) <= helper_pool()._max_workers   # threads, not jobs
    for value, tensor in zip(values, tensors):
        assert torch.equal(value, tensor[10:30])


def test_column_block_jobs_hold_scratch_per_thread_not_per_block(tmp_path, monkeypatch):
    """A column block's pieces used to get their scratch when the read was planned, all at once: a
    fresh optimizer restored on a new tensor-parallel degree held twice its local state. Now a job
    holds at most SPILL_JOB bytes of pieces read into scratch (two pieces: 2 x 16 KiB here), and each
    helper thread one buffer of that size for the whole read."""
    monkeypatch.setattr(reader, "SPILL_JOB", 2 * PIECE)
    snap, tensors, _ = _snapshot(tmp_path)
    with _counting_empty(monkeypatch) as allocated, \
            ShardRead(snap, list(range(TENSORS)), [_cols(3, 251) for _ in range(TENSORS)]) as read:
        planned = len(allocated)     # the destination tensors only
        assert [len(job.pieces) for job in read.jobs] == [2] * (2 * TENSORS)
        read.run(direct=False)
        scratch = allocated[planned:]
        values = read.values()
    assert planned == TENSORS
    assert 1 <= len(scratch) <= helper_pool()._max_workers and max(scratch) == 2 * PIECE
    for value, tensor in zip(values, tensors):
        assert torch.equal(value, tensor[:, 3:251])


def test_a_started_read_settles_before_its_files_close(tmp_path, monkeypatch):
    """A restore starts reading its sharded tensors as soon as they are planned, and on a failure
    anywhere after that settles the read (waits for every job, raising nothing) before its files
    close: a job may not find them closed, or find their descriptors reused. One job fails here."""
    monkeypatch.setattr(PosixSource, "job_bytes", 4 * PIECE)   # a job per tensor: 40 jobs on the helper threads
    snap, _, _ = _snapshot(tmp_path)
    real = ShardRead._read_batch
    ran, broken = [], []

    def slow(self, source, direct, batch):
        time.sleep(0.01)
        try:
            real(self, source, direct, batch)
        except Exception as exc:   # the files were closed under it
            broken.append(exc)
            raise
        ran.append(threading.get_ident())
        if len(ran) == 1:
            raise OSError(5, "Input/output error")
    monkeypatch.setattr(ShardRead, "_read_batch", slow)
    read = ShardRead(snap, list(range(TENSORS)), [_rows(0, ROWS) for _ in range(TENSORS)])
    assert len(read.jobs) == TENSORS
    running = read.start(direct=False)
    running.settle()                     # raises nothing, though a job failed
    assert running.done() and len(ran) == TENSORS
    read.close()
    assert broken == []
    with pytest.raises(OSError, match="Input/output error"):
        running.wait()                   # the error is still there for whoever waits on the read
