"""Ranks on one machine restore replicated state by reading a share each from the files and copying
the rest out of each other's memory (real ranks: gloo on 127.0.0.1, real process_vm_readv).

Checked: 3 ranks of uneven shares restore exactly and each piece comes off the files once; where the
kernel refuses the cross-memory copy, or the copy brings other bytes (checked against the checksums),
every rank reads the missing shares itself; a flipped byte in one rank's share fails the restore on
every rank, naming the file."""
from __future__ import annotations

import ctypes
import json
import os
from datetime import timedelta

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

import pyckpt
import pyckpt.peers
from tests.conftest import StateHolder, free_port, record_reads_and_copies

pytestmark = pytest.mark.multiproc


def _state() -> dict:
    # 19 tensors of odd sizes, several read jobs per file, so shares split between and inside files
    gen = torch.Generator().manual_seed(7)
    return {f"t{i}": torch.randn(1000 + 37_000 * i, generator=gen) for i in range(19)}


def _worker(rank: int, world: int, port: int, path: str, out: str, mode: str) -> None:
    os.environ["OMP_NUM_THREADS"] = "1"
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world,
                            timeout=timedelta(seconds=60))
    state = _state()
    expected = {k: v.clone() for k, v in state.items()}
    runtime = pyckpt.TrainingRuntime(capture_rng=False)
    runtime.register("holder", StateHolder(state))
    real_copy_from = pyckpt.peers.copy_from
    read, copied = record_reads_and_copies()
    if mode == "refused":
        pyckpt.peers._process_vm_readv = None     # as under ptrace_scope 2 or a seccomp filter
    if mode == "wrong bytes":   # copies that report success but bring other bytes
        def corrupting(pid, remote, local):
            ok = real_copy_from(pid, remote, local)
            for address, n in local:
                if n >= 1024:       # a tensor piece (not the peer's progress bytes: one per read job)
                    ctypes.c_uint8.from_address(address + n // 2).value ^= 1
            return ok
        pyckpt.peers.copy_from = corrupting
    with pyckpt.DistributedCoordinator(pyckpt.load_config(environ={}), keep_last=1) as c:
        c.snapshot(path, runtime)
        if mode == "corrupt" and rank == 0:
            snap = pyckpt.Snapshot.open(path)
            last = max((p for r in snap.manifest.tensors for p in r.pieces), key=lambda p: (p.file, p.offset))
            with open(snap.file_path(last.file), "r+b") as f:   # in the last rank's share
                f.seek(last.offset + last.length // 2)
                byte = f.read(1)[0]
                f.seek(-1, os.SEEK_CUR)
                f.write(bytes([byte ^ 0x40]))
        dist.barrier()
        for tensor in state.values():
            tensor.zero_()
        del read[:]
        try:
            c.restore(path, runtime)
            outcome = "ok" if all(torch.equal(state[k], expected[k]) for k in state) else "wrong values"
        except pyckpt.IntegrityError as exc:
            outcome = f"IntegrityError {exc}"
    with open(f"{out}.{rank}", "w") as f:
        json.dump([outcome, read, sum(copied)], f)
    dist.destroy_process_group()


def _run(tmp_path, world: int, mode: str) -> list[tuple[str, set[str], int]]:
    path, out = str(tmp_path / "ck.bin"), str(tmp_path / "result")
    mp.spawn(_worker, args=(world, free_port(), path, out, mode), nprocs=world, join=True)
    results = []
    for rank in range(world):
        with open(f"{out}.{rank}") as f:
            outcome, read, copied = json.load(f)
        results.append((outcome, set(read), copied))
    return results


def _all_pieces(tmp_path) -> set[str]:
    snap = pyckpt.Snapshot.open(str(tmp_path / "ck.bin"))
    return {f"{p.file}:{p.offset}" for r in snap.manifest.tensors for p in r.pieces if p.length}


def test_three_ranks_read_each_piece_once_and_copy_the_rest(tmp_path):
    results = _run(tmp_path, 3, "normal")
    assert [r[0] for r in results] == ["ok"] * 3
    shares = [r[1] for r in results]
    assert all(shares) and set.union(*shares) == _all_pieces(tmp_path)
    assert sum(len(s) for s in shares) == len(_all_pieces(tmp_path)), "a piece was read by two ranks"
    state_bytes = sum(t.nbytes for t in _state().values())
    assert all(0 < r[2] < state_bytes for r in results)   # each copied what the others read


@pytest.mark.parametrize("mode", ["refused", "wrong bytes"])
def test_where_the_copy_is_refused_or_wrong_every_rank_reads_the_rest_itself(tmp_path, mode):
    results = _run(tmp_path, 2, mode)
    assert [r[0] for r in results] == ["ok"] * 2
    assert all(r[1] == _all_pieces(tmp_path) for r in results)


def test_a_flipped_byte_in_one_share_fails_the_restore_on_every_rank(tmp_path):
    results = _run(tmp_path, 2, "corrupt")
    outcomes = [r[0] for r in results]
    assert all(o.startswith("IntegrityError") and "checksum mismatch" in o and "data-1.bin" in o for o in outcomes), \
        outcomes
