"""A real Ceph RGW for the S3 tests and the S3 bench (bench/s3.py --server ceph): a one-node Ceph 16.2 cluster (one monitor, one memstore OSD, radosgw
with its beast HTTP frontend), started once per pytest process in a temporary directory, stopped at exit.

It runs as plain child processes of the test run, not in a container: every daemon binds 127.0.0.1 only
(the monitor and radosgw on free ports, the OSD in Ceph's own port range; a test checks it), keeps its data in memory
(memstore) and its config, keyring, sockets and logs in the temporary directory, and needs no kernel
module, block device, systemd or root: nothing outside the test run sees or touches it.

Unlike moto (tests/s3server.py) it is the object store many clusters run: conditional PUTs are atomic,
requests must be signed with the user's keys, multipart uploads are stored as real parts. What it does
not emulate: a network (loopback only), durability (memstore, one replica), several gateways.
Ceph 16.2's S3 quirks that pyckpt meets (docs/RELIABILITY.md): PUT If-Match matches only the unquoted
ETag, If-Match on a missing key answers 412 (AWS: 404), DELETE and CompleteMultipartUpload ignore
their conditions, and in a versioned bucket If-None-Match is ignored and every If-Match refused.

Installed by scripts/setup-ceph.sh (`make setup-ceph`; `make test` runs it)."""
from __future__ import annotations

import atexit
import os
import shutil
import signal
import subprocess
import tempfile
import time
import uuid
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

from .checkpoint import free_port

BINARIES = ("ceph-mon", "ceph-osd", "radosgw", "radosgw-admin", "ceph-authtool", "monmaptool", "ceph")
ACCESS_KEY, SECRET_KEY = "pyckpt-tests", "pyckpt-tests-secret-key-0123456789"
START_TIMEOUT = 90.0                 # seconds each step may take before the start-up is abandoned
# Ceph settings; the comments say why each one is needed for one node on loopback.
CONFIG = """\
[global]
fsid = {fsid}
mon host = [v2:127.0.0.1:{mon_port}]
mon initial members = a
# loopback only (without cluster addr the OSD listens on 0.0.0.0 too)
public addr = 127.0.0.1
cluster addr = 127.0.0.1
ms bind msgr1 = false
# no cephx between the daemons (S3 requests are still signed and checked by radosgw)
auth cluster required = none
auth service required = none
auth client required = none
# without it radosgw loops on "get_initial_auth_request returned -13"
ms mon client mode = crc
# one OSD: pools of one replica, placement on one host
osd pool default size = 1
osd pool default min size = 1
osd pool default pg num = 8
osd pool default pgp num = 8
mon allow pool size one = true
mon warn on pool no redundancy = false
osd crush chooseleaf type = 0
mon max pg per osd = 1000
# everything under the temporary directory
run dir = {dir}/run
admin socket = {dir}/run/$name.asok
log file = {dir}/log/$name.log
pid file = {dir}/run/$name.pid
keyring = {dir}/keyring
mon data = {dir}/mon/$name
osd data = {dir}/osd/$name
crash dir = {dir}/crash
log to stderr = false
err to stderr = false

[osd]
# data in memory: no block device, fast, gone with the process
osd objectstore = memstore
memstore device bytes = {memstore_bytes}
osd max object size = 134217728

[client.rgw.tests]
rgw frontends = beast endpoint=127.0.0.1:{rgw_port}{more_endpoints}
rgw data = {dir}/rgw
# Deleted objects' data stays in the (memory) store until radosgw's garbage collector frees it, by
# default 2 hours later: repeated GiB-sized rounds would fill the memstore and stall every write.
# The bench collects between its figures (collect_command) and runs the collector rarely by itself.
rgw gc obj min wait = 0
rgw gc processor period = {gc_period}
rgw gc processor max time = {gc_period}
"""


@dataclass
class Cluster:
    dir: Path
    endpoint: str
    procs: dict[str, subprocess.Popen]

    @property
    def env(self) -> dict[str, str]:
        """The AWS_* settings that point an S3 client at this gateway with the test user's keys."""
        return {"AWS_ENDPOINT_URL": self.endpoint, "AWS_ACCESS_KEY_ID": ACCESS_KEY,
                "AWS_SECRET_ACCESS_KEY": SECRET_KEY, "AWS_REGION": "us-east-1", "AWS_EC2_METADATA_DISABLED": "true"}


_cluster: Cluster | None = None


class CephStartError(RuntimeError):
    pass


def cluster(memstore_bytes: int = 4 << 30, gc_period: int = 5) -> Cluster:
    """This process's Ceph RGW, started on first use (~12 s); memstore_bytes caps the data it holds
    (in memory, as it is written); deleted objects' data is freed every gc_period seconds."""
    global _cluster
    if running_endpoint() is None:
        if _cluster is not None:
            stop(_cluster)
        _cluster = _start(memstore_bytes=memstore_bytes, gc_period=gc_period)
        atexit.register(stop, _cluster)
    return _cluster


def running_endpoint() -> str | None:
    """The gateway's URL if this process started one that still runs."""
    if _cluster is None or any(p.poll() is not None for p in _cluster.procs.values()):
        return None
    return _cluster.endpoint


def missing() -> list[str]:
    """The Ceph programs the cluster needs that are not on PATH."""
    return [b for b in BINARIES if shutil.which(b) is None]


@contextmanager
def serving(host: str) -> Iterator[Cluster]:
    """A cluster of its own whose gateway also listens on host (an address of this machine, e.g. the
    bridge of a container network the test made, so that its containers reach it); its endpoint is
    that address. Stopped when the block ends."""
    cluster = _start(host)
    try:
        yield cluster
    finally:
        stop(cluster)


def _start(host: str = "127.0.0.1", memstore_bytes: int = 4 << 30, gc_period: int = 5) -> Cluster:
    if missing():
        raise CephStartError(f"Ceph is not installed (no {', '.join(missing())} on PATH): run `make setup-ceph` "
                             "(scripts/setup-ceph.sh, as root) to install ceph-mon, ceph-osd and radosgw")
    base = Path(tempfile.mkdtemp(prefix="pyckpt-ceph-"))
    for sub in ("run", "log", "mon", "osd", "rgw", "crash"):
        (base / sub).mkdir()
    fsid, mon_port, rgw_port = str(uuid.uuid4()), free_port(), free_port()
    conf = base / "ceph.conf"
    more = f" endpoint={host}:{rgw_port}" if host != "127.0.0.1" else ""
    conf.write_text(CONFIG.format(fsid=fsid, mon_port=mon_port, rgw_port=rgw_port, more_endpoints=more, dir=base,
                                  memstore_bytes=memstore_bytes, gc_period=gc_period))
    cluster = Cluster(base, f"http://{host}:{rgw_port}", {})
    try:
        _start_mon(cluster, conf, fsid, f"[v2:127.0.0.1:{mon_port}]")
        _start_osd(cluster, conf)
        _start_rgw(cluster, conf)
    except BaseException:
        stop(cluster)
        raise
    return cluster


def collect_command(cluster: Cluster) -> list[str]:
    """The command that frees the data of every deleted object now (0.2 s when there is none)."""
    return ["radosgw-admin", "-c", str(cluster.dir / "ceph.conf"), "-n", "client.rgw.tests", "gc", "process",
            "--include-all"]


def _tool(cluster: Cluster, conf: Path, *args: str, what: str) -> str:
    """Run a Ceph tool against the cluster; CephStartError with its output if it fails."""
    cmd = [args[0], "-c", str(conf), *args[1:]]
    try:
        done = subprocess.run(cmd, capture_output=True, text=True, timeout=START_TIMEOUT)
    except subprocess.TimeoutExpired:
        raise CephStartError(f"Ceph start-up: {what} ({' '.join(cmd)}) did not finish in {START_TIMEOUT:g} s"
                             + _logs(cluster)) from None
    if done.returncode != 0:
        raise CephStartError(f"Ceph start-up: {what} failed (exit {done.returncode}):\n"
                             f"{(done.stdout + done.stderr)[-3000:]}" + _logs(cluster))
    return done.stdout


def _daemon(cluster: Cluster, conf: Path, name: str, *args: str) -> None:
    log = open(cluster.dir / "log" / f"{name}.out", "wb")
    cluster.procs[name] = subprocess.Popen([*args, "-f", "-c", str(conf)], stdout=log, stderr=subprocess.STDOUT,
                                           stdin=subprocess.DEVNULL, start_new_session=True)
    log.close()


def _wait(cluster: Cluster, name: str, ready, what: str) -> None:
    """Poll ready() until it is true; CephStartError naming the daemon, with its log tail, if it exits
    or does not get there within START_TIMEOUT."""
    deadline = time.monotonic() + START_TIMEOUT
    while not ready():
        if cluster.procs[name].poll() is not None:
            raise CephStartError(f"Ceph start-up: {name} exited ({cluster.procs[name].returncode}) before "
                                 f"{what}" + _logs(cluster, name))
        if time.monotonic() > deadline:
            raise CephStartError(f"Ceph start-up: {name} not {what} after {START_TIMEOUT:g} s" + _logs(cluster, name))
        time.sleep(0.2)


def _start_mon(cluster: Cluster, conf: Path, fsid: str, address: str) -> None:
    keyring = str(cluster.dir / "keyring")
    _tool(cluster, conf, "ceph-authtool", "--create-keyring", keyring, "--gen-key", "-n", "mon.", "--cap", "mon",
          "allow *", what="making the monitor keyring")
    _tool(cluster, conf, "ceph-authtool", keyring, "--gen-key", "-n", "client.admin", "--cap", "mon", "allow *",
          "--cap", "osd", "allow *", "--cap", "mgr", "allow *", what="adding client.admin to the keyring")
    monmap = str(cluster.dir / "monmap")
    _tool(cluster, conf, "monmaptool", "--create", "--fsid", fsid, "--addv", "a", address, monmap,
          what="making the monitor map")
    _tool(cluster, conf, "ceph-mon", "--mkfs", "-i", "a", "--monmap", monmap, "--keyring", keyring,
          what="creating the monitor's store")
    _daemon(cluster, conf, "mon.a", "ceph-mon", "-i", "a")
    _wait(cluster, "mon.a", lambda: _out(conf, "ceph", "mon", "stat") is not None, "answering")


def _start_osd(cluster: Cluster, conf: Path) -> None:
    osd_uuid = str(uuid.uuid4())
    osd = _tool(cluster, conf, "ceph", "osd", "new", osd_uuid, what="registering the OSD").strip()
    (cluster.dir / "osd" / f"osd.{osd}").mkdir()
    _tool(cluster, conf, "ceph-osd", "-i", osd, "--mkfs", "--osd-uuid", osd_uuid, what="creating the OSD's store")
    _daemon(cluster, conf, f"osd.{osd}", "ceph-osd", "-i", osd)
    _wait(cluster, f"osd.{osd}", lambda: '"num_up_osds":1' in (_out(conf, "ceph", "osd", "stat", "-f", "json") or ""),
          "up")


def _start_rgw(cluster: Cluster, conf: Path) -> None:
    import urllib.request

    def answers() -> bool:
        try:
            urllib.request.urlopen(cluster.endpoint, timeout=2).close()
            return True
        except OSError:
            return False
    _daemon(cluster, conf, "client.rgw.tests", "radosgw", "-n", "client.rgw.tests")
    _wait(cluster, "client.rgw.tests", answers, f"answering at {cluster.endpoint}")
    _tool(cluster, conf, "radosgw-admin", "-n", "client.rgw.tests", "user", "create", "--uid", "pyckpt-tests",
          "--display-name", "pyckpt tests", "--access-key", ACCESS_KEY, "--secret-key", SECRET_KEY,
          what="creating the S3 user")


def _out(conf: Path, *args: str) -> str | None:
    """A ceph command's output (spaces removed), None if it failed or took over 10 s."""
    try:
        done = subprocess.run([args[0], "-c", str(conf), "--connect-timeout", "5", *args[1:]],
                              capture_output=True, text=True, timeout=10)
    except subprocess.TimeoutExpired:
        return None
    return done.stdout.replace(" ", "") if done.returncode == 0 else None


def _logs(cluster: Cluster, name: str | None = None, lines: int = 30) -> str:
    """The last lines of the daemon's log (every daemon's if none is named)."""
    out = []
    for path in sorted((cluster.dir / "log").iterdir()):
        if name is None or path.name.startswith(name + "."):
            tail = path.read_text(errors="replace").splitlines()[-lines:]
            out.append(f"\n--- {path} (last {len(tail)} lines) ---\n" + "\n".join(tail))
    return "".join(out)


def stop(cluster: Cluster) -> None:
    """Kill the daemons (their data is in memory and thrown away) and remove the directory."""
    for proc in cluster.procs.values():
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
    for proc in cluster.procs.values():
        proc.wait()
    shutil.rmtree(cluster.dir, ignore_errors=True)
