"""`pyckpt doctor`: the spec's troubleshooting list, checked on this host.

Every check is a function of its inputs (config values, command output, a connect function, the
mount table text) and returns a Check, so tests can feed failing cases. `run_doctor` gathers the
real inputs from this host and calls them.
"""
from __future__ import annotations

import errno
import hashlib
import ipaddress
import os
import shutil
import socket
import subprocess
import tempfile
import time
import warnings
from dataclasses import asdict, dataclass, field
from typing import Callable, Mapping, Sequence

from .config import ENV_ALIASES, KNOWN_KEYS, Config, load_config, parse_env_file
from .errors import PyckptError
from .paths import is_s3

PASS, WARN, FAIL, SKIP = "pass", "warn", "fail", "skip"
NFS_TYPES = ("nfs", "nfs4")


@dataclass
class Check:
    name: str
    status: str          # pass | warn | fail | skip
    message: str
    hint: str = ""       # what to do when it is not a pass
    details: dict = field(default_factory=dict)

    def as_dict(self) -> dict:
        return asdict(self)


# ---------------------------------------------------------------------------------------------
# Config
# ---------------------------------------------------------------------------------------------

def check_config(file: str | None, environ: Mapping[str, str]) -> tuple[Check, Config | None]:
    """The config file parses, validates, and the environment does not silently override it.

    Loaded as if CUDA were present: whether the backend fits this hardware is check_backend's job.
    """
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        try:
            config = load_config(file, environ=environ, cuda_available=lambda: True)
        except PyckptError as exc:
            return Check("config", FAIL, str(exc), "fix the value in the config file (or the environment "
                         "variable that overrides it); `pyckpt config validate` shows the resolved config"), None
    notes = [str(w.message) for w in caught]
    source = config.source_file or "built-in defaults"
    overrides = []
    if config.source_file and os.path.exists(config.source_file):
        for key, setting in parse_env_file(config.source_file).items():
            for name in (key, ENV_ALIASES.get(key, key)):
                if key in KNOWN_KEYS and name in environ and environ[name] != setting.value:
                    overrides.append(f"{key}: file {setting.value!r} ({setting.origin}), environment "
                                     f"{'' if name == key else name + '='}{environ[name]!r}")
                    break
    details = {"file": config.source_file, "config": config.as_env()}
    if overrides:
        return Check("config", WARN, f"{source}: the environment overrides the file: " + "; ".join(overrides),
                     "unset those variables or fix the file, so every node runs with the same values",
                     {**details, "overrides": overrides}), config
    if notes:
        return Check("config", WARN, f"{source}: " + "; ".join(notes), "remove or fix those lines",
                     details), config
    return Check("config", PASS, f"{source} is valid and agrees with the environment", details=details), config


# ---------------------------------------------------------------------------------------------
# Network
# ---------------------------------------------------------------------------------------------

Resolver = Callable[[str], Sequence[str]]


def resolve_host(name: str) -> list[str]:
    return sorted({info[4][0] for info in socket.getaddrinfo(name, None, proto=socket.IPPROTO_TCP)})


def _loopback(addresses: Sequence[str]) -> list[str]:
    out = []
    for address in addresses:
        try:
            if ipaddress.ip_address(address).is_loopback:
                out.append(address)
        except ValueError:
            pass
    return out


def check_master_addr(master_addr: str, nodes: int, resolve: Resolver = resolve_host) -> Check:
    """MASTER_ADDR resolves, and not to a loopback address when other nodes must reach it."""
    try:
        addresses = list(resolve(master_addr))
    except (OSError, UnicodeError) as exc:
        return Check("master_addr", FAIL, f"MASTER_ADDR={master_addr} does not resolve ({exc})",
                     "use the master's IP address, or add it to /etc/hosts on every node")
    loop = _loopback(addresses)
    details = {"addresses": addresses}
    if loop and nodes > 1:
        return Check("master_addr", FAIL,
                     f"MASTER_ADDR={master_addr} resolves to loopback {', '.join(loop)} but the job has {nodes} nodes",
                     "other nodes cannot reach a loopback address (127.0.1.1 is Debian's hostname alias and breaks "
                     "gloo): use the master's cluster IP, or fix /etc/hosts so the name maps to it", details)
    return Check("master_addr", PASS, f"MASTER_ADDR={master_addr} resolves to {', '.join(addresses)}",
                 details=details)


def check_hostname(hostname: str, nodes: int, resolve: Resolver = resolve_host) -> Check:
    """This host's own name: gloo picks its interface from it when GLOO_SOCKET_IFNAME is unset."""
    try:
        addresses = list(resolve(hostname))
    except (OSError, UnicodeError) as exc:
        return Check("hostname", WARN, f"this host's name {hostname} does not resolve ({exc})",
                     "add it to /etc/hosts with its cluster address, or set GLOO_SOCKET_IFNAME")
    loop = _loopback(addresses)
    if loop and nodes > 1:
        return Check("hostname", WARN, f"this host's name {hostname} resolves to loopback {', '.join(loop)}",
                     "gloo then advertises a loopback address to the other ranks: map the name to the cluster "
                     "address in /etc/hosts, or set GLOO_SOCKET_IFNAME to the cluster interface",
                     {"addresses": addresses})
    return Check("hostname", PASS, f"{hostname} resolves to {', '.join(addresses)}", details={"addresses": addresses})


def tcp_probe(host: str, port: int, timeout: float = 3.0) -> str:
    """'open', 'refused', 'timeout' or 'error: ...' for a TCP connect."""
    try:
        with socket.create_connection((host, port), timeout=timeout):
            return "open"
    except ConnectionRefusedError:
        return "refused"
    except (socket.timeout, TimeoutError):
        return "timeout"
    except OSError as exc:
        return f"error: {exc.strerror or exc}"


def tcp_bind_probe(host: str, port: int) -> str:
    """'free', 'in use', 'not local' or 'error: ...' for binding host:port on this machine."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    try:
        with socket.socket(family, socket.SOCK_STREAM) as sock:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            sock.bind((host, port))
        return "free"
    except OSError as exc:
        if exc.errno == errno.EADDRINUSE:
            return "in use"
        if exc.errno == errno.EADDRNOTAVAIL:
            return "not local"
        return f"error: {exc.strerror or exc}"


@dataclass(frozen=True)
class ListenPort:
    """Who listens on a port of the master, and the setting that names the port: one check per port."""
    check: str       # the check's name
    listener: str    # who opens the port on the master
    setting: str     # the setting to compare across nodes


MASTER_PORT = ListenPort("master_port", "rank 0", "MASTER_PORT")
# Elastic mode: the master's torchrun hosts the c10d rendezvous store (is_host=true) on its own port.
RDZV_PORT = ListenPort("rdzv_port", "torchrun's elastic agent", "the rendezvous port (rdzv_port)")


def check_master_port(master_addr: str, port: int, is_master: bool, *, expect_listener: bool = False,
                      probe: Callable[[str, int], str] = tcp_probe,
                      bind_probe: Callable[[str, int], str] = tcp_bind_probe,
                      role: ListenPort = MASTER_PORT) -> Check:
    """Workers reach MASTER_ADDR:port; on the master the port is listening or free to listen on."""
    name, who, setting = role.check, role.listener, role.setting
    where = f"{master_addr}:{port}"
    state = probe(master_addr, port)
    if state == "open":
        return Check(name, PASS, f"{where} accepts connections ({who} is listening)")
    if is_master:
        bound = bind_probe(master_addr, port)
        if bound == "free" and not expect_listener:
            return Check(name, PASS, f"{where} is free: {who} can listen on it")
        if bound == "not local":
            return Check(name, FAIL, f"MASTER_ADDR={master_addr} is not an address of this host, "
                         "but this host is node rank 0", "set MASTER_ADDR to this host's cluster address, or "
                         "give the master NODE_RANK=0 and the others 1..N-1")
        if bound == "in use":
            return Check(name, FAIL, f"{where} is taken by a process that does not accept connections",
                         f"find it with `ss -ltnp 'sport = :{port}'` and stop it, or change {setting}")
        if bound == "free":
            return Check(name, FAIL, f"nothing listens on {where} (connection {state})",
                         f"start {who} on the master first; check its log for errors")
        return Check(name, FAIL, f"cannot bind {where}: {bound}", f"check MASTER_ADDR and {setting}")
    if state == "refused":
        status = FAIL if expect_listener else WARN
        return Check(name, status, f"{where} refused the connection: the master is reachable but nothing "
                     "listens there", f"start {who} on the master first (it opens the port); if it runs, check "
                     f"{setting} is the same on every node")
    if state == "timeout":
        return Check(name, FAIL, f"{where} did not answer (timeout): a firewall drops the traffic or "
                     "the host is down", f"allow the cluster subnet in on the master (`ufw allow from <subnet>`), "
                     f"and check `nc -vz {master_addr} {port}` from this node")
    return Check(name, FAIL, f"{where}: {state}", "check the route to the master (`ip route get "
                 f"{master_addr}`) and MASTER_ADDR")


def check_rdzv_port(master_addr: str, port: int, is_master: bool, *, expect_listener: bool = False,
                    probe: Callable[[str, int], str] = tcp_probe,
                    bind_probe: Callable[[str, int], str] = tcp_bind_probe) -> Check:
    """Elastic mode: the c10d rendezvous port on the master, checked like MASTER_PORT."""
    return check_master_port(master_addr, port, is_master, expect_listener=expect_listener, probe=probe,
                             bind_probe=bind_probe, role=RDZV_PORT)


def check_firewall(ufw_status: str | None, subnet: str | None, *, reason: str = "") -> Check:
    """Parse `ufw status`: the cluster subnet must be allowed on every port (gloo uses ephemeral ports)."""
    if ufw_status is None:
        return Check("firewall", SKIP, reason or "ufw is not installed: firewall not checked",
                     "if another firewall runs, allow the cluster subnet on all ports between nodes")
    text = ufw_status.strip()
    if "Status: inactive" in text:
        return Check("firewall", PASS, "ufw is inactive: nothing is filtered")
    if "Status: active" not in text:
        return Check("firewall", SKIP, f"cannot read ufw status: {text.splitlines()[0] if text else 'no output'}",
                     "run the doctor as root to read the firewall rules")
    if not subnet:
        return Check("firewall", WARN, "ufw is active but no cluster subnet was given to compare",
                     "pass --cluster-subnet (the playbook passes cluster_subnet)")
    try:
        wanted = ipaddress.ip_network(subnet, strict=False)
    except ValueError:
        return Check("firewall", FAIL, f"cluster subnet {subnet!r} is not a network", "use CIDR like 192.168.1.0/24")
    ports_only = []
    for line in text.splitlines():
        parts = line.split()
        if "ALLOW" not in parts:
            continue
        at = parts.index("ALLOW")
        target = " ".join(parts[:at]).replace("(v6)", "").strip()
        source = " ".join(p for p in parts[at + 1:] if p not in ("IN", "OUT", "FWD")).replace("(v6)", "").strip()
        if "OUT" in parts[at:at + 2]:
            continue
        covers = source.startswith("Anywhere")
        if not covers:
            try:
                net = ipaddress.ip_network(source.split()[0], strict=False)
                covers = net.version == wanted.version and wanted.subnet_of(net)
            except ValueError:
                covers = False
        if covers and target.startswith("Anywhere"):
            return Check("firewall", PASS, f"ufw allows {subnet} on all ports ({line.strip()})")
        if covers:
            ports_only.append(target)
    if ports_only:
        return Check("firewall", FAIL, f"ufw lets {subnet} in only on {', '.join(sorted(set(ports_only)))}",
                     f"gloo/NCCL connect every rank to every other on ephemeral ports: `ufw allow from {subnet}`",
                     {"ports": sorted(set(ports_only))})
    return Check("firewall", FAIL, f"ufw is active and has no rule allowing {subnet}",
                 f"`ufw allow from {subnet}` on every node (the firewall role does this)")


# ---------------------------------------------------------------------------------------------
# Backend and hardware
# ---------------------------------------------------------------------------------------------

def torch_versions() -> dict:
    try:
        import torch
    except ImportError:
        return {"torch": None, "cuda": None, "nccl": None, "gpus": 0, "cuda_available": False}
    cuda_ok = torch.cuda.is_available()
    nccl = None
    try:
        if torch.distributed.is_available() and torch.distributed.is_nccl_available():
            version = torch.cuda.nccl.version()
            nccl = ".".join(map(str, version)) if isinstance(version, tuple) else str(version)
    except (RuntimeError, AttributeError):
        nccl = None
    return {"torch": torch.__version__, "cuda": torch.version.cuda, "nccl": nccl,
            "gpus": torch.cuda.device_count() if cuda_ok else 0, "cuda_available": cuda_ok}


def check_backend(backend: str, versions: Mapping) -> Check:
    """nccl needs GPUs; report torch/CUDA/NCCL versions so they can be compared across nodes."""
    backend = (backend or "auto").strip().lower()
    summary = (f"torch {versions.get('torch')}, CUDA {versions.get('cuda') or 'none'}, "
               f"NCCL {versions.get('nccl') or 'none'}, {versions.get('gpus', 0)} GPU(s)")
    details = dict(versions)
    if versions.get("torch") is None:
        return Check("backend", FAIL, "torch is not importable here", "install torch into this venv", details)
    gpus = int(versions.get("gpus") or 0)
    if backend == "nccl" and gpus == 0:
        return Check("backend", FAIL, f"BACKEND=nccl but torch sees no GPU ({summary})",
                     "use BACKEND=gloo (CPU) or BACKEND=auto; NCCL only runs on CUDA GPUs", details)
    if backend == "gloo" and gpus > 0:
        return Check("backend", WARN, f"BACKEND=gloo on a host with GPUs ({summary})",
                     "gloo works but NCCL is much faster on GPUs: BACKEND=nccl or auto", details)
    if backend == "auto":
        return Check("backend", PASS, f"BACKEND=auto -> {'nccl' if gpus else 'gloo'} ({summary})", details=details)
    return Check("backend", PASS, f"BACKEND={backend} fits this host ({summary})", details=details)


# ---------------------------------------------------------------------------------------------
# Shared filesystem
# ---------------------------------------------------------------------------------------------

def _unescape(field_text: str) -> str:
    # mountinfo escapes space, tab, newline and backslash as \ooo
    return field_text.encode().decode("unicode_escape") if "\\" in field_text else field_text


def mount_of(path: str, mountinfo: str) -> dict | None:
    """The mount holding `path` (longest mount point prefix) from /proc/self/mountinfo text."""
    best = None
    for line in mountinfo.splitlines():
        left, sep, right = line.partition(" - ")
        if not sep:
            continue
        fields, tail = left.split(), right.split()
        if len(fields) < 5 or len(tail) < 2:
            continue
        point = _unescape(fields[4])
        inside = path == point or path.startswith(point.rstrip("/") + "/") or point == "/"
        if inside and (best is None or len(point) >= len(best["mount_point"])):
            best = {"mount_point": point, "fstype": tail[0], "source": _unescape(tail[1])}
    return best


def check_shared_exists(path: str) -> Check:
    if os.path.isdir(path):
        return Check("shared_path", PASS, f"SHARED_FS_PATH={path} exists")
    if os.path.exists(path):
        return Check("shared_path", FAIL, f"SHARED_FS_PATH={path} is not a directory", "point it at the shared dir")
    return Check("shared_path", FAIL, f"SHARED_FS_PATH={path} does not exist",
                 "SHARED_FS_PATH is the directory holding the snapshots, on the shared filesystem: mount "
                 "that filesystem and create the directory (setup-cluster.yml does), or fix SHARED_FS_PATH")


def check_snapshot_bucket(url: str) -> Check:
    """SNAPSHOT_PATH is an s3:// URL: the bucket answers a HEAD with this process's AWS settings (endpoint,
    region, credentials: the standard AWS_* variables or a profile). No credentials here only warns: the
    training job may get them where the doctor does not (the unit's training_environment, the cluster
    user's ~/.aws)."""
    import boto3
    import botocore.config
    import botocore.exceptions

    from .paths import snapshot_object
    from .s3_store import s3_error

    bucket, _ = snapshot_object(url)
    hint = ("the training job reads the same AWS_* variables (training_environment) or the cluster user's "
            "~/.aws profile: check them there, and run the doctor with them to test the bucket")
    try:
        # Not the store's client: a dead endpoint must not cost its 8 retries of 60 s connects.
        s3 = boto3.session.Session().client("s3", config=botocore.config.Config(
            connect_timeout=5, read_timeout=10, retries={"mode": "standard", "max_attempts": 2}))
        s3.head_bucket(Bucket=bucket)
    except (botocore.exceptions.BotoCoreError, botocore.exceptions.ClientError) as exc:
        if isinstance(exc, botocore.exceptions.ClientError) and exc.response.get("Error", {}).get("Code") == "404":
            # A HEAD answer has no body: botocore names a missing bucket only by its status.
            exc.response["Error"]["Code"] = "NoSuchBucket"
        status = WARN if isinstance(exc, botocore.exceptions.NoCredentialsError) else FAIL
        return Check("snapshot_store", status, f"SNAPSHOT_PATH={url}: {s3_error(exc, bucket, 'a HEAD of the bucket')}",
                     hint)
    return Check("snapshot_store", PASS, f"SNAPSHOT_PATH={url}: bucket {bucket} answers at {s3.meta.endpoint_url}")


def check_fs_type(path: str, mountinfo: str, fs_type: str, is_master: bool, mode: str = "physical",
                  nodes: int = 1) -> Check:
    """Workers of an nfs cluster must see SHARED_FS_PATH through an NFS mount; the master exports it.

    Only physical clusters are held to it: a local container cluster (docker mode) may share the
    directory by bind mount, and the doctor playbook's markers prove the sharing either way.
    SHARED_FS_TYPE=local skips the NFS checks, so it warns where they would matter.
    """
    mount = mount_of(os.path.realpath(path), mountinfo)
    if mount is None:
        return Check("shared_fs_type", WARN, f"no mount found for {path} in the mount table", "check `findmnt -T`")
    found = f"{path} is on {mount['fstype']} ({mount['source']} at {mount['mount_point']})"
    if fs_type != "nfs":
        skipped = ("with SHARED_FS_TYPE=local the doctor skips the NFS checks (the master's export, each "
                   "worker's mount); pyckpt writes the same either way")
        if mount["fstype"] in NFS_TYPES:
            return Check("shared_fs_type", WARN, f"{found}, but SHARED_FS_TYPE={fs_type}",
                         f"set SHARED_FS_TYPE=nfs: {skipped}", mount)
        if mode != "single" and nodes > 1:
            return Check("shared_fs_type", WARN, f"{found}; SHARED_FS_TYPE={fs_type} but DISTRIBUTED_MODE={mode} "
                         f"has {nodes} nodes, which must all see this directory",
                         f"set SHARED_FS_TYPE=nfs (the spec's clusters share /shared over NFS): {skipped}", mount)
        return Check("shared_fs_type", PASS, f"{found}; SHARED_FS_TYPE={fs_type}", details=mount)
    if mode != "physical" and not is_master and mount["fstype"] not in NFS_TYPES:
        return Check("shared_fs_type", PASS, f"{found}; DISTRIBUTED_MODE={mode}: a non-NFS share (e.g. a bind "
                     "mount) is accepted outside physical mode", details=mount)
    if is_master:
        status = WARN if mount["fstype"] in NFS_TYPES else PASS
        return Check("shared_fs_type", status, f"{found}; this host is the master (the NFS server)",
                     "the master should export its local directory, not mount it" if status == WARN else "",
                     mount)
    if mount["fstype"] in NFS_TYPES:
        return Check("shared_fs_type", PASS, found, details=mount)
    return Check("shared_fs_type", FAIL, f"{found}, expected nfs: snapshots written here stay on this node",
                 f"mount the master's export that holds {path}, e.g. `mount -t nfs4 <master>:/shared /shared` "
                 "(setup-cluster.yml does)",
                 mount)


def check_writable(path: str, as_user: str | None = None) -> Check:
    """Create, fsync and remove a file as `as_user` (the cluster user the ranks run as; default: this
    user), what every rank does when it snapshots. Root checks as that user in a child process with
    its uid and groups: root's own write would say nothing under root squashing (root is nobody on the
    share) nor about the training user's permissions. Another unprivileged user cannot be checked as."""
    me = _user()
    user = as_user or me
    if user != me:
        try:
            import pwd

            account = pwd.getpwnam(user)
        except KeyError:
            return Check("shared_writable", FAIL, f"user {user!r} does not exist on this host",
                         "create the cluster user with the same uid on every node (setup-cluster.yml does)")
        if os.geteuid() != 0:
            mine = _write_probe(path)
            return Check("shared_writable", WARN, f"checked as {me}, not as {user}: "
                         + (f"{path} is not writable by {me} ({mine})" if mine else f"{path} is writable by {me}"),
                         f"run the doctor as root to check as {user} (doctor.yml does: become)")
        problem = _probe_as(path, account)
    else:
        problem = _write_probe(path)
    if problem:
        return Check("shared_writable", FAIL, f"{path} is not writable by {user}: {problem}",
                     f"give {user} write access (e.g. `chown -R {user} {path}`), check the export is rw and "
                     "root_squash/all_squash maps users as intended")
    return Check("shared_writable", PASS, f"{path} is writable by {user}")


def _write_probe(path: str) -> str:
    """'' if this process can create, fsync and remove a file in path, else the OS's words."""
    try:
        fd, probe = tempfile.mkstemp(prefix=".pyckpt-doctor-", dir=path)
        try:
            os.write(fd, b"pyckpt doctor\n")
            os.fsync(fd)
        finally:
            os.close(fd)
            os.unlink(probe)
    except OSError as exc:
        return str(exc.strerror or exc)
    return ""


def _probe_as(path: str, account) -> str:
    """_write_probe in a forked child that takes the account's uid, gid and groups (no interpreter to
    start: the cluster user may not be able to run this one); its answer comes back through a pipe."""
    read_end, write_end = os.pipe()
    pid = os.fork()
    if pid == 0:   # the child: only system calls, then _exit
        code = 1
        try:
            os.close(read_end)
            os.setgroups(os.getgrouplist(account.pw_name, account.pw_gid))
            os.setgid(account.pw_gid)
            os.setuid(account.pw_uid)
            problem = _write_probe(path)
            os.write(write_end, problem.encode()[:500])
            code = 0
        finally:
            os._exit(code)
    os.close(write_end)
    with os.fdopen(read_end, "rb") as answer:
        problem = answer.read().decode(errors="replace")
    _, status = os.waitpid(pid, 0)
    return problem if os.waitstatus_to_exitcode(status) == 0 else f"could not check as {account.pw_name}"


def _user() -> str:
    try:
        import pwd

        return pwd.getpwuid(os.geteuid()).pw_name
    except (ImportError, KeyError):
        return f"uid {os.geteuid()}"


def check_free_space(path: str, free_bytes: int, last_snapshot_bytes: int) -> Check:
    """A new version is written before old ones are dropped: it needs the size of the last one."""
    details = {"free_bytes": free_bytes, "last_snapshot_bytes": last_snapshot_bytes}
    free, last = _human(free_bytes), _human(last_snapshot_bytes)
    if last_snapshot_bytes == 0:
        return Check("free_space", PASS, f"{free} free on {path} (no snapshot yet to compare)", details=details)
    if free_bytes < last_snapshot_bytes:
        return Check("free_space", FAIL, f"{free} free on {path}, the last snapshot took {last}",
                     "free space or lower keep_last: the next snapshot will fail with ENOSPC", details)
    if free_bytes < 2 * last_snapshot_bytes:
        return Check("free_space", WARN, f"{free} free on {path}: room for one more snapshot of {last}",
                     "free space soon, or `pyckpt gc <snapshot dir> --keep 1`", details)
    return Check("free_space", PASS, f"{free} free on {path}, last snapshot {last}", details=details)


def _human(n: int) -> str:
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(n) < 1024 or unit == "TiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return str(n)


Runner = Callable[[list[str]], "tuple[int, str] | None"]


def run_tool(argv: list[str], timeout: float = 10.0) -> tuple[int, str] | None:
    """(returncode, output) of a command, or None when the tool is not installed."""
    if shutil.which(argv[0]) is None:
        return None
    try:
        done = subprocess.run(argv, capture_output=True, text=True, timeout=timeout, check=False)
    except subprocess.TimeoutExpired:
        return 124, f"{' '.join(argv)} timed out after {timeout:g}s"
    return done.returncode, (done.stdout + done.stderr).strip()


def _inside(path: str, directory: str) -> bool:
    path, directory = path.rstrip("/") or "/", directory.rstrip("/") or "/"
    return path == directory or path.startswith(directory.rstrip("/") + "/")


def check_nfs_export(master_addr: str, path: str, fs_type: str, is_master: bool, run: Runner = run_tool) -> Check:
    """From a worker: the master's NFS server answers and (v3 showmount) lists the export."""
    if fs_type != "nfs":
        return Check("nfs_export", SKIP, f"SHARED_FS_TYPE={fs_type}: no NFS export expected")
    if is_master:
        return Check("nfs_export", SKIP, "this host is the master (the NFS server); workers check the export")
    shown = run(["showmount", "-e", "--no-headers", master_addr])
    if shown is not None:
        rc, out = shown
        exports = [line.split()[0] for line in out.splitlines() if line.strip() and rc == 0]
        # SHARED_FS_PATH is the snapshot directory: the export is it or a directory above it (/shared).
        holding = [e for e in exports if _inside(path, e)]
        if rc == 0 and holding:
            return Check("nfs_export", PASS, f"{master_addr} exports {holding[0]}, which holds {path}",
                         details={"exports": exports})
        if rc == 0:
            return Check("nfs_export", FAIL, f"{master_addr} exports {', '.join(exports) or 'nothing'}, "
                         f"none of which holds {path}",
                         f"export {path} or a directory above it (e.g. /shared) in /etc/exports on the master "
                         "and run `exportfs -ra`", {"exports": exports})
        # NFSv4-only servers (e.g. ganesha without mountd) do not answer showmount: ask rpcbind instead.
    probe = run(["rpcinfo", "-T", "tcp", master_addr, "nfs", "4"])
    if probe is not None:
        rc, out = probe
        if rc == 0:
            return Check("nfs_export", PASS, f"{master_addr} answers NFSv4 over TCP ({(out.splitlines() or [''])[-1]})")
        last = out.splitlines()[-1] if out else f"rc {rc}"
        return Check("nfs_export", FAIL, f"no NFS server answers on {master_addr}: {last}",
                     "start the NFS server on the master and allow ports 111 and 2049 from the cluster subnet")
    if shown is not None:
        return Check("nfs_export", FAIL, f"showmount -e {master_addr} failed: {shown[1][:200]}",
                     "start the NFS server (and rpcbind) on the master; allow 111/2049 from the cluster subnet")
    return Check("nfs_export", SKIP, "neither showmount nor rpcinfo is installed",
                 "install nfs-common (showmount) or rpcbind (rpcinfo) to check the export from this node")


# ---------------------------------------------------------------------------------------------
# The whole run on this host
# ---------------------------------------------------------------------------------------------

def file_sha256(path: str | None) -> str | None:
    if not path or not os.path.isfile(path):
        return None
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def _read(path: str) -> str:
    try:
        with open(path, encoding="utf-8", errors="replace") as f:
            return f.read()
    except OSError:
        return ""


def run_doctor(file: str | None = None, *, environ: Mapping[str, str] | None = None,
               cluster_subnet: str | None = None, expect_listener: bool = False,
               port_timeout: float = 3.0, share_user: str | None = None,
               rdzv_port: int | None = None) -> tuple[list[Check], dict]:
    """Run every check on this host; returns the checks and the facts compared across the cluster.
    share_user: who must be able to write the share (the cluster user); default: this user.
    rdzv_port: elastic mode's c10d rendezvous port on MASTER_ADDR, checked like MASTER_PORT (none: not checked)."""
    environ = os.environ if environ is None else environ
    checks: list[Check] = []
    config_check, config = check_config(file, environ)
    checks.append(config_check)
    versions = torch_versions()
    facts = {"hostname": socket.gethostname(), "time": time.time(), "config_file": None, "config_sha256": None,
             "shared_fs_path": None, "node_rank": None, **versions}
    if config is None:
        return checks, facts
    facts.update(config_file=config.source_file, config_sha256=file_sha256(config.source_file),
                 shared_fs_path=config.shared_fs_path, node_rank=config.node_rank,
                 master_addr=config.master_addr, master_port=config.master_port)
    is_master = config.node_rank == 0
    nodes = config.physical_nodes
    checks.append(check_master_addr(config.master_addr, nodes))
    checks.append(check_hostname(socket.gethostname(), nodes))
    if rdzv_port is not None:
        # torchrun's elastic agent gives the workers rank 0's address and a port it picks at every start:
        # MASTER_PORT is not used, and would only show "refused" on the workers.
        checks.append(Check("master_port", SKIP, f"elastic mode: the rendezvous port {rdzv_port} is checked instead "
                            "(torchrun picks the workers' port at every start)"))
    elif config.world_size > 1 or config.mode != "single":
        checks.append(check_master_port(config.master_addr, config.master_port, is_master,
                                        expect_listener=expect_listener,
                                        probe=lambda h, p: tcp_probe(h, p, port_timeout)))
    else:
        checks.append(Check("master_port", SKIP, "single process: no rendezvous port needed"))
    if rdzv_port is not None:
        checks.append(check_rdzv_port(config.master_addr, rdzv_port, is_master, expect_listener=expect_listener,
                                      probe=lambda h, p: tcp_probe(h, p, port_timeout)))
    ufw = run_tool(["ufw", "status"])
    checks.append(check_firewall(None if ufw is None else ufw[1], cluster_subnet))
    checks.append(check_backend(configured_backend(config, environ), versions))
    checks.extend(storage_checks(config, is_master, share_user))
    return checks, facts


def storage_checks(config: Config, is_master: bool, share_user: str | None) -> list[Check]:
    """Where the snapshots go: the shared directory and its NFS export, or with an s3:// SNAPSHOT_PATH the
    bucket (the shared directory's checks then say nothing about the snapshots, and are skipped)."""
    from .inspect import newest_complete_bytes

    shared = config.shared_fs_path
    if is_s3(config.snapshot_path):
        why = f"SNAPSHOT_PATH={config.snapshot_path}: the snapshots are in S3, not in SHARED_FS_PATH={shared}"
        return [*(Check(name, SKIP, why) for name in
                  ("shared_path", "shared_fs_type", "shared_writable", "free_space", "nfs_export")),
                check_snapshot_bucket(config.snapshot_path)]
    checks = [check_shared_exists(shared)]
    if checks[0].status == PASS:
        checks.append(check_fs_type(shared, _read("/proc/self/mountinfo"), config.shared_fs_type, is_master,
                                    config.mode, config.physical_nodes))
        checks.append(check_writable(shared, share_user))
        try:
            last = newest_complete_bytes(config.snapshot_dir)
        except (PyckptError, OSError):
            last = 0
        checks.append(check_free_space(shared, shutil.disk_usage(shared).free, last))
    else:
        checks.extend(Check(name, SKIP, f"{shared} does not exist")
                      for name in ("shared_fs_type", "shared_writable", "free_space"))
    checks.append(check_nfs_export(config.master_addr, shared, config.shared_fs_type, is_master))
    return checks


def configured_backend(config: Config, environ: Mapping[str, str]) -> str:
    """BACKEND as written (auto/nccl/gloo), before load_config resolves it against this hardware."""
    if environ.get("BACKEND"):
        return environ["BACKEND"]
    if config.source_file and os.path.isfile(config.source_file):
        setting = parse_env_file(config.source_file).get("BACKEND")
        if setting is not None:
            return setting.value
    return "auto"


def exit_code(checks: Sequence[Check]) -> int:
    return 1 if any(c.status == FAIL for c in checks) else 0
