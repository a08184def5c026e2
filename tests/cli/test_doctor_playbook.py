"""doctor.yml: syntax, and real runs against this machine (connection local).

The cluster-wide checks need several nodes; here two inventory hosts run on this machine with
different shared directories, which is exactly what a node without the NFS mount looks like: each
writes its marker into its own directory and cannot see the other's. Runs against the local
container cluster (real SSH, NFS stand-in, firewall) belong to the cluster end-to-end tests.
"""
from __future__ import annotations

import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from ..conftest import REPO, clean_env

pytestmark = pytest.mark.ansible
PLAYBOOK = os.path.join(os.path.dirname(sys.executable), "ansible-playbook")


def playbook(*args: str, timeout: float = 300) -> subprocess.CompletedProcess:
    # PYTHONPATH: the venv's `pyckpt` that doctor.yml runs imports this checkout's package, also when the
    # venv was installed (editable) from another checkout of the repository.
    env = clean_env(ANSIBLE_NOCOLOR="1", ANSIBLE_FORCE_COLOR="0", PYTHONPATH=str(REPO))
    return subprocess.run([PLAYBOOK, *args], cwd=REPO, capture_output=True, text=True, timeout=timeout, env=env)


@pytest.mark.parametrize("inventory", ["inventory/physical", "inventory/single"])
def test_syntax(inventory):
    done = playbook("--syntax-check", "-i", inventory, "doctor.yml")
    assert done.returncode == 0, done.stdout + done.stderr


def make_node(root: Path, backend: str = "gloo") -> dict:
    """A shared directory with the rendered single-mode config file, as setup-cluster.yml leaves it."""
    config = root / "checkpoint4" / "config"
    config.mkdir(parents=True)
    (config / "distributed.single.env").write_text(
        f"DISTRIBUTED_MODE=single\nWORLD_SIZE=1\nPHYSICAL_NODES=1\nMASTER_ADDR=127.0.0.1\nMASTER_PORT=29500\n"
        f"BACKEND={backend}\nSHARED_FS_PATH={root}\nSHARED_FS_TYPE=local\n")
    return {"ansible_connection": "local", "node_rank": 0, "shared_path": str(root),
            "code_dir": str(root / "checkpoint4")}


def write_inventory(path: Path, master: dict, workers: dict) -> Path:
    inventory = {"all": {
        # Run as this user (root here, and no sudo on this machine): doctor.yml's become is not exercised
        # here, the identity it checks the share as (cluster_user) is.
        "vars": {"distributed_mode": "single", "cluster_subnet": "127.0.0.0/8", "nproc_per_node": 1,
                 "venv_path": sys.prefix, "ansible_become": False, "cluster_user": "root",
                 "ansible_python_interpreter": sys.executable},
        "children": {"master": {"hosts": master}, "workers": {"hosts": workers}}}}
    path.write_text(yaml.safe_dump(inventory))
    return path


def test_healthy_nodes_sharing_one_directory(tmp_path):
    """Two inventory hosts on this machine that really share the directory: every marker is seen."""
    node = make_node(tmp_path / "shared")
    inventory = write_inventory(tmp_path / "hosts.yml", {"node0": node}, {"node1": node})
    done = playbook("-i", str(inventory), "doctor.yml")
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr
    assert "2 node(s) checked: no problems" in done.stdout
    assert "node0 (rank 0): " in done.stdout and "node1 (rank 0): " in done.stdout
    assert " 0 fail" in done.stdout and " 1 fail" not in done.stdout
    assert os.listdir(tmp_path / "shared" / ".pyckpt-doctor") == []  # markers cleaned up


def test_cluster_wide_problems_are_found(tmp_path):
    """node1 does not share node0's directory, runs another config (nccl on a CPU host), and the
    clock limit is negative so that the clock comparison must report every node."""
    inventory = write_inventory(tmp_path / "hosts.yml", {"node0": make_node(tmp_path / "a")},
                                {"node1": make_node(tmp_path / "b", backend="nccl")})
    done = playbook("-i", str(inventory), "doctor.yml", "-e", "doctor_max_clock_skew_s=-1")
    out = done.stdout
    assert done.returncode == 2, out[-3000:] + done.stderr
    assert f"node0 does not see the marker node1 wrote in {tmp_path / 'a'}/.pyckpt-doctor" in out
    assert f"node1 does not see the marker node0 wrote in {tmp_path / 'b'}/.pyckpt-doctor" in out
    assert f"SHARED_FS_PATH differs between nodes: node0={tmp_path / 'a'}, node1={tmp_path / 'b'}" in out
    assert "the config file (sha256) differs between nodes" in out
    assert "node1: backend: BACKEND=nccl but torch sees no GPU" in out
    assert "node0: backend" not in out
    assert "node0: clock is off by 0.0 s" in out and "node1: clock is off by 0.0 s" in out
    assert "torch version differs" not in out


def nvidia_smi_stand_in(path: Path, driver: str | None) -> str:
    """A stand-in for nvidia-smi (this machine has no GPU): 2 GPUs with `driver`, or failing like a
    broken driver when `driver` is None."""
    body = (f"printf '{driver}\\n{driver}\\n'" if driver else
            "echo 'NVIDIA-SMI has failed because it could not communicate with the NVIDIA driver.'; exit 9")
    path.write_text(f"#!/bin/sh\n# stand-in nvidia-smi (tests/cli/test_doctor_playbook.py)\n{body}\n")
    path.chmod(0o755)
    return str(path)


def test_nvidia_driver_reported_per_node_and_mismatch_flagged(tmp_path):
    """Issue 18, item 10: each node's driver version is reported, and nodes that differ are a problem."""
    node = make_node(tmp_path / "shared")   # one shared directory: only the drivers differ
    node0 = {**node, "doctor_nvidia_smi": nvidia_smi_stand_in(tmp_path / "smi0", "550.54.15")}
    node1 = {**node, "doctor_nvidia_smi": nvidia_smi_stand_in(tmp_path / "smi1", "535.104.05")}
    node2 = {**node, "doctor_nvidia_smi": nvidia_smi_stand_in(tmp_path / "smi2", None)}
    inventory = write_inventory(tmp_path / "hosts.yml", {"node0": node0}, {"node1": node1, "node2": node2})
    done = playbook("-i", str(inventory), "doctor.yml")
    out = " ".join(done.stdout.split())
    assert done.returncode == 2, done.stdout[-3000:] + done.stderr
    assert "NVIDIA driver 550.54.15, config" in out and "NVIDIA driver 535.104.05, config" in out
    assert ("the NVIDIA driver version differs between nodes: node0=550.54.15, node1=535.104.05, node2=unknown"
            in out), done.stdout[-3000:]
    assert "node2: nvidia-smi failed (rc 9): NVIDIA-SMI has failed" in out


def test_the_share_is_checked_as_the_cluster_user(tmp_path):
    """Issue 18, item 7: the write check runs as cluster_user, not as the user running the doctor.
    Here the doctor runs as root, and the share is writable by root only: root's own write would pass,
    the cluster user's (nobody, through a forked child with nobody's uid and groups) must fail."""
    if os.geteuid() != 0:
        pytest.skip("needs root to check as another user")
    shared = tmp_path / "shared"
    node = make_node(shared)
    shared.chmod(0o755)
    inventory = write_inventory(tmp_path / "hosts.yml", {"node0": node}, {})
    spec = yaml.safe_load(inventory.read_text())
    spec["all"]["vars"]["cluster_user"] = "nobody"
    inventory.write_text(yaml.safe_dump(spec))
    done = playbook("-i", str(inventory), "doctor.yml")
    assert done.returncode != 0
    assert f"shared_writable: {shared} is not writable by nobody: Permission denied" in done.stdout, done.stdout[-3000:]


def test_the_rendezvous_port_is_checked_in_elastic_mode(tmp_path):
    """Issue 17: with elastic_training the master's rendezvous port is checked like MASTER_PORT. Here a socket
    holds it without listening (the port is taken); in static mode the port is not looked at."""
    inventory = write_inventory(tmp_path / "hosts.yml", {"node0": make_node(tmp_path / "shared")}, {})
    with socket.socket() as squatter:
        squatter.bind(("127.0.0.1", 0))
        port = squatter.getsockname()[1]
        static = playbook("-i", str(inventory), "doctor.yml", "-e", f"rdzv_port={port}")
        elastic = playbook("-i", str(inventory), "doctor.yml", "-e", f"rdzv_port={port}", "-e", "elastic_training=true")
    assert static.returncode == 0, static.stdout[-3000:] + static.stderr
    assert "rdzv_port" not in static.stdout
    flat = " ".join(elastic.stdout.split())
    assert elastic.returncode == 2, elastic.stdout[-3000:] + elastic.stderr
    assert f"node0: rdzv_port: 127.0.0.1:{port} is taken by a process that does not accept connections" in flat, flat[-3000:]
