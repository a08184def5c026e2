"""reuse_files=True with 2 real ranks (gloo on 127.0.0.1): every rank overwrites its own spare data
file, and every snapshot still restores exactly; two ranks on one kernel restore through its page
cache (not O_DIRECT: each would read the disk); shutdown() releases the coordinator's own group."""
from __future__ import annotations

import os
from datetime import timedelta

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

import pyckpt
from tests.conftest import StateHolder, free_port

pytestmark = pytest.mark.multiproc


def _worker(rank: int, world: int, port: int, path: str, out: str) -> None:
    os.environ["OMP_NUM_THREADS"] = "1"
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world,
                            timeout=timedelta(seconds=60))
    state = {"w": torch.zeros(300_000), "b": torch.zeros(7)}  # the same on every rank (replicated)
    runtime = pyckpt.TrainingRuntime(capture_rng=False)
    runtime.register("holder", StateHolder(state))
    inodes = []
    direct_reads = []
    real_read_direct = pyckpt.reader._read_direct
    pyckpt.reader._read_direct = lambda *args: direct_reads.append(1) or real_read_direct(*args)
    with pyckpt.DistributedCoordinator(pyckpt.load_config(environ={}), keep_last=1, reuse_files=True) as c:
        for step in range(1, 5):
            state["w"].fill_(float(step))
            state["b"].fill_(-float(step))
            runtime.set_step(step)
            info = c.snapshot(path, runtime, blocking=step % 2 == 0)
            if not isinstance(info, pyckpt.SnapshotInfo):
                info = info.result()
            inodes.append(os.stat(os.path.join(path + ".pyckpt", info.version, f"data-{rank}.bin")).st_ino)
            dist.barrier()
        state["w"].zero_()
        c.restore(path, runtime)
        assert runtime.step == 4 and torch.equal(state["w"], torch.full((300_000,), 4.0))
        assert torch.equal(state["b"], torch.full((7,), -4.0))
        assert direct_reads == [], "ranks sharing a page cache read the snapshot with O_DIRECT"
        own_group = c._comm.group
    # shutdown destroyed the coordinator's own gloo group (left alive, it can abort the exit) and
    # left the script's default group alone
    assert dist.get_world_size() == world
    try:
        dist.get_process_group_ranks(own_group)
    except KeyError:  # torch no longer knows the group
        pass
    else:
        raise AssertionError("the coordinator's process group outlived shutdown()")
    with open(f"{out}.{rank}", "w") as f:
        f.write(" ".join(map(str, inodes)))
    dist.destroy_process_group()


def test_two_ranks_overwrite_their_own_spares(tmp_path):
    path = str(tmp_path / "ck.bin")
    out = str(tmp_path / "inodes")
    mp.spawn(_worker, args=(2, free_port(), path, out), nprocs=2, join=True)
    for rank in (0, 1):
        inodes = [int(x) for x in open(f"{out}.{rank}").read().split()]
        # snapshot 3 overwrote snapshot 1's file, snapshot 4 snapshot 2's (keep_last=1: one spare)
        assert inodes[2] == inodes[0] and inodes[3] == inodes[1] and inodes[0] != inodes[1], inodes
    loaded = pyckpt.load(path)
    assert loaded["progress"]["step"] == 4
    assert torch.equal(loaded["objects"]["holder"]["w"], torch.full((300_000,), 4.0))
    snap = pyckpt.Snapshot.open(path)
    assert [f.size for f in snap.manifest.files] == [
        os.path.getsize(os.path.join(snap.directory, f"data-{r}.bin")) for r in (0, 1)]
