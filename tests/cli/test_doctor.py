"""`pyckpt doctor`: every check with passing and failing inputs.

Checks are pure functions of their inputs; where the input is a real thing on this machine it is
used for real: files and directories, TCP sockets on 127.0.0.1, /proc/self/mountinfo, a non-root
user, a read-only bind mount. What cannot exist here is fed as text or through an injected function,
and each such test says so: ufw (not installed; and never enabled in this machine's namespace),
showmount/rpcinfo against an NFS server (this kernel has no NFS), GPUs (none), DNS answers for
remote names (no traffic leaves loopback).
"""
from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys
import textwrap

import pytest
from typer.testing import CliRunner

from pyckpt import doctor as d
from pyckpt.cli import app

from ..conftest import clean_env, free_port
from .conftest import write_snapshots

runner = CliRunner()


def write_env(path, **values):
    base = {"DISTRIBUTED_MODE": "single", "WORLD_SIZE": "1", "PHYSICAL_NODES": "1", "MASTER_ADDR": "127.0.0.1",
            "MASTER_PORT": "29500", "BACKEND": "gloo", "SHARED_FS_PATH": str(path.parent), "SHARED_FS_TYPE": "local"}
    base.update(values)
    path.write_text("".join(f"{k}={v}\n" for k, v in base.items()))
    return path


# -- config --------------------------------------------------------------------------------

def test_config_pass_warn_on_environment_override_and_fail(tmp_path):
    env_file = write_env(tmp_path / "distributed.single.env")
    check, config = d.check_config(str(env_file), {})
    assert check.status == d.PASS and config.master_port == 29500
    check, _ = d.check_config(str(env_file), {"MASTER_PORT": "29600"})
    assert check.status == d.WARN and "MASTER_PORT" in check.message and "29600" in check.message
    bad = write_env(tmp_path / "bad.env", WORLD_SIZE="3")
    check, config = d.check_config(str(bad), {})
    assert check.status == d.FAIL and config is None and "WORLD_SIZE" in check.message and check.hint
    check, _ = d.check_config(str(tmp_path / "missing.env"), {})
    assert check.status == d.FAIL and "does not exist" in check.message


# -- MASTER_ADDR / hostname ---------------------------------------------------------------

def test_master_addr_real_resolution_of_loopback():
    assert d.check_master_addr("127.0.0.1", 1).status == d.PASS
    check = d.check_master_addr("localhost", 2)  # real resolver, /etc/hosts
    assert check.status == d.FAIL and "loopback" in check.message


def test_master_addr_debian_hostname_alias_fails_with_several_nodes():
    # Injected resolver: a name that /etc/hosts maps to Debian's 127.0.1.1 on the master.
    alias = d.check_master_addr("node0", 4, resolve=lambda name: ["127.0.1.1"])
    assert alias.status == d.FAIL and "127.0.1.1" in alias.message and "gloo" in alias.hint
    assert d.check_master_addr("node0", 4, resolve=lambda name: ["192.168.1.100"]).status == d.PASS


def test_master_addr_that_does_not_resolve():
    def nxdomain(name):
        raise socket.gaierror(socket.EAI_NONAME, "Name or service not known")

    check = d.check_master_addr("nmaster", 2, resolve=nxdomain)
    assert check.status == d.FAIL and "does not resolve" in check.message and "/etc/hosts" in check.hint


def test_hostname_resolving_to_loopback_warns_only_for_clusters():
    assert d.check_hostname("node1", 2, resolve=lambda n: ["127.0.1.1"]).status == d.WARN
    assert d.check_hostname("node1", 1, resolve=lambda n: ["127.0.1.1"]).status == d.PASS
    assert d.check_hostname("node1", 2, resolve=lambda n: ["10.77.0.2"]).status == d.PASS


# -- MASTER_PORT (real sockets on 127.0.0.1) ------------------------------------------------

@pytest.fixture
def listener():
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        sock.listen(8)
        yield sock.getsockname()[1]


def test_master_port_listening_passes_for_worker_and_master(listener):
    assert d.check_master_port("127.0.0.1", listener, is_master=False).status == d.PASS
    assert d.check_master_port("127.0.0.1", listener, is_master=True, expect_listener=True).status == d.PASS


def test_master_port_closed_on_a_worker():
    port = free_port()
    assert d.tcp_probe("127.0.0.1", port) == "refused"
    before_training = d.check_master_port("127.0.0.1", port, is_master=False)
    assert before_training.status == d.WARN and "refused" in before_training.message
    during_training = d.check_master_port("127.0.0.1", port, is_master=False, expect_listener=True)
    assert during_training.status == d.FAIL and "start rank 0" in during_training.hint


def test_master_port_on_the_master_free_or_not_listening():
    port = free_port()
    assert d.check_master_port("127.0.0.1", port, is_master=True).status == d.PASS  # rank 0 can bind it
    assert d.check_master_port("127.0.0.1", port, is_master=True, expect_listener=True).status == d.FAIL


def test_master_port_taken_by_a_socket_that_does_not_listen():
    with socket.socket() as squatter:
        squatter.bind(("127.0.0.1", 0))  # bound, never listening: connects are refused, binds fail
        port = squatter.getsockname()[1]
        check = d.check_master_port("127.0.0.1", port, is_master=True)
    assert check.status == d.FAIL and "taken" in check.message and "ss -ltnp" in check.hint


def test_master_addr_not_on_this_host_but_node_rank_0():
    # 192.0.2.1 (TEST-NET-1) is no address of this machine: bind fails with EADDRNOTAVAIL. The connect
    # probe is injected so that no packet leaves loopback.
    check = d.check_master_port("192.0.2.1", 29500, is_master=True, probe=lambda h, p: "refused")
    assert check.status == d.FAIL and "not an address of this host" in check.message


def test_master_port_filtered_by_a_firewall_times_out():
    # A DROP rule would need a firewall in this machine's namespace (forbidden here): the probe's
    # answer is injected. The local container cluster exercises the real thing.
    check = d.check_master_port("10.77.0.1", 29500, is_master=False, probe=lambda h, p: "timeout")
    assert check.status == d.FAIL and "firewall" in check.message and "nc -vz 10.77.0.1 29500" in check.hint


# -- firewall (ufw status text) -------------------------------------------------------------

UFW_ALLOWS_SUBNET = """Status: active

To                         Action      From
--                         ------      ----
22/tcp                     ALLOW       Anywhere
Anywhere                   ALLOW       10.77.0.0/24
22/tcp (v6)                ALLOW       Anywhere (v6)
"""
UFW_PORTS_ONLY = """Status: active

To                         Action      From
--                         ------      ----
22/tcp                     ALLOW       10.77.0.0/24
29500/tcp                  ALLOW       10.77.0.0/24
2049/tcp                   ALLOW       10.77.0.0/24
111                        ALLOW       10.77.0.0/24
"""


def test_firewall_from_ufw_status_text():
    assert d.check_firewall(UFW_ALLOWS_SUBNET, "10.77.0.0/24").status == d.PASS
    assert d.check_firewall(UFW_ALLOWS_SUBNET, "10.77.0.0/25").status == d.PASS  # a subnet of the allowed one
    ports_only = d.check_firewall(UFW_PORTS_ONLY, "10.77.0.0/24")
    assert ports_only.status == d.FAIL and "ephemeral" in ports_only.hint and "29500/tcp" in ports_only.message
    other = d.check_firewall(UFW_ALLOWS_SUBNET, "192.168.1.0/24")
    assert other.status == d.FAIL and "ufw allow from 192.168.1.0/24" in other.hint
    assert d.check_firewall("Status: inactive\n", "10.77.0.0/24").status == d.PASS
    assert d.check_firewall(UFW_ALLOWS_SUBNET, None).status == d.WARN
    assert d.check_firewall("ERROR: You need to be root to run this script", "10.77.0.0/24").status == d.SKIP
    missing = d.check_firewall(None, "10.77.0.0/24")
    assert missing.status == d.SKIP and "not installed" in missing.message


# -- backend vs hardware -------------------------------------------------------------------

def test_backend_against_hardware():
    cpu = {"torch": "2.13.0+cpu", "cuda": None, "nccl": None, "gpus": 0}
    gpu = {"torch": "2.13.0+cu128", "cuda": "12.8", "nccl": "2.27.3", "gpus": 4}
    wrong = d.check_backend("nccl", cpu)
    assert wrong.status == d.FAIL and "BACKEND=gloo" in wrong.hint and "torch 2.13.0+cpu" in wrong.message
    assert d.check_backend("gloo", cpu).status == d.PASS
    assert d.check_backend("auto", cpu).message.startswith("BACKEND=auto -> gloo")
    assert d.check_backend("nccl", gpu).status == d.PASS and "NCCL 2.27.3" in d.check_backend("nccl", gpu).message
    assert d.check_backend("gloo", gpu).status == d.WARN
    assert d.check_backend("gloo", {"torch": None}).status == d.FAIL


def test_torch_versions_of_this_machine():
    import torch

    versions = d.torch_versions()
    assert versions["torch"] == torch.__version__ and versions["gpus"] == torch.cuda.device_count()


# -- shared filesystem ---------------------------------------------------------------------

MOUNTINFO = textwrap.dedent("""\
    22 27 0:21 / /proc rw,relatime - proc proc rw
    27 1 8:1 / / rw,relatime - ext4 /dev/sda1 rw
    90 27 0:50 / /shared rw,relatime - nfs4 10.77.0.1:/shared rw,vers=4.2
    91 27 0:51 / /srv/my\\040data rw,relatime - xfs /dev/sdb1 rw
    """)


def test_mount_table_parsing():
    assert d.mount_of("/shared/snapshots", MOUNTINFO)["fstype"] == "nfs4"
    assert d.mount_of("/sharedx", MOUNTINFO)["fstype"] == "ext4"
    assert d.mount_of("/srv/my data/x", MOUNTINFO)["mount_point"] == "/srv/my data"


def test_fs_type_worker_needs_nfs_master_exports_local(tmp_path):
    assert d.check_fs_type("/shared", MOUNTINFO, "nfs", is_master=False).status == d.PASS
    local = MOUNTINFO.replace("nfs4 10.77.0.1:/shared", "ext4 /dev/sdc1")
    worker = d.check_fs_type("/shared", local, "nfs", is_master=False)
    assert worker.status == d.FAIL and "expected nfs" in worker.message and "mount -t nfs4" in worker.hint
    assert d.check_fs_type("/shared", local, "nfs", is_master=True).status == d.PASS
    docker = d.check_fs_type("/shared", local, "nfs", is_master=False, mode="docker")
    assert docker.status == d.PASS and "DISTRIBUTED_MODE=docker" in docker.message
    assert d.check_fs_type("/shared", local, "local", is_master=False).status == d.PASS
    with open("/proc/self/mountinfo") as f:  # the real table: some filesystem holds tmp_path
        real = d.check_fs_type(str(tmp_path), f.read(), "local", is_master=True)
    assert real.status == d.PASS and real.details["fstype"]


def test_fs_type_local_warns_on_an_nfs_mount_or_several_nodes():
    """Issue 18: SHARED_FS_TYPE=local skips the NFS checks; where they matter it warns and says so."""
    on_nfs = d.check_fs_type("/shared/snapshots", MOUNTINFO, "local", is_master=False, mode="physical", nodes=4)
    assert on_nfs.status == d.WARN and "nfs4" in on_nfs.message and "SHARED_FS_TYPE=local" in on_nfs.message
    assert "set SHARED_FS_TYPE=nfs" in on_nfs.hint and "skips the NFS checks" in on_nfs.hint
    local = MOUNTINFO.replace("nfs4 10.77.0.1:/shared", "ext4 /dev/sdc1")
    cluster = d.check_fs_type("/shared/snapshots", local, "local", is_master=True, mode="physical", nodes=4)
    assert cluster.status == d.WARN and "DISTRIBUTED_MODE=physical has 4 nodes" in cluster.message
    assert "set SHARED_FS_TYPE=nfs" in cluster.hint
    assert d.check_fs_type("/shared/snapshots", local, "local", is_master=True, mode="single").status == d.PASS


def test_shared_path_exists(tmp_path):
    assert d.check_shared_exists(str(tmp_path)).status == d.PASS
    assert d.check_shared_exists(str(tmp_path / "no")).status == d.FAIL
    (tmp_path / "file").write_text("x")
    assert d.check_shared_exists(str(tmp_path / "file")).status == d.FAIL


def test_writable_directory_passes_and_leaves_nothing(tmp_path):
    assert d.check_writable(str(tmp_path)).status == d.PASS
    assert os.listdir(tmp_path) == []


def _as_nobody(function, *args) -> dict:
    """Run function(*args) in a forked child that dropped root for uid/gid 65534 (nobody).

    A fork, not an exec: the child keeps this process's imported pyckpt, so it does not need to
    read the venv (which may live under a directory only root can enter)."""
    read_end, write_end = os.pipe()
    pid = os.fork()
    if pid == 0:  # child
        code = 1
        try:
            os.close(read_end)
            os.setgroups([])
            os.setgid(65534)
            os.setuid(65534)
            os.write(write_end, json.dumps(function(*args).as_dict()).encode())
            code = 0
        finally:
            os._exit(code)
    os.close(write_end)
    with os.fdopen(read_end, "rb") as f:
        data = f.read()
    _, status = os.waitpid(pid, 0)
    assert os.waitstatus_to_exitcode(status) == 0, "the unprivileged child failed"
    return json.loads(data)


@pytest.mark.skipif(os.geteuid() != 0, reason="needs root to switch to the unprivileged user nobody")
def test_unwritable_dir_for_a_non_root_user(tmp_path):
    """root ignores permission bits, so the check runs as uid 65534 (nobody) in a forked child:
    a root-owned 0755 directory is not writable for it; a 1777 one is."""
    closed, open_ = tmp_path / "closed", tmp_path / "open"
    closed.mkdir(mode=0o755)
    open_.mkdir()
    os.chmod(open_, 0o1777)
    for parent in (tmp_path, *tmp_path.parents):  # let nobody reach the directories (pytest's are 0700)
        if parent == parent.parent:
            break
        mode = os.stat(parent).st_mode & 0o7777
        if not mode & 0o001:
            os.chmod(parent, mode | 0o111)
    closed_check = _as_nobody(d.check_writable, str(closed))
    assert closed_check["status"] == "fail" and "not writable by nobody" in closed_check["message"]
    assert "Permission denied" in closed_check["message"] and "chown" in closed_check["hint"]
    assert _as_nobody(d.check_writable, str(open_))["status"] == "pass"
    assert d.check_writable(str(closed)).status == d.PASS  # and root may write there
    # Issue 18, item 7: root checks as the cluster user (--share-user), in a child with its ids
    as_user = d.check_writable(str(closed), "nobody")
    assert as_user.status == d.FAIL and "not writable by nobody: Permission denied" in as_user.message
    assert d.check_writable(str(open_), "nobody").status == d.PASS
    assert "does not exist" in d.check_writable(str(open_), "no-such-user-ck4").message
    # an unprivileged doctor cannot check as another user: it says so, with its own result
    other = _as_nobody(d.check_writable, str(open_), "root")
    assert other["status"] == "warn" and "checked as nobody, not as root" in other["message"], other


@pytest.mark.skipif(os.geteuid() != 0 or shutil.which("unshare") is None, reason="needs root and unshare")
def test_read_only_mount_is_unwritable_even_for_root(tmp_path):
    """A read-only bind mount in a private mount namespace (like an NFS export mounted ro)."""
    target = tmp_path / "ro"
    target.mkdir()
    code = ("import json; from pyckpt.doctor import check_writable; "
            f"print(json.dumps(check_writable({str(target)!r}).as_dict()))")
    script = (f"mount --bind {target} {target} && mount -o remount,bind,ro {target} && "
              f"exec {sys.executable} -c \"$0\"")
    done = subprocess.run(["unshare", "--mount", "--propagation", "private", "sh", "-c", script, code],
                          capture_output=True, text=True, timeout=120, env=clean_env())
    if done.returncode != 0 and "mount" in done.stderr and "permission denied" in done.stderr.lower():
        pytest.skip(f"cannot make mounts here: {done.stderr.strip()}")
    assert done.returncode == 0, done.stderr
    check = json.loads(done.stdout)
    assert check["status"] == "fail" and "Read-only file system" in check["message"]


def test_free_space_against_last_snapshot():
    assert d.check_free_space("/s", 10 << 30, 0).status == d.PASS
    assert d.check_free_space("/s", 10 << 30, 1 << 30).status == d.PASS
    assert d.check_free_space("/s", 3 << 29, 1 << 30).status == d.WARN
    full = d.check_free_space("/s", 100 << 20, 1 << 30)
    assert full.status == d.FAIL and "1.0 GiB" in full.message and "ENOSPC" in full.hint


def test_free_space_uses_the_real_last_snapshot_size(tmp_path):
    from pyckpt.inspect import newest_complete_bytes

    (tmp_path / "snapshots").mkdir()
    assert newest_complete_bytes(str(tmp_path / "snapshots")) == 0
    write_snapshots(tmp_path / "snapshots" / "checkpoint.bin", steps=1)
    size = newest_complete_bytes(str(tmp_path / "snapshots"))
    data = tmp_path / "snapshots" / "checkpoint.bin.pyckpt" / "v00000001" / "data-0.bin"
    assert size == os.path.getsize(data) > 0
    assert d.check_free_space(str(tmp_path), size - 1, size).status == d.FAIL


# -- NFS export (showmount/rpcinfo output) --------------------------------------------------

def test_nfs_export_from_a_worker():
    # No kernel NFS on this machine: the tools' answers are injected (the container cluster runs them).
    def tools(showmount=None, rpcinfo=None):
        return lambda argv: {"showmount": showmount, "rpcinfo": rpcinfo}[argv[0]]

    seen = d.check_nfs_export("10.77.0.1", "/shared", "nfs", False, tools((0, "/shared 10.77.0.0/24")))
    assert seen.status == d.PASS
    # SHARED_FS_PATH is the snapshot directory (the spec's /shared/snapshots): the export above it holds it.
    below = d.check_nfs_export("10.77.0.1", "/shared/snapshots", "nfs", False, tools((0, "/shared 10.77.0.0/24")))
    assert below.status == d.PASS and "exports /shared, which holds /shared/snapshots" in below.message
    beside = d.check_nfs_export("10.77.0.1", "/sharedx/snapshots", "nfs", False, tools((0, "/shared 10.77.0.0/24")))
    assert beside.status == d.FAIL
    other = d.check_nfs_export("10.77.0.1", "/shared", "nfs", False, tools((0, "/export 10.77.0.0/24")))
    assert other.status == d.FAIL and "exportfs -ra" in other.hint
    v4_only = d.check_nfs_export("10.77.0.1", "/shared", "nfs", False,
                                 tools((1, "clnt_create: RPC: Program not registered"),
                                       (0, "program 100003 version 4 ready and waiting")))
    assert v4_only.status == d.PASS
    down = d.check_nfs_export("10.77.0.1", "/shared", "nfs", False,
                              tools((1, "clnt_create: RPC: Unable to receive"),
                                    (1, "rpcinfo: RPC: Remote system error - Connection refused")))
    assert down.status == d.FAIL and "2049" in down.hint
    assert d.check_nfs_export("10.77.0.1", "/shared", "nfs", False, tools()).status == d.SKIP
    assert d.check_nfs_export("10.77.0.1", "/shared", "nfs", True, tools()).status == d.SKIP
    assert d.check_nfs_export("10.77.0.1", "/shared", "local", False, tools()).status == d.SKIP


def test_run_tool_reports_missing_tools():
    assert d.run_tool(["pyckpt-no-such-tool"]) is None
    assert d.run_tool([sys.executable, "-c", "print('hi')"]) == (0, "hi")


# -- the command ---------------------------------------------------------------------------

# -- the elastic rendezvous port (--rdzv-port): the same probes as MASTER_PORT, its own name and hints ----

def test_rdzv_port_listening_passes(listener):
    check = d.check_rdzv_port("127.0.0.1", listener, is_master=False)
    assert (check.name, check.status) == ("rdzv_port", d.PASS) and "elastic agent is listening" in check.message


def test_rdzv_port_closed_on_a_worker_warns_then_fails_while_training():
    port = free_port()
    before = d.check_rdzv_port("127.0.0.1", port, is_master=False)
    assert (before.name, before.status) == ("rdzv_port", d.WARN) and "refused" in before.message
    during = d.check_rdzv_port("127.0.0.1", port, is_master=False, expect_listener=True)
    assert during.status == d.FAIL and "start torchrun's elastic agent on the master" in during.hint
    assert "the rendezvous port (rdzv_port) is the same on every node" in during.hint


def test_rdzv_port_on_the_master_free_or_taken():
    port = free_port()
    assert d.check_rdzv_port("127.0.0.1", port, is_master=True).status == d.PASS
    with socket.socket() as squatter:
        squatter.bind(("127.0.0.1", 0))
        taken = squatter.getsockname()[1]
        check = d.check_rdzv_port("127.0.0.1", taken, is_master=True)
    assert check.status == d.FAIL and "taken" in check.message and "change the rendezvous port" in check.hint


def test_rdzv_port_filtered_by_a_firewall_times_out():
    check = d.check_rdzv_port("10.77.0.1", 29400, is_master=False, probe=lambda h, p: "timeout")
    assert check.status == d.FAIL and "firewall" in check.message and "nc -vz 10.77.0.1 29400" in check.hint


def doctor(*args, **env):
    """The real console entry point in a subprocess (environment controlled)."""
    done = subprocess.run([sys.executable, "-m", "pyckpt.cli", "doctor", *map(str, args)], capture_output=True,
                          text=True, timeout=120, env=clean_env(**env))
    return done


def test_doctor_command_healthy_single_host(tmp_path):
    shared = tmp_path / "shared"
    shared.mkdir()
    env_file = write_env(shared / "distributed.single.env", SHARED_FS_PATH=str(shared))
    done = doctor("--file", env_file, "--json")
    assert done.returncode == 0, done.stdout + done.stderr
    report = json.loads(done.stdout)
    statuses = {c["name"]: c["status"] for c in report["checks"]}
    assert statuses["config"] == "pass" and statuses["shared_writable"] == "pass"
    assert statuses["backend"] == "pass" and statuses["master_port"] == "skip"
    assert report["host"]["shared_fs_path"] == str(shared)
    assert report["host"]["config_sha256"] and report["host"]["torch"]
    human = doctor("--file", env_file)
    assert human.returncode == 0 and "PASS config" in human.stdout


def test_doctor_command_fails_on_wrong_backend_and_closed_port(tmp_path):
    shared = tmp_path / "shared"
    shared.mkdir()
    port = free_port()
    env_file = write_env(shared / "distributed.docker.env", DISTRIBUTED_MODE="docker", WORLD_SIZE="2",
                         NPROC_PER_NODE="2", MASTER_PORT=str(port), BACKEND="nccl", SHARED_FS_PATH=str(shared))
    done = doctor("--file", env_file, "--expect-listener", "--json", NODE_RANK="0")
    assert done.returncode == 1
    checks = {c["name"]: c for c in json.loads(done.stdout)["checks"]}
    assert checks["backend"]["status"] == "fail" and "gloo" in checks["backend"]["hint"]
    assert checks["master_port"]["status"] == "fail" and str(port) in checks["master_port"]["message"]
    human = doctor("--file", env_file, "--expect-listener")
    assert human.returncode == 1 and "FAIL backend" in human.stdout and "fix:" in human.stdout
    assert "Traceback" not in human.stderr


def test_doctor_command_checks_the_rendezvous_port_only_when_asked(tmp_path):
    # A worker (NODE_RANK=1) of a 2-node docker config: the master port listens, the rendezvous port does not.
    # Elastic mode (--rdzv-port) checks the rendezvous port instead of the master port.
    shared = tmp_path / "shared"
    shared.mkdir()
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        sock.listen(8)
        master_port, rdzv_port = sock.getsockname()[1], free_port()
        env_file = write_env(shared / "distributed.docker.env", DISTRIBUTED_MODE="docker", WORLD_SIZE="2",
                             PHYSICAL_NODES="2", MASTER_PORT=str(master_port), SHARED_FS_PATH=str(shared),
                             SHARED_FS_TYPE="local")
        without = json.loads(doctor("--file", env_file, "--json", NODE_RANK="1").stdout)
        done = doctor("--file", env_file, "--json", "--expect-listener", "--rdzv-port", rdzv_port, NODE_RANK="1")
    assert "rdzv_port" not in {c["name"] for c in without["checks"]}
    assert {c["name"]: c["status"] for c in without["checks"]}["master_port"] == "pass"
    checks = {c["name"]: c for c in json.loads(done.stdout)["checks"]}
    # Elastic mode: the workers' port is torchrun's pick at every start, not MASTER_PORT.
    assert checks["master_port"]["status"] == "skip" and "elastic mode" in checks["master_port"]["message"]
    assert checks["rdzv_port"]["status"] == "fail" and f"127.0.0.1:{rdzv_port} refused" in checks["rdzv_port"]["message"]
    assert done.returncode == 1
    bad = doctor("--file", env_file, "--rdzv-port", "70000")
    assert bad.returncode == 2 and "Traceback" not in bad.stderr


def test_doctor_command_broken_config_exits_1_without_traceback(tmp_path):
    env_file = write_env(tmp_path / "distributed.single.env", MASTER_PORT="99999")
    done = doctor("--file", env_file)
    assert done.returncode == 1 and "MASTER_PORT" in done.stdout and "Traceback" not in done.stderr


def test_doctor_in_process_runner_matches(tmp_path):
    env_file = write_env(tmp_path / "distributed.single.env", SHARED_FS_PATH=str(tmp_path / "gone"))
    result = runner.invoke(app, ["doctor", "--file", str(env_file), "--json"], env={"NODE_RANK": "0"})
    assert result.exit_code == 1
    checks = {c["name"]: c["status"] for c in json.loads(result.stdout)["checks"]}
    assert checks["shared_path"] == "fail" and checks["shared_writable"] == "skip"


# -- SNAPSHOT_PATH in S3 ---------------------------------------------------------------------
# Server: moto's standalone S3 server (tests/s3server.py), real HTTP; it accepts any credentials, so
# "refused credentials" cannot be shown here (a missing bucket and missing credentials can).

def s3_doctor(tmp_path, location: str) -> dict[str, d.Check]:
    env_file = write_env(tmp_path / "distributed.single.env", SHARED_FS_PATH=str(tmp_path / "no-such-dir"),
                         SNAPSHOT_PATH=location)
    checks, facts = d.run_doctor(str(env_file), environ={})
    return {c.name: c for c in checks}


def test_doctor_with_an_s3_snapshot_path_skips_the_shared_dir_checks_and_heads_the_bucket(tmp_path):
    from tests.s3server import new_bucket

    bucket = new_bucket()
    checks = s3_doctor(tmp_path, f"s3://{bucket}/run1/checkpoint.bin")
    for name in ("shared_path", "shared_fs_type", "shared_writable", "free_space", "nfs_export"):
        assert checks[name].status == d.SKIP, checks[name]
        assert f"SNAPSHOT_PATH=s3://{bucket}/run1/checkpoint.bin: the snapshots are in S3" in checks[name].message
    assert checks["snapshot_store"].status == d.PASS, checks["snapshot_store"]
    assert f"bucket {bucket} answers at http://127.0.0.1:" in checks["snapshot_store"].message
    assert d.exit_code(list(checks.values())) == 0


def test_doctor_names_a_missing_bucket_and_warns_without_credentials(tmp_path, monkeypatch):
    from tests.s3server import endpoint

    url = endpoint()
    check = s3_doctor(tmp_path, "s3://no-such-bucket/checkpoint.bin")["snapshot_store"]
    assert check.status == d.FAIL and f"no bucket 'no-such-bucket' at {url}" in check.message, check
    assert "AWS_ENDPOINT_URL" in check.message and "training_environment" in check.hint
    for name in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_PROFILE", "AWS_SESSION_TOKEN"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("AWS_SHARED_CREDENTIALS_FILE", str(tmp_path / "none"))
    monkeypatch.setenv("AWS_CONFIG_FILE", str(tmp_path / "none"))
    check = s3_doctor(tmp_path, "s3://ckpt/checkpoint.bin")["snapshot_store"]
    assert check.status == d.WARN and "needs credentials" in check.message, check


def test_doctor_reports_an_environment_snapshot_path_over_the_file(tmp_path):
    env_file = write_env(tmp_path / "distributed.single.env", SNAPSHOT_PATH="/shared/a/checkpoint.bin")
    check, config = d.check_config(str(env_file), {"PYCKPT_SNAPSHOT_PATH": "/shared/b/checkpoint.bin"})
    assert check.status == d.WARN and config.snapshot_path == "/shared/b/checkpoint.bin"
    assert "SNAPSHOT_PATH: file '/shared/a/checkpoint.bin'" in check.message
    assert "environment PYCKPT_SNAPSHOT_PATH='/shared/b/checkpoint.bin'" in check.message
