"""Two jobs on one path, long runs with keep-last-N, a full disk, and file modes under any umask."""
from __future__ import annotations

import os
import stat
import subprocess
import sys
import tempfile
from contextlib import contextmanager

import pytest

from crash_harness import leftovers, verify
from helpers import WORKER, worker_env
from pyckpt import DistributedCoordinator, SnapshotError, SnapshotLockedError, TrainingRuntime, load_config
from pyckpt.posix_store import PosixStore
from state import Blob, loss, rng_seed

import torch

pytestmark = pytest.mark.reliability


def coordinator(keep_last: int = 2) -> DistributedCoordinator:
    return DistributedCoordinator(load_config(environ={}, cuda_available=lambda: False), keep_last=keep_last)


class Job:
    """An in-process job whose snapshot content is state.make_state(step) (so crash_harness.verify checks it)."""

    def __init__(self, size: int, keep_last: int = 2):
        self.blob = Blob(0, size)
        self.runtime = TrainingRuntime()
        self.runtime.register("blob", self.blob)
        self.coord = coordinator(keep_last).initialize()

    def snapshot(self, path: str, step: int):
        self.blob.set_step(step)
        self.runtime.set_step(step)
        self.runtime.set_loss(loss(step, 0))
        torch.manual_seed(rng_seed(step, 0))
        info = self.coord.snapshot(path, self.runtime)
        self.coord.wait()   # and the versions it dropped are deleted (on a helper thread): the disk at rest
        return info


def test_two_jobs_on_one_path_one_wins_or_a_clear_lock_error(tmp_path):
    path = str(tmp_path / "shared" / "checkpoint.bin")
    starts = (1000, 2000)
    procs = [subprocess.Popen([sys.executable, WORKER, path, "--start", str(s), "--steps", "25", "--tolerate-locked",
                               "--size", str(256 << 10)], env=worker_env(), stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, text=True) for s in starts]
    outs = [p.communicate(timeout=240) for p in procs]
    committed, locked = set(), 0
    for p, (out, err) in zip(procs, outs):
        assert p.returncode == 0, f"a job failed with something else than SnapshotLockedError:\n{err[-3000:]}"
        words = out.split()
        committed |= {int(words[i + 1]) for i, w in enumerate(words) if w == "committed"}
        locked += words.count("locked")
        assert words.count("committed") + words.count("locked") == 25
    step = verify(path)   # bit-exact, from one job only (make_state(step) differs between the jobs)
    assert step in committed
    assert not leftovers(path)
    print(f"two jobs: {len(committed)} commits, {locked} SnapshotLockedError")


def test_a_held_lock_gives_snapshot_locked_error_and_keeps_the_previous(tmp_path):
    path = str(tmp_path / "checkpoint.bin")
    job = Job(64 << 10)
    job.snapshot(path, 1)
    with PosixStore(path).locked():
        with pytest.raises(SnapshotLockedError, match="another process is writing"):
            job.snapshot(path, 2)
        with pytest.raises(SnapshotLockedError):
            PosixStore(path).gc(1)
    assert verify(path) == 1
    job.snapshot(path, 3)
    assert verify(path) == 3


@pytest.mark.parametrize("keep_last", [1, 3])
def test_200_snapshots_keep_exactly_n_versions_and_bounded_disk(tmp_path, keep_last):
    path = str(tmp_path / "checkpoint.bin")
    job = Job(32 << 10, keep_last)
    usage = []
    for step in range(1, 201):
        job.snapshot(path, step)
        if step in (keep_last, 50, 200):
            usage.append(_du(tmp_path))
        versions = [e for e in os.listdir(path + ".pyckpt") if e.startswith("v")]
        assert len(versions) == min(step, keep_last), (step, versions)
    record = PosixStore(path).read_commit()
    assert [v.step for v in record.versions] == list(range(200, 200 - keep_last, -1))
    assert verify(path) == 200
    assert usage[1] == usage[0] and usage[2] == usage[0], f"disk use grew: {usage}"


def _du(root) -> int:
    return sum(os.lstat(os.path.join(d, f)).st_blocks * 512 for d, _, fs in os.walk(root) for f in fs)


@contextmanager
def small_tmpfs(size: str = "8m"):
    """A real small filesystem: tmpfs (needs CAP_SYS_ADMIN); skip with the reason when mount is refused."""
    where = tempfile.mkdtemp(prefix="pyckpt-fulldisk-")
    try:
        done = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size},mode=0755", "tmpfs", where],
                              capture_output=True, text=True)
        if done.returncode != 0:
            pytest.skip(f"cannot mount a small tmpfs here (needs root/CAP_SYS_ADMIN): {done.stderr.strip()}")
        try:
            yield where
        finally:
            if subprocess.run(["umount", where], capture_output=True).returncode != 0:
                subprocess.run(["umount", "-l", where], check=True)
    finally:
        os.rmdir(where)


def test_full_disk_fails_cleanly_and_keeps_the_previous_snapshot():
    with small_tmpfs("8m") as disk:
        path = os.path.join(disk, "snapshots", "checkpoint.bin")
        job = Job(1 << 20, keep_last=1)
        job.snapshot(path, 1)
        big = Job(12 << 20, keep_last=1)    # 12 MB of tensors on an 8 MB filesystem
        with pytest.raises(SnapshotError, match="previous snapshot is intact"):
            big.snapshot(path, 2)
        assert verify(path) == 1
        assert not leftovers(path), "the failed stage must be removed"
        job.snapshot(path, 3)               # and the job can go on once space is there
        assert verify(path) == 3


def test_disk_full_at_every_phase_of_the_commit():
    """Free space swept across the snapshot's size: ENOSPC lands in the data, the manifest or the record."""
    outcomes = {"failed": 0, "committed": 0}
    with small_tmpfs("8m") as disk:
        path = os.path.join(disk, "snapshots", "checkpoint.bin")
        job = Job(256 << 10, keep_last=1)
        step = 1
        job.snapshot(path, step)
        filler = os.path.join(disk, "filler")
        for extra_pages in range(-4, 12):
            free = os.statvfs(disk).f_bavail * os.statvfs(disk).f_frsize
            # leave (one snapshot's data - 4 pages .. + 11 pages) free
            leave = max(0, (256 << 10) + extra_pages * 4096)
            with open(filler, "wb") as f:
                f.truncate(0)
                f.write(b"\0" * max(0, free - leave))
            try:
                job.snapshot(path, step + 1)
                step += 1
                outcomes["committed"] += 1
            except SnapshotError as exc:
                assert "previous snapshot is intact" in str(exc)
                outcomes["failed"] += 1
                print(f"free {leave}: {str(exc)[-160:]}")
            assert verify(path) == step
            os.unlink(filler)
            PosixStore(path).gc(1)
            assert not leftovers(path)
    assert outcomes["failed"] >= 1 and outcomes["committed"] >= 1, outcomes


@pytest.mark.parametrize("umask", [0o000, 0o022, 0o077])
def test_snapshot_files_and_dirs_are_not_world_writable(tmp_path, umask):
    path = str(tmp_path / "new" / "parents" / "checkpoint.bin")
    old = os.umask(umask)
    try:
        job = Job(16 << 10)
        for step in (1, 2, 3):
            job.snapshot(path, step)
        PosixStore(path).gc(1)
    finally:
        os.umask(old)
    checked = []
    for d, dirs, files in os.walk(tmp_path / "new"):
        for name in [d] + [os.path.join(d, f) for f in files]:
            mode = os.lstat(name).st_mode
            assert not mode & stat.S_IWOTH, f"{name} is world-writable ({stat.filemode(mode)}) under umask {umask:o}"
            checked.append(name)
    assert len(checked) >= 7   # new, parents, record, .pyckpt, .lock, version dir, manifest, data file
    assert verify(path) == 3


def test_a_corrupted_record_stops_new_snapshots_and_deletes_nothing(tmp_path):
    """pyckpt will not guess which versions are committed: the writer refuses, naming the record."""
    path = str(tmp_path / "checkpoint.bin")
    job = Job(16 << 10)
    job.snapshot(path, 1)
    job.snapshot(path, 2)
    before = sorted(os.listdir(path + ".pyckpt"))
    with open(path, "r+b") as f:
        f.seek(40)
        byte = f.read(1)
        f.seek(40)
        f.write(bytes([byte[0] ^ 0x55]))
    with pytest.raises(SnapshotError, match=path):
        job.snapshot(path, 3)
    assert sorted(os.listdir(path + ".pyckpt")) == before
