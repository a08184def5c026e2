"""Snapshots to an s3:// path end to end: DistributedCoordinator.snapshot/restore with 1 rank and 2 gloo
ranks (real processes), pyckpt.load in a plain process, and the retention of old versions.

Server: moto's standalone S3 server (tests/s3server.py), an emulator over real HTTP; it does not
emulate an atomic conditional PUT, signature checks, network faults or a real network's latency and
bandwidth. The 4-rank round trip runs on a real Ceph RGW 16.2 too (bench/cephrgw.py: one node on
loopback, data in memory; no real network either)."""
from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch

import pyckpt
from pyckpt import DistributedCoordinator, TrainingRuntime, load_config
from pyckpt.s3_store import S3Store, client
from tests.conftest import REPO, clean_env, final_digest, free_port, run, torchrun
from tests.s3server import new_bucket

pytestmark = pytest.mark.multiproc
WORKER = Path(__file__).with_name("s3_worker.py")


def _model(seed: int) -> tuple[torch.nn.Module, torch.optim.Optimizer, TrainingRuntime]:
    torch.manual_seed(seed)
    model = torch.nn.Sequential(torch.nn.Linear(8, 32), torch.nn.ReLU(), torch.nn.Linear(32, 4))
    optimizer = torch.optim.Adam(model.parameters(), lr=0.01)
    model(torch.randn(4, 8)).sum().backward()
    optimizer.step()
    runtime = TrainingRuntime()
    runtime.register_model(model)
    runtime.register_optimizer(optimizer)
    return model, optimizer, runtime


def test_one_rank_snapshot_restore_load_and_retention(tmp_path):
    url = f"s3://{new_bucket()}/runs/exp1/checkpoint.bin"
    model, _, runtime = _model(0)
    with DistributedCoordinator(load_config(environ={}, config_dir=str(tmp_path)), keep_last=2) as coordinator:
        for step in (1, 2, 3):
            runtime.set_step(step)
            with torch.no_grad():
                model[0].weight.add_(1.0)
            result = coordinator.snapshot(url, runtime, blocking=step != 3)
            if step == 3:
                result.result()
        coordinator.wait()
        other, _, restored = _model(1)
        assert coordinator.restore(url, restored) and restored.step == 3
    assert all(torch.equal(a, b) for a, b in zip(model.state_dict().values(), other.state_dict().values()))
    state = pyckpt.load(url)
    assert state["progress"]["step"] == 3 and torch.equal(state["objects"]["model"]["0.weight"], model[0].weight)
    store = S3Store(url)
    names = [v.name for v in store.read_commit().versions]
    assert len(names) == 2
    listed = {o["Key"].split("/")[3] for o in client().list_objects_v2(Bucket=store.bucket, Prefix=store.root)
              .get("Contents", [])}
    assert listed == set(names)          # the dropped version was deleted after the commit, nothing else left


def test_missing_snapshot_on_s3_with_missing_ok(tmp_path):
    url = f"s3://{new_bucket()}/nothing/checkpoint.bin"
    _, _, runtime = _model(0)
    with DistributedCoordinator(load_config(environ={}, config_dir=str(tmp_path))) as coordinator:
        assert coordinator.restore(url, runtime, missing_ok=True) is False
        with pytest.raises(pyckpt.SnapshotNotFoundError, match=url):
            coordinator.restore(url, runtime)


def test_two_gloo_ranks_snapshot_and_restore_through_s3():
    url = f"s3://{new_bucket()}/job/checkpoint.bin"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", "--nnodes=1",
           "--master_addr=127.0.0.1", f"--master_port={free_port()}", str(WORKER), url, "--mib", "6", "--count", "3"]
    out = run(cmd, clean_env(PYTHONPATH=str(REPO)), timeout=300).stdout
    lines = sorted(line for line in out.splitlines() if line.startswith("restored "))
    assert lines == ["restored 0 step 3 values [3.0] mine [3.0]", "restored 1 step 3 values [3.0] mine [103.0]"]
    snap = pyckpt.Snapshot.open(url)
    assert snap.manifest.world_size == 2 and all(f.where.startswith(url + ".pyckpt/") for f in snap.files.values())
    state = pyckpt.load(url)       # a plain process, another world size
    assert all(torch.all(t == 3.0) for t in state["objects"]["stamped"].values())
    assert [float(next(iter(r["objects"]["mine"].values()))[0]) for r in state["per_rank"]] == [3.0, 103.0]


def test_fsdp2_training_killed_and_resumed_from_s3_ends_bit_identical(tmp_path):
    """train.py with FSDP2 on 2 ranks, snapshots to s3://: killed at step 53, started again, it resumes
    from the snapshot of step 40 in the bucket (it used to test the path with os.path.exists and start
    from step 0) and ends with the parameters of an uninterrupted run (local files)."""
    args = ["--steps", "80", "--checkpoint-interval", "20", "--log-every", "1000", "--parallel", "fsdp"]
    reference = final_digest(torchrun(2, [*args, "--snapshot-path", str(tmp_path / "ref" / "ck.bin")]).stdout)
    url = f"s3://{new_bucket()}/fsdp/checkpoint.bin"
    crashed = torchrun(2, [*args, "--snapshot-path", url, "--crash-at-step", "53"], env=clean_env(), check=False)
    assert crashed.returncode != 0 and "simulated crash at step 53" in crashed.stdout
    resumed = torchrun(2, [*args, "--snapshot-path", url], env=clean_env())
    assert f"resumed from {url} at step 40" in resumed.stdout, resumed.stdout[-2000:]
    assert final_digest(resumed.stdout) == reference
    assert pyckpt.Snapshot.open(url).manifest.format_version == 3   # sharded records in the bucket


def _digests(stdout: str) -> dict[tuple[int, str], str]:
    return {(int(r), name): d for _, r, name, d in (line.split() for line in stdout.splitlines()
                                                     if line.startswith("digest "))}


def test_four_gloo_ranks_through_s3_restore_on_two_ranks_and_in_a_plain_process(s3_server):
    """4 gloo ranks snapshot DDP-like replicated state (a model, its Adam state, a 24 MiB buffer: each
    rank uploads its share as a multipart upload of 5 MiB parts, in parallel) and per-rank state;
    2 ranks restore it (another world size: ranks 0 and 1 get their own per-rank state back) and a
    plain process loads it; every tensor's bytes are compared (xxh3) with what the 4 ranks held.
    Servers: moto and Ceph RGW (the ranks inherit the AWS_* variables that point at it)."""
    url = f"s3://{new_bucket()}/ddp4/checkpoint.bin"
    worker = Path(__file__).with_name("s3_ranks_worker.py")

    def ranks(n: int, mode: str) -> str:
        cmd = [sys.executable, "-m", "torch.distributed.run", f"--nproc_per_node={n}", "--nnodes=1",
               "--master_addr=127.0.0.1", f"--master_port={free_port()}", str(worker), mode, url]
        return run(cmd, clean_env(PYTHONPATH=str(REPO)), timeout=300).stdout

    saved = _digests(ranks(4, "save"))
    assert {r for r, _ in saved} == {0, 1, 2, 3}
    replicated = {name: d for (r, name), d in saved.items() if r == 0 and not name.startswith("mine.")}
    assert all(saved[(r, name)] == d for r in range(4) for name, d in replicated.items())   # DDP: identical
    assert len({saved[(r, "mine.rng")] for r in range(4)}) == 4                            # per rank: not
    snap = pyckpt.Snapshot.open(url)
    assert snap.manifest.world_size == 4 and len(snap.files) == 4
    store = S3Store(url)
    heads = [client().head_object(Bucket=store.bucket, Key=f.key) for f in snap.files.values()]
    assert all(h["ETag"].strip('"').endswith(("-2", "-3")) for h in heads)   # multipart uploads, every rank

    restored = _digests(ranks(2, "restore"))
    assert restored == {key: d for key, d in saved.items() if key[0] in (0, 1)}

    from tests.multiproc.s3_ranks_worker import digest
    state = pyckpt.load(url)                      # a plain process, no process group
    assert state["progress"]["step"] == 5 and len(state["per_rank"]) == 4
    assert {name: digest(t) for name, t in state["objects"]["shared"].items()} == \
        {"buffer": replicated["shared.buffer"]}
    assert {f"model.{k}": digest(t) for k, t in state["objects"]["model"].items()} == \
        {k: d for k, d in replicated.items() if k.startswith("model.")}
    assert [digest(r["objects"]["mine"]["rng"]) for r in state["per_rank"]] == \
        [saved[(r, "mine.rng")] for r in range(4)]
