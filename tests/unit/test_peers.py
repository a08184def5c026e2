"""pyckpt.peers: how ranks of one machine split the read jobs, the cross-memory copy between two
real processes (process_vm_readv on a child process holding the bytes), and a rank that goes on
without a peer that never finishes its share."""
from __future__ import annotations

import random
import subprocess
import sys
import threading

import numpy as np
import pytest
import torch

import pyckpt
from pyckpt import peers
from tests.conftest import StateHolder

CHILD = """
import ctypes, sys
data = bytearray(range(256)) * (8 << 12)           # 8 MiB, byte i = i % 256
address = ctypes.addressof((ctypes.c_char * len(data)).from_buffer(data))
print(address, len(data), flush=True)
sys.stdin.read()                                    # hold the bytes until the test is done
"""


@pytest.mark.parametrize("parts", [1, 2, 3, 4, 7])
def test_shares_cover_every_job_once_in_contiguous_balanced_stretches(parts):
    rng = random.Random(parts)
    sizes = [rng.choice([0, 4096, 1 << 20, 16 << 20]) for _ in range(200)]
    shares = [peers.share(sizes, parts, part) for part in range(parts)]
    assert sorted(j for s in shares for j in s) == list(range(len(sizes)))
    for s in filter(None, shares):
        assert s == list(range(s[0], s[-1] + 1))   # one stretch of consecutive jobs
    total = sum(sizes)
    for s in shares:   # each within one job's size (16 MiB) of an equal share
        assert abs(sum(sizes[j] for j in s) - total / parts) <= 16 << 20


def test_more_readers_than_jobs_and_empty_jobs():
    assert sorted(peers.share([5], 3, p) for p in range(3)) == [[], [], [0]]
    assert [peers.share([0, 0], 2, p) for p in range(2)] == [[0, 1], []]
    assert peers.share([], 2, 1) == []


@pytest.fixture
def child():
    proc = subprocess.Popen([sys.executable, "-c", CHILD], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    address, length = map(int, proc.stdout.readline().split())
    yield proc.pid, address, length
    proc.communicate("", timeout=30)


def _local(nbytes: int):
    buf = np.zeros(nbytes, dtype=np.uint8)
    return buf, buf.ctypes.data


def test_copies_extents_out_of_another_process(child):
    pid, address, length = child
    # 3000 extents (more than one call's 1024 iovecs) of odd sizes at odd places
    rng = random.Random(1)
    remote, local, expect = [], [], []
    buf, base = _local(length)
    pos = 0
    for _ in range(3000):
        size = rng.randrange(1, 2000)
        start = rng.randrange(0, length - size)
        remote.append((address + start, size))
        local.append((base + pos, size))
        expect.append((np.arange(start, start + size) % 256).astype(np.uint8))
        pos += size
    assert peers.copy_from(pid, remote, local)
    assert np.array_equal(buf[:pos], np.concatenate(expect))


def test_refuses_mismatched_extents_and_missing_processes(child):
    pid, address, length = child
    buf, base = _local(4096)
    assert not peers.copy_from(pid, [(address, 4096)], [(base, 2048)])          # lengths differ
    assert not peers.copy_from(pid, [(address, 10)], [(base, 10), (base + 10, 10)])
    assert not buf.any()                                                        # nothing copied
    assert not peers.copy_from(pid, [(address, 8), (4096, 8)], [(base, 8), (base + 8, 8)])  # not mapped there
    gone = subprocess.Popen([sys.executable, "-c", ""])
    gone.wait()
    assert not peers.copy_from(gone.pid, [(address, 8)], [(base, 8)])              # process has exited


def test_readable_by_peers_withdraws_the_permission_it_granted(monkeypatch, tmp_path):
    """Under Yama scope 1 it allows any tracer for the block and resets it after (prctl recorded: this
    kernel may have no Yama, so the real call cannot be observed here)."""
    calls = []
    scope = tmp_path / "ptrace_scope"
    real_open = open
    monkeypatch.setattr(peers, "_prctl", lambda *args: calls.append(args[:2]) or 0)
    monkeypatch.setattr("builtins.open", lambda path, *a, **k: real_open(
        scope if path == "/proc/sys/kernel/yama/ptrace_scope" else path, *a, **k))
    for value, expect in (("1\n", [(peers._PR_SET_PTRACER, peers._PR_SET_PTRACER_ANY), (peers._PR_SET_PTRACER, 0)]),
                          ("0\n", []), ("2\n", [])):
        scope.write_text(value)
        calls.clear()
        with peers.readable_by_peers():
            pass
        assert calls == expect, value


def test_processes_in_another_pid_namespace_are_not_peers():
    """Containers on one host share the kernel (boot id) but not pids: they must not be taken for
    peers whose memory can be read by pid. A real pid namespace from `unshare --pid` (root)."""
    from pyckpt.collectives import process_space
    code = "from pyckpt.collectives import process_space; print(process_space())"
    proc = subprocess.run(["unshare", "--pid", "--fork", sys.executable, "-c", code], capture_output=True, text=True)
    if proc.returncode != 0:
        pytest.skip(f"cannot create a pid namespace here: {proc.stderr.strip()[-200:]}")
    theirs, mine = proc.stdout.strip(), process_space()
    assert theirs.split()[0] == mine.split()[0]     # the same kernel
    assert theirs != mine
    same = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert same.stdout.strip() == mine


STUCK_PEER = """
import ctypes, sys
progress = bytearray(int(sys.argv[1]))              # never set: every job of its share stays "not read"
print(ctypes.addressof((ctypes.c_char * len(progress)).from_buffer(progress)), flush=True)
sys.stdin.read()
"""


def test_jobs_of_a_peer_that_never_finishes_are_read_from_the_files(snap_path, monkeypatch, caplog):
    """A peer that is alive but stuck (a hung NFS read, a stopped process: here a real process whose
    progress bytes never change) must not hang the restore: once this rank's own share is read and
    the patience is over, it reads the peer's share itself, and the state comes back exact."""
    gen = torch.Generator().manual_seed(3)
    state = {f"t{i}": torch.randn(600_000 + 9_000 * i, generator=gen) for i in range(12)}   # 3 read jobs
    runtime = pyckpt.TrainingRuntime(capture_rng=False)
    runtime.register("holder", StateHolder(state))
    with pyckpt.DistributedCoordinator(pyckpt.load_config(environ={})) as c:
        c.snapshot(snap_path, runtime)
    monkeypatch.setattr(peers, "PEER_PATIENCE", 0.3)
    snap = pyckpt.Snapshot.open(snap_path)
    with snap.reading(snap.manifest.replicated) as read:
        assert len(read.jobs) >= 2
        proc = subprocess.Popen([sys.executable, "-c", STUCK_PEER, str(len(read.jobs))],
                                stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
        try:
            stuck_progress = int(proc.stdout.readline())
            offers = [peers.offer(read, 2, 0), peers.Offer(proc.pid, stuck_progress, peers.offer(read, 2, 1).extents)]
            assert offers[0].extents and offers[1].extents  # both have a share
            errors: list = []
            worker = threading.Thread(target=lambda: _capture(errors, peers.read_shared, read, offers, 0))
            worker.start()
            worker.join(timeout=30)
            assert not worker.is_alive(), "read_shared still waits for a peer that never finishes"
            assert errors == []
        finally:
            proc.communicate("", timeout=30)
        loaded = read.tree()["objects"]["holder"]
    for name, tensor in state.items():
        assert torch.equal(loaded[name], tensor), name
    assert f"peer processes [{proc.pid}] on this machine finished no read job" in caplog.text


def _capture(errors: list, fn, *args) -> None:
    try:
        fn(*args)
    except BaseException as exc:   # handed to the test's thread
        errors.append(exc)
