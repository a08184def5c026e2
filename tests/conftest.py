"""Shared test helpers: free loopback ports, running train.py / torchrun as real processes."""
from __future__ import annotations

import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
TRAIN = REPO / "train.py"
# The spec's config/distributed.physical.env block, verbatim but for BACKEND=gloo (no GPU here; the spec
# writes nccl): issue 18's tests read it as a user following the spec by hand would write it.
SPEC_PHYSICAL_ENV = """\
DISTRIBUTED_MODE=physical
WORLD_SIZE=4
MASTER_ADDR=192.168.1.100
MASTER_PORT=29500
BACKEND=gloo
SHARED_FS_PATH=/shared/snapshots
SHARED_FS_TYPE=nfs
PHYSICAL_NODES=192.168.1.100,192.168.1.101,192.168.1.102,192.168.1.103
"""


@pytest.fixture(autouse=True)
def _no_process_group_left():
    """Each test starts without a default process group. A coordinator that a test does not shut down
    (one-rank, in the pytest process) leaves its group behind, and a later test's coordinator would
    join it instead of its own: an unreachable master then "connects", a plain load finds a group."""
    yield
    dist = sys.modules.get("torch.distributed")   # (not imported: no group; sessions without torch stay so)
    if dist is not None and dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def accepts_direct_io(directory: str) -> bool:
    """Whether the filesystem under directory lets a file be opened with O_DIRECT."""
    try:
        os.close(os.open(os.path.join(directory, "o_direct-probe"), os.O_WRONLY | os.O_CREAT | os.O_DIRECT, 0o644))
    except OSError:
        return False
    return True


def record_reads_and_copies() -> tuple[list[str], list[int]]:
    """In a rank process: record each piece read from the files ("file:offset") and the bytes of each
    cross-memory copy (pyckpt.peers.copy_from), while both still do their work."""
    import pyckpt.peers
    import pyckpt.reader
    read: list[str] = []
    copied: list[int] = []
    real_read_batch, real_copy_from = pyckpt.reader.TensorRead._read_batch, pyckpt.peers.copy_from

    def read_batch(self, source, direct, batch):
        read.extend(f"{item.piece.file}:{item.piece.offset}" for item in batch if item.piece.length)
        return real_read_batch(self, source, direct, batch)

    def copy_from(pid, remote, local):
        copied.append(sum(n for _, n in local))
        return real_copy_from(pid, remote, local)

    pyckpt.reader.TensorRead._read_batch = read_batch
    pyckpt.peers.copy_from = copy_from
    return read, copied


@pytest.fixture(params=("moto", "ceph"))
def s3_server(request, monkeypatch):
    """A test that takes it runs on each S3 server of tests/s3server.py: moto (an emulator) and a real
    Ceph RGW; this process's AWS_* variables (and its children's) point at that server for the test."""
    from tests.s3server import point_at
    return point_at(request.param, monkeypatch)


def clean_env(**extra: str) -> dict[str, str]:
    """The test process's environment minus any torch.distributed/pyckpt settings, plus `extra`."""
    drop = {"RANK", "LOCAL_RANK", "WORLD_SIZE", "LOCAL_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT", "NODE_RANK",
            "GROUP_RANK", "TORCHELASTIC_RUN_ID", "DISTRIBUTED_MODE", "PYCKPT_CONFIG", "PYCKPT_CONFIG_DIR",
            "PHYSICAL_NODES", "BACKEND", "SNAPSHOT_PATH", "PYCKPT_SNAPSHOT_PATH"}
    env = {k: v for k, v in os.environ.items() if k not in drop}
    env["OMP_NUM_THREADS"] = "1"
    env.update(extra)
    return env


def run(cmd: list[str], env: dict[str, str], timeout: float = 180, check: bool = True,
        cwd: str | os.PathLike | None = None) -> subprocess.CompletedProcess:
    proc = subprocess.run(cmd, env=env, cwd=cwd, capture_output=True, text=True, timeout=timeout)
    if check and proc.returncode != 0:
        raise AssertionError(f"{cmd} exited {proc.returncode}\nstdout:\n{proc.stdout[-4000:]}\n"
                             f"stderr:\n{proc.stderr[-4000:]}")
    return proc


def torchrun(nproc: int, args: list[str], env: dict[str, str] | None = None, **kw) -> subprocess.CompletedProcess:
    cmd = [sys.executable, "-m", "torch.distributed.run", f"--nproc_per_node={nproc}", "--nnodes=1",
           "--master_addr=127.0.0.1", f"--master_port={free_port()}", str(TRAIN), *args]
    return run(cmd, env or clean_env(), **kw)


def final_digest(stdout: str) -> str:
    lines = [line for line in stdout.splitlines() if line.startswith("FINAL ")]
    assert lines, f"no FINAL line in output:\n{stdout[-2000:]}"
    return dict(part.split("=", 1) for part in lines[-1].split()[1:])["param_xxh3"]


@pytest.fixture
def snap_path(tmp_path: Path) -> str:
    return str(tmp_path / "snapshots" / "checkpoint.bin")


class StateHolder:
    """A registrable object whose state is a plain dict (runtime.register): a restore updates that
    same dict, so a test keeps reading it."""

    def __init__(self, state: dict):
        self.state = state

    def state_dict(self) -> dict:
        return self.state

    def load_state_dict(self, loaded: dict) -> None:
        self.state.update(loaded)
