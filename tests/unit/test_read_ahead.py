"""ShardRead(read_ahead=True) on a real data file: read jobs start on the helper threads while the
rest of the read is still planned (a restore's plan of 20,000 tensors took as long as the cold read
of their bytes, one after the other). What is read, and every check, is the same as without it; a
file whose pieces are planned out of order is left to the end; files are never closed under a job
still reading, and a job's error is raised by run()."""
from __future__ import annotations

import threading

import pytest
import torch

from pyckpt import reader
from pyckpt.errors import IntegrityError
from pyckpt.posix_store import PosixSource
from pyckpt.reader import ShardRead

from test_shard_read import COLS, ROWS, TENSORS, _rows, _snapshot

JOB = 64 << 10   # one tensor's bytes: a job per tensor, so that 40 tensors make 40 jobs


@pytest.fixture
def small_jobs(monkeypatch):
    monkeypatch.setattr(PosixSource, "job_bytes", JOB)
    monkeypatch.setattr(reader, "_AHEAD_EVERY", JOB)


def _pieces(read: ShardRead) -> list[tuple[int, int]]:
    return sorted((item.offset, item.piece.length) for job in read.jobs for item in job.pieces)


def test_jobs_start_while_the_rest_is_planned(tmp_path, small_jobs, monkeypatch):
    snap, tensors, _ = _snapshot(tmp_path)
    first_read = threading.Event()
    real_batch, real_plan = ShardRead._read_batch, reader.plan_reads

    def reading(self, *args):
        first_read.set()
        return real_batch(self, *args)

    planned = []

    def plan(chunks, target, local):
        if len(planned) == TENSORS - 1:   # the last tensor is planned only once a job has read
            planned.append(first_read.wait(timeout=10))
        else:
            planned.append(None)
        return real_plan(chunks, target, local)

    monkeypatch.setattr(ShardRead, "_read_batch", reading)
    monkeypatch.setattr(reader, "plan_reads", plan)
    with ShardRead(snap, list(range(TENSORS)), [_rows(0, ROWS) for _ in range(TENSORS)], read_ahead=True) as read:
        assert planned[-1] is True, "no read job ran before the last tensor was planned"
        ahead = len(read._ahead.futures)
        read.run()
        values = read.values()
        assert set(read.progress) == {reader.DONE}
    assert TENSORS - 3 <= ahead < TENSORS   # all but the last job or two were started while planning
    for got, want in zip(values, tensors):
        assert torch.equal(got, want)


@pytest.mark.parametrize("order", ["in file order", "reversed"])
def test_the_same_pieces_are_read_as_without_reading_ahead(tmp_path, small_jobs, order):
    snap, tensors, _ = _snapshot(tmp_path)
    indices = list(range(TENSORS)) if order == "in file order" else list(reversed(range(TENSORS)))
    targets = [_rows(5, 50) for _ in indices]   # a reshard: edge pieces, read through scratch
    with ShardRead(snap, indices, targets) as plain:
        want = _pieces(plain)
    with ShardRead(snap, indices, [_rows(5, 50) for _ in indices], read_ahead=True) as read:
        started = len(read._ahead.futures)
        assert _pieces(read) == want
        read.run()
        values = read.values()
    # pieces planned against the file's order are all read at the end, as without reading ahead
    assert (started > 0) == (order == "in file order")
    for index, got in zip(indices, values):
        assert torch.equal(got, tensors[index][5:50])


def test_a_flipped_byte_in_a_job_started_ahead_is_raised_by_run(tmp_path, small_jobs):
    snap, _, path = _snapshot(tmp_path)
    with open(path, "r+b") as f:   # tensor 2's first piece: in a job started while planning
        f.seek(2 * ROWS * COLS * 4 + 100)
        byte = f.read(1)
        f.seek(-1, 1)
        f.write(bytes([byte[0] ^ 0x10]))
    with ShardRead(snap, list(range(TENSORS)), [_rows(0, ROWS) for _ in range(TENSORS)], read_ahead=True) as read:
        assert read._ahead.futures
        with pytest.raises(IntegrityError, match="checksum mismatch in tensor #2 "):
            read.run()
        assert reader.FAILED in read.progress


def test_a_plan_that_fails_waits_for_the_jobs_it_started(tmp_path, small_jobs, monkeypatch):
    snap, _, _ = _snapshot(tmp_path)
    running = []
    real_batch, real_plan = ShardRead._read_batch, reader.plan_reads

    def reading(self, *args):
        running.append(1)
        try:
            return real_batch(self, *args)
        finally:
            running.pop()

    def plan(chunks, target, local):
        if target.local_shape == (1, COLS):
            raise ValueError("planning failed")
        return real_plan(chunks, target, local)

    closed = []
    real_close = reader._close_all
    monkeypatch.setattr(reader, "_close_all", lambda sources: (closed.append(list(running)), real_close(sources)))
    monkeypatch.setattr(ShardRead, "_read_batch", reading)
    monkeypatch.setattr(reader, "plan_reads", plan)
    targets = [_rows(0, ROWS) for _ in range(TENSORS - 1)] + [_rows(0, 1)]
    with pytest.raises(ValueError, match="planning failed"):
        ShardRead(snap, list(range(TENSORS)), targets, read_ahead=True)
    # the direct handles of the jobs started ahead, then the read's files: closed with no job running
    assert len(closed) == 2 and closed == [[], []]
