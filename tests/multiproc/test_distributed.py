"""Real multi-process jobs: gloo process groups of 2 and 4 ranks on 127.0.0.1, real files, real kills."""
from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest
import torch

import pyckpt
from pyckpt import DistributedCoordinator, DistributedInitError, load_config
from tests.conftest import TRAIN, clean_env, final_digest, free_port, run, torchrun

pytestmark = pytest.mark.multiproc
LOOP = Path(__file__).with_name("snapshot_loop.py")


def kill_tree(pid: int) -> None:
    """SIGKILL a process and all its descendants at once (torchrun's workers leave its process group)."""
    parent = psutil.Process(pid)
    for process in [parent, *parent.children(recursive=True)]:
        try:
            process.send_signal(signal.SIGKILL)
        except psutil.NoSuchProcess:
            pass


def train_args(path: str, steps: int = 120, *extra: str) -> list[str]:
    return ["--steps", str(steps), "--checkpoint-interval", "20", "--snapshot-path", path, "--log-every", "1000",
            *extra]


@pytest.mark.parametrize("nproc, parallel", [(2, "ddp"), (4, "ddp"), (2, "fsdp")])
def test_interrupted_and_resumed_run_is_bit_identical(tmp_path, nproc, parallel):
    args = ("--parallel", parallel)
    reference = final_digest(torchrun(nproc, train_args(str(tmp_path / "a" / "ck.bin"), 120, *args)).stdout)

    path = str(tmp_path / "b" / "ck.bin")
    crashed = torchrun(nproc, train_args(path, 120, "--crash-at-step", "53", *args), check=False)
    assert crashed.returncode != 0 and "simulated crash at step 53" in crashed.stdout
    assert pyckpt.load(path)["progress"]["step"] == 40  # the last snapshot before the crash

    resumed = torchrun(nproc, train_args(path, 120, *args))
    assert "resumed from" in resumed.stdout and "at step 40" in resumed.stdout
    assert final_digest(resumed.stdout) == reference

    snap = pyckpt.Snapshot.open(path)
    assert snap.manifest.world_size == nproc
    sizes = [f.size for f in snap.manifest.files]
    assert max(sizes) - min(sizes) < 0.2 * max(sizes) + 4096  # each rank wrote ~1/N of the replicated bytes


def test_spec_launch_with_node_rank_and_config_file(tmp_path):
    """The spec's `NODE_RANK=k python train.py` on every node, reading config/distributed.<mode>.env.

    Two processes on this machine stand in for two nodes (loopback master): the config file, the
    rank derivation and the rendezvous are the real ones.
    """
    config_dir = tmp_path / "config"
    config_dir.mkdir()
    (config_dir / "distributed.docker.env").write_text(
        f"DISTRIBUTED_MODE=docker\nWORLD_SIZE=2\nPHYSICAL_NODES=2\nMASTER_ADDR=127.0.0.1\nMASTER_PORT={free_port()}\n"
        f"BACKEND=gloo\nSHARED_FS_PATH={tmp_path / 'shared/snapshots'}\nSHARED_FS_TYPE=local\nINIT_TIMEOUT_S=60\n")
    procs = [subprocess.Popen([sys.executable, str(TRAIN), "--steps", "60", "--checkpoint-interval", "20",
                               "--config-dir", str(config_dir)],
                              env=clean_env(NODE_RANK=str(k), DISTRIBUTED_MODE="docker"),
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for k in (0, 1)]
    outputs = [p.communicate(timeout=180) for p in procs]
    assert [p.returncode for p in procs] == [0, 0], outputs
    snapshot = tmp_path / "shared" / "snapshots" / "checkpoint.bin"
    assert pyckpt.load(snapshot)["progress"]["step"] == 60
    assert final_digest(outputs[0][0]) == final_digest(torchrun(2, train_args(str(tmp_path / "r.bin"), 60)).stdout)


def test_restore_on_other_world_sizes_and_in_a_plain_process(tmp_path):
    path = str(tmp_path / "ck.bin")
    digest = final_digest(torchrun(2, train_args(path, 40)).stdout)
    # The job is finished: a restart restores and trains no further, so its digest must match.
    four = torchrun(4, train_args(path, 40))
    assert "restoring a 2-rank snapshot on 4 ranks" in four.stderr
    assert final_digest(four.stdout) == digest
    single = run([sys.executable, str(TRAIN), *train_args(path, 40)], clean_env())
    assert final_digest(single.stdout) == digest
    # Evaluation: a plain process, no process group, CPU only.
    state = pyckpt.load(path)
    assert state["objects"]["model"]["0.weight"].device.type == "cpu"
    assert not torch.distributed.is_initialized()


@pytest.mark.parametrize("nproc, async_, sharded", [(1, False, False), (2, False, False), (2, True, False),
                                                     (2, False, True)])
def test_kill_during_snapshot_leaves_a_complete_snapshot(tmp_path, nproc, async_, sharded):
    path = str(tmp_path / "ck.bin")
    cmd = [sys.executable, "-m", "torch.distributed.run", f"--nproc_per_node={nproc}", "--master_addr=127.0.0.1",
           f"--master_port={free_port()}", str(LOOP), path, "--mib", "48"]
    if async_:
        cmd.append("--async-snapshots")
    if sharded:   # each rank writes its own shards: a kill mid-way must not splice two steps' shards
        cmd.append("--sharded")
    for delay in (0.05, 0.2, 0.35):
        proc = subprocess.Popen(cmd, env=clean_env(), stdout=subprocess.PIPE, text=True)
        deadline = time.monotonic() + 120
        for line in proc.stdout:  # wait for the first commit, then kill mid-way through a later one
            if line.startswith("committed") or time.monotonic() > deadline:
                break
        time.sleep(delay)
        kill_tree(proc.pid)
        proc.wait(timeout=30)
        proc.stdout.close()
        loaded = pyckpt.load(path)
        step = loaded["progress"]["step"]
        assert step >= 1
        for name, tensor in loaded["objects"]["stamped"].items():
            assert torch.all(tensor == float(step)), f"{name} mixes steps: not all {step}"
    # The next writer cleans the leftovers of the killed ones.
    run([sys.executable, str(LOOP), path, "--mib", "1", "--count", "1"], clean_env())
    leftovers = [e for e in os.listdir(path + ".pyckpt") if ".stage-" in e]
    assert leftovers == []


def test_unreachable_master_fails_fast_with_advice(tmp_path):
    port = free_port()  # nothing listens there: rank 1 waits for a rank 0 that never comes
    config = tmp_path / "distributed.docker.env"
    config.write_text(f"DISTRIBUTED_MODE=docker\nWORLD_SIZE=2\nPHYSICAL_NODES=2\nMASTER_ADDR=127.0.0.1\n"
                      f"MASTER_PORT={port}\nBACKEND=gloo\nINIT_TIMEOUT_S=3\n")
    started = time.monotonic()
    with pytest.raises(DistributedInitError) as err:
        DistributedCoordinator(load_config(config, environ={"NODE_RANK": "1"})).initialize()
    assert time.monotonic() - started < 60
    text = str(err.value)
    assert f"127.0.0.1:{port}" in text and "firewall" in text and "rank 0" in text
