"""reuse_files=True with 2 real ranks (gloo on 127.0.0.1): every rank overwrites its own spare data
file, and every snapshot still restores exactly; two ranks on one kernel each read half of the
replicated bytes from the disk and copy the other half from each other's memory; shutdown() releases
the coordinator's own group."""
from __future__ import annotations

import os
from datetime import timedelta

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

import pyckpt
from tests.conftest import StateHolder, free_port, record_reads_and_copies

pytestmark = pytest.mark.multiproc


def _worker(rank: int, world: int, port: int, path: str, out: str) -> None:
    os.environ["OMP_NUM_THREADS"] = "1"
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world,
                            timeout=timedelta(seconds=60))
    state = {"w": torch.zeros(300_000), "b": torch.zeros(7)}  # the same on every rank (replicated)
    runtime = pyckpt.TrainingRuntime(capture_rng=False)
    runtime.register("holder", StateHolder(state))
    inodes = []
    read_from_files, copied = record_reads_and_copies()
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
        del read_from_files[:]
        c.restore(path, runtime)
        assert runtime.step == 4 and torch.equal(state["w"], torch.full((300_000,), 4.0))
        assert torch.equal(state["b"], torch.full((7,), -4.0))
        # each rank read some pieces itself and copied the others' (the other rank read those)
        assert read_from_files and sum(copied) > 0, (read_from_files, copied)
        with open(f"{out}.read.{rank}", "w") as f:
            f.write(" ".join(map(str, read_from_files)))
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
    read = [set(open(f"{out}.read.{rank}").read().split()) for rank in (0, 1)]
    assert not read[0] & read[1], "a piece was read from the files by both ranks of one machine"
    loaded = pyckpt.load(path)
    assert loaded["progress"]["step"] == 4
    assert torch.equal(loaded["objects"]["holder"]["w"], torch.full((300_000,), 4.0))
    snap = pyckpt.Snapshot.open(path)
    assert [f.size for f in snap.manifest.files] == [
        os.path.getsize(snap.file_path(r)) for r in (0, 1)]
