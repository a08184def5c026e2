"""Cluster configuration: `config/distributed.<mode>.env` + environment + torchrun, validated.

Precedence (lowest to highest): built-in defaults < config file < environment. torchrun exports
RANK, LOCAL_RANK, WORLD_SIZE, LOCAL_WORLD_SIZE, MASTER_ADDR and MASTER_PORT into the environment,
so its values win over the file the same way.

SNAPSHOT_PATH (the full snapshot path, a filesystem path or an s3:// URL) is read from the environment
under its own name or as PYCKPT_SNAPSHOT_PATH, the name the training unit sets for any training script:
one setting, two spellings. Both set to different values is an error; unset, it is
SHARED_FS_PATH/checkpoint.bin.
"""
from __future__ import annotations

import ipaddress
import os
import re
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Mapping

from .errors import ConfigError, SnapshotPathError
from .paths import check_file_path, is_s3, snapshot_object

MODES = ("single", "docker", "physical")
CLUSTER_MODES = ("docker", "physical")
BACKENDS = ("nccl", "gloo", "auto")
FS_TYPES = ("local", "nfs")

DEFAULTS: dict[str, str] = {
    "DISTRIBUTED_MODE": "single",
    "MASTER_ADDR": "127.0.0.1",
    "MASTER_PORT": "29500",
    "BACKEND": "auto",
    "SHARED_FS_PATH": "/shared/snapshots",
    "SHARED_FS_TYPE": "local",
    "NODE_RANK": "0",
    "NPROC_PER_NODE": "1",
    "INIT_TIMEOUT_S": "300",
}
# The spec's keys plus the two knobs a multi-process node needs, and where the snapshots go.
KNOWN_KEYS = frozenset(DEFAULTS) | {"WORLD_SIZE", "PHYSICAL_NODES", "SNAPSHOT_PATH"}
# Other environment spellings of a key (the training unit exports PYCKPT_SNAPSHOT_PATH).
ENV_ALIASES = {"SNAPSHOT_PATH": "PYCKPT_SNAPSHOT_PATH"}
SNAPSHOT_NAME = "checkpoint.bin"   # the snapshot path's name in SHARED_FS_PATH when SNAPSHOT_PATH is unset
# Set by torchrun for every worker process.
TORCHRUN_KEYS = ("RANK", "LOCAL_RANK", "WORLD_SIZE", "LOCAL_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")
# Lines for torch/NCCL/gloo themselves, exported to the process environment by the coordinator.
PASSTHROUGH_PREFIXES = ("NCCL_", "GLOO_", "TORCH_", "OMP_", "CUDA_")


@dataclass(frozen=True)
class Setting:
    value: str
    origin: str  # "path:line", "environment", "torchrun" or "default"


@dataclass(frozen=True)
class Config:
    """A validated, immutable cluster configuration for this process."""

    mode: str
    world_size: int
    rank: int
    local_rank: int
    node_rank: int
    nproc_per_node: int
    physical_nodes: int  # the node count (PHYSICAL_NODES may also list the nodes' addresses)
    master_addr: str
    master_port: int
    backend: str  # resolved: "nccl" or "gloo"
    shared_fs_path: str
    shared_fs_type: str
    init_timeout_s: float
    launched_by_torchrun: bool = False
    source_file: str | None = None
    passthrough: tuple[tuple[str, str], ...] = ()
    origins: tuple[tuple[str, str], ...] = field(default=(), repr=False)
    node_addrs: tuple[str, ...] = ()  # PHYSICAL_NODES as the spec writes it: master first
    snapshot_path_setting: str | None = None  # SNAPSHOT_PATH as set (file or environment), validated

    @property
    def is_distributed(self) -> bool:
        return self.world_size > 1

    @property
    def snapshot_dir(self) -> str:
        """SHARED_FS_PATH is the directory holding the snapshots (the spec's /shared/snapshots)."""
        return self.shared_fs_path

    @property
    def snapshot_path(self) -> str:
        """Where train.py snapshots: SNAPSHOT_PATH (a path or an s3:// URL), else SHARED_FS_PATH/checkpoint.bin."""
        return self.snapshot_path_setting or os.path.join(self.shared_fs_path, SNAPSHOT_NAME)

    def origin(self, key: str) -> str:
        return dict(self.origins).get(key, "default")

    def as_env(self) -> dict[str, str]:
        """The file-format view of this config (what `pyckpt config validate` prints)."""
        return {
            "DISTRIBUTED_MODE": self.mode,
            "WORLD_SIZE": str(self.world_size),
            "MASTER_ADDR": self.master_addr,
            "MASTER_PORT": str(self.master_port),
            "BACKEND": self.backend,
            "SHARED_FS_PATH": self.shared_fs_path,
            "SHARED_FS_TYPE": self.shared_fs_type,
            "SNAPSHOT_PATH": self.snapshot_path,
            "PHYSICAL_NODES": ",".join(self.node_addrs) or str(self.physical_nodes),
            "NODE_RANK": str(self.node_rank),
            "NPROC_PER_NODE": str(self.nproc_per_node),
            "RANK": str(self.rank),
            "LOCAL_RANK": str(self.local_rank),
            **dict(self.passthrough),
        }


def parse_env_file(path: str | os.PathLike) -> dict[str, Setting]:
    """Parse KEY=VALUE lines (`#` comments, optional `export `, optional quotes)."""
    path = str(path)
    try:
        text = Path(path).read_text(encoding="utf-8")
    except UnicodeDecodeError as exc:
        raise ConfigError(f"{path}: not UTF-8 text ({exc}); the config file must be a KEY=VALUE text file") from None
    except OSError as exc:  # a directory, no permission...
        raise ConfigError(f"{path}: cannot read the config file ({exc.strerror}); it must be a readable "
                          "KEY=VALUE text file") from None
    settings: dict[str, Setting] = {}
    for lineno, raw in enumerate(text.splitlines(), start=1):
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        if line.startswith("export "):
            line = line[len("export "):].lstrip()
        key, sep, value = line.partition("=")
        key = key.strip()
        if not sep or not key.isidentifier():
            raise ConfigError(
                f"{path}:{lineno}: cannot parse {raw.strip()!r}; expected KEY=VALUE, e.g. MASTER_PORT=29500"
            )
        value = _unquote(value.strip(), f"{path}:{lineno}")
        if key in settings:
            warnings.warn(f"{path}:{lineno}: {key} repeats {settings[key].origin}; the later line wins", stacklevel=3)
        settings[key] = Setting(value, f"{path}:{lineno}")
    return settings


def _unquote(value: str, where: str) -> str:
    if value[:1] in ("'", '"'):
        quote = value[0]
        end = value.find(quote, 1)
        if end < 0:
            raise ConfigError(f"{where}: unterminated quote in value {value!r}; close it with {quote}")
        return value[1:end]
    # An unquoted value ends at an inline comment.
    hash_at = value.find(" #")
    return value[:hash_at].rstrip() if hash_at >= 0 else value


def find_config_file(mode: str | None, config_dir: str | os.PathLike, environ: Mapping[str, str]) -> str | None:
    """PYCKPT_CONFIG, else config/distributed.<mode>.env, else the active config/distributed.env, else
    the one cluster file (docker/physical) in config_dir, else config/distributed.single.env if present.

    A node told its rank (NODE_RANK) never falls back to single mode in silence: with no cluster file,
    or with several and no way to choose, this raises a ConfigError that says how to choose."""
    if environ.get("PYCKPT_CONFIG"):
        return environ["PYCKPT_CONFIG"]
    config_dir = Path(config_dir)
    if mode:
        candidate = config_dir / f"distributed.{mode}.env"
        if candidate.exists() or mode != "single":
            return str(candidate)
        return None  # single mode runs on built-in defaults
    active = config_dir / "distributed.env"
    if active.exists():
        return str(active)
    cluster = [config_dir / f"distributed.{m}.env" for m in CLUSTER_MODES]
    cluster = [str(p) for p in cluster if p.exists()]
    how = (f"choose with DISTRIBUTED_MODE=<mode> (reads {config_dir}/distributed.<mode>.env), "
           f"PYCKPT_CONFIG=<file>, or a link: ln -s distributed.<mode>.env {config_dir}/distributed.env")
    if len(cluster) > 1:
        raise ConfigError(f"no mode is chosen and {config_dir}/ holds several cluster config files: "
                          f"{', '.join(cluster)}; {how}")
    if cluster:
        return cluster[0]
    if "NODE_RANK" in environ and not launched_by_torchrun(environ):
        raise ConfigError(
            f"NODE_RANK={environ['NODE_RANK']!r} (environment) but no mode is chosen and {config_dir}/ has no "
            f"cluster config file (distributed.physical.env or distributed.docker.env), so this node would "
            f"train alone at world size 1; write {config_dir}/distributed.physical.env (or run "
            f"`ansible-playbook setup-cluster.yml`), or {how}; for one machine unset NODE_RANK")
    single = config_dir / "distributed.single.env"
    return str(single) if single.exists() else None


def launched_by_torchrun(environ: Mapping[str, str]) -> bool:
    return "TORCHELASTIC_RUN_ID" in environ or ("LOCAL_WORLD_SIZE" in environ and "RANK" in environ)


def load_config(
    path: str | os.PathLike | None = None,
    *,
    mode: str | None = None,
    config_dir: str | os.PathLike | None = None,
    environ: Mapping[str, str] | None = None,
    cuda_available: Callable[[], bool] | None = None,
) -> Config:
    """Read the config file and the environment and return a validated Config.

    Raises ConfigError naming the key, its value, where it came from (file:line or the
    environment), what is allowed and how to fix it.
    """
    environ = os.environ if environ is None else environ
    mode = mode or environ.get("DISTRIBUTED_MODE") or None
    if config_dir is None:
        config_dir = environ.get("PYCKPT_CONFIG_DIR", "config")
    file = str(path) if path is not None else find_config_file(mode, config_dir, environ)

    merged: dict[str, Setting] = {k: Setting(v, "default") for k, v in DEFAULTS.items()}
    passthrough: dict[str, str] = {}
    if file is not None:
        if not os.path.exists(file):
            raise ConfigError(
                f"config file {file} does not exist (DISTRIBUTED_MODE={mode}); run `ansible-playbook "
                f"setup-cluster.yml` to render it, point PYCKPT_CONFIG at it, or use DISTRIBUTED_MODE=single"
            )
        for key, setting in parse_env_file(file).items():
            if key in KNOWN_KEYS:
                merged[key] = setting
            elif key.startswith(PASSTHROUGH_PREFIXES):
                passthrough[key] = setting.value
            else:
                warnings.warn(
                    f"{setting.origin}: unknown key {key} ignored; known keys: {', '.join(sorted(KNOWN_KEYS))}",
                    stacklevel=2,
                )
    torchrun = launched_by_torchrun(environ)
    for key in KNOWN_KEYS | {"RANK", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "GROUP_RANK", "GROUP_WORLD_SIZE"}:
        if key in environ and (torchrun or key != "GROUP_WORLD_SIZE"):
            origin = "torchrun" if torchrun and key in TORCHRUN_KEYS + ("GROUP_RANK", "GROUP_WORLD_SIZE") else "environment"
            merged[key] = Setting(environ[key], origin)
    for key, alias in ENV_ALIASES.items():
        if alias in environ:
            if key in environ and environ[key] != environ[alias]:
                raise ConfigError(
                    f"environment variables {key}={environ[key]!r} and {alias}={environ[alias]!r} disagree; "
                    f"they are one setting ({alias} is the name the training unit sets): unset one or make them equal")
            merged[key] = Setting(environ[alias], f"environment ({alias})")
    if mode is not None and merged["DISTRIBUTED_MODE"].value != mode:
        merged["DISTRIBUTED_MODE"] = Setting(mode, "argument")
    return _validate(merged, file, torchrun, passthrough, cuda_available)


def _where(setting: Setting) -> str:
    if setting.origin in ("environment", "torchrun"):
        return f"{setting.origin} variable"
    if setting.origin.startswith("environment ("):   # an alias: environment variable PYCKPT_SNAPSHOT_PATH
        return f"environment variable {setting.origin[len('environment ('):-1]}"
    return setting.origin


def _fail(key: str, setting: Setting, problem: str, fix: str) -> ConfigError:
    return ConfigError(f"{_where(setting)}: {key}={setting.value!r} {problem}; {fix}")


def _int(merged: dict[str, Setting], key: str, low: int, high: int | None = None, example: str = "") -> int:
    setting = merged[key]
    allowed = f"an integer >= {low}" if high is None else f"an integer {low}-{high}"
    try:
        number = int(setting.value)
    except ValueError:
        raise _fail(key, setting, "is not a number", f"use {allowed}{example}") from None
    if number < low or (high is not None and number > high):
        raise _fail(key, setting, "is out of range", f"use {allowed}{example}")
    return number


def _choice(merged: dict[str, Setting], key: str, allowed: tuple[str, ...]) -> str:
    setting = merged[key]
    value = setting.value.strip().lower()
    if value not in allowed:
        raise _fail(key, setting, "is not allowed", f"use one of {', '.join(allowed)}")
    return value


def _validate(merged, file, torchrun, passthrough, cuda_available) -> Config:
    mode = _choice(merged, "DISTRIBUTED_MODE", MODES)
    fs_type = _choice(merged, "SHARED_FS_TYPE", FS_TYPES)
    backend_setting = merged["BACKEND"]
    backend = _choice(merged, "BACKEND", BACKENDS)
    port = _int(merged, "MASTER_PORT", 1, 65535, " (e.g. MASTER_PORT=29500)")
    try:
        timeout = float(merged["INIT_TIMEOUT_S"].value)
        if not 0 < timeout < float("inf"):  # also refuses nan
            raise ValueError
    except ValueError:
        raise _fail("INIT_TIMEOUT_S", merged["INIT_TIMEOUT_S"], "is not a positive number of seconds",
                    "use e.g. INIT_TIMEOUT_S=300") from None
    master_addr = merged["MASTER_ADDR"].value.strip()
    if not _is_address(master_addr):
        raise _fail("MASTER_ADDR", merged["MASTER_ADDR"], "is not a host name or address",
                    "use the master node's address, e.g. MASTER_ADDR=192.168.1.100")
    layout = _layout(merged, mode, master_addr)
    world, nodes = layout["world"], layout["nodes"]
    if mode == "physical" and nodes > 1 and _is_loopback(master_addr):
        raise _fail("MASTER_ADDR", merged["MASTER_ADDR"], f"is a loopback address but PHYSICAL_NODES={nodes}",
                    "use the master's cluster address that every node can reach")

    if backend == "auto":
        backend = "nccl" if _cuda(cuda_available) else "gloo"
    elif backend == "nccl" and not _cuda(cuda_available):
        raise _fail("BACKEND", backend_setting, "needs CUDA GPUs but torch sees none on this machine",
                    "use BACKEND=gloo (CPU) or BACKEND=auto")

    shared = merged["SHARED_FS_PATH"].value.strip()
    if not shared:
        raise _fail("SHARED_FS_PATH", merged["SHARED_FS_PATH"], "is empty",
                    "use the directory that holds the snapshots, e.g. /shared/snapshots")
    snapshot_path = _snapshot_path(merged["SNAPSHOT_PATH"]) if "SNAPSHOT_PATH" in merged else None

    return Config(
        mode=mode, world_size=world, rank=layout["rank"], local_rank=layout["local_rank"],
        node_rank=layout["node_rank"], nproc_per_node=layout["nproc"], physical_nodes=nodes,
        master_addr=master_addr, master_port=port, backend=backend, shared_fs_path=shared,
        shared_fs_type=fs_type, init_timeout_s=timeout, launched_by_torchrun=torchrun, source_file=file,
        passthrough=tuple(sorted(passthrough.items())),
        origins=tuple(sorted((k, s.origin) for k, s in merged.items())), node_addrs=layout["addrs"],
        snapshot_path_setting=snapshot_path,
    )


def _snapshot_path(setting: Setting) -> str | None:
    """SNAPSHOT_PATH: an absolute filesystem path or s3://BUCKET/KEY (checked as the S3 store checks it);
    empty means unset (SHARED_FS_PATH/checkpoint.bin)."""
    value = setting.value.strip()
    example = "e.g. SNAPSHOT_PATH=/shared/snapshots/checkpoint.bin or s3://bucket/run1/checkpoint.bin"
    if not value:
        return None
    try:
        if is_s3(value):
            snapshot_object(value)   # the S3 store's own check: a bucket and an object key
            return value
        if "://" in value:
            raise SnapshotPathError(f"the scheme {value.split('://')[0]}:// is not a store pyckpt has")
        if not os.path.isabs(value):
            raise SnapshotPathError("a relative path: each process would resolve it against its own working "
                                    "directory")
        check_file_path(value)   # the POSIX store's own check: the path names a file
    except SnapshotPathError as exc:
        raise _fail("SNAPSHOT_PATH", setting, f"is not a snapshot path ({exc})",
                    f"use an absolute path or an s3://BUCKET/KEY URL, {example}") from None
    return value


def _layout(merged: dict[str, Setting], mode: str, master_addr: str) -> dict:
    """World size, node count and this process's ranks, checked against each other."""
    node_key = "GROUP_RANK" if "GROUP_RANK" in merged else "NODE_RANK"
    node_rank = _int(merged, node_key, 0)
    local_rank = _int(merged, "LOCAL_RANK", 0) if "LOCAL_RANK" in merged else 0
    nproc_key = "LOCAL_WORLD_SIZE" if "LOCAL_WORLD_SIZE" in merged else "NPROC_PER_NODE"
    nproc = _int(merged, nproc_key, 1)
    addrs: tuple[str, ...] = ()
    if "WORLD_SIZE" in merged:
        world = _int(merged, "WORLD_SIZE", 1)
    if "PHYSICAL_NODES" in merged:
        nodes, addrs = _physical_nodes(merged["PHYSICAL_NODES"])
    if "WORLD_SIZE" not in merged:
        world = (nodes if "PHYSICAL_NODES" in merged else 1) * nproc
        merged["WORLD_SIZE"] = Setting(str(world), "derived from PHYSICAL_NODES x NPROC_PER_NODE")
    if "GROUP_WORLD_SIZE" in merged and "PHYSICAL_NODES" in merged and _int(merged, "GROUP_WORLD_SIZE", 1) != nodes:
        # torchrun's elastic rendezvous (--nnodes=MIN:MAX) decides how many nodes this run has; the
        # config file's PHYSICAL_NODES is the planned maximum.
        planned = merged["PHYSICAL_NODES"]
        nodes, addrs = int(merged["GROUP_WORLD_SIZE"].value), ()
        merged["PHYSICAL_NODES"] = Setting(str(nodes), f"torchrun variable GROUP_WORLD_SIZE (the rendezvous; "
                                                         f"{_where(planned)} plans {planned.value})")
    if "PHYSICAL_NODES" not in merged:
        nodes = max(1, world // nproc)
        merged["PHYSICAL_NODES"] = Setting(str(nodes), "derived from WORLD_SIZE / NPROC_PER_NODE")
    counted = f" listing {nodes} nodes" if addrs else f"={nodes}"

    if mode == "single" and nodes != 1:
        raise _fail("PHYSICAL_NODES", merged["PHYSICAL_NODES"], "but DISTRIBUTED_MODE=single means one machine",
                    "set PHYSICAL_NODES=1, or DISTRIBUTED_MODE=docker/physical for several machines")
    if world != nodes * nproc:
        raise _fail(
            "WORLD_SIZE", merged["WORLD_SIZE"],
            f"disagrees with PHYSICAL_NODES{counted} ({_where(merged['PHYSICAL_NODES'])}) x "
            f"processes per node {nproc} ({_where(merged[nproc_key])})",
            f"set WORLD_SIZE={nodes * nproc} or fix PHYSICAL_NODES/NPROC_PER_NODE",
        )
    if mode == "single" and node_rank > 0:
        raise _fail(node_key, merged[node_key], "but DISTRIBUTED_MODE=single runs one node (rank 0)",
                    "for several machines set DISTRIBUTED_MODE=physical (config/distributed.physical.env), "
                    "for one machine unset NODE_RANK")
    if node_rank >= nodes:
        raise _fail(node_key, merged[node_key], f"must be below PHYSICAL_NODES{counted} (and WORLD_SIZE={world})",
                    f"number the nodes 0..{nodes - 1}: the master is 0")
    if local_rank >= nproc:
        raise _fail("LOCAL_RANK", merged["LOCAL_RANK"], f"must be below {nproc_key}={nproc}",
                    f"use LOCAL_RANK 0..{nproc - 1}")
    if "RANK" in merged:
        rank = _int(merged, "RANK", 0)
        if rank >= world:
            raise _fail("RANK", merged["RANK"], f"must be below WORLD_SIZE={world}", f"use RANK 0..{world - 1}")
    else:
        rank = node_rank * nproc + local_rank
    # torchrun's --master_addr is what the job rendezvouses on; otherwise the list must start at the master.
    if addrs and merged["MASTER_ADDR"].origin != "torchrun" and not _same_host(addrs[0], master_addr):
        raise _fail("PHYSICAL_NODES", merged["PHYSICAL_NODES"],
                    f"starts with {addrs[0]} but MASTER_ADDR={master_addr} ({_where(merged['MASTER_ADDR'])})",
                    "list the master (node rank 0) first, spelled as in MASTER_ADDR, or fix MASTER_ADDR")
    return {"world": world, "nodes": nodes, "addrs": addrs, "node_rank": node_rank, "local_rank": local_rank,
            "nproc": nproc, "rank": rank}


def _physical_nodes(setting: Setting) -> tuple[int, tuple[str, ...]]:
    """PHYSICAL_NODES is a node count (4) or, as the spec writes it, the nodes' addresses, master first
    (192.168.1.100,192.168.1.101,...): then its length is the count."""
    value = setting.value.strip()
    example = "use a node count (PHYSICAL_NODES=4) or the nodes' addresses, master first " \
              "(PHYSICAL_NODES=192.168.1.100,192.168.1.101)"
    if re.fullmatch(r"[+-]?\d+", value):
        count = int(value)
        if count < 1:
            raise _fail("PHYSICAL_NODES", setting, "is out of range", example)
        return count, ()
    addrs = tuple(entry.strip() for entry in value.split(","))
    for entry in addrs:
        if not _is_address(entry) or re.fullmatch(r"[\d.]+", entry) and not _is_ip(entry):
            raise _fail("PHYSICAL_NODES", setting, f"has {entry!r}, which is not a host name or address", example)
    seen = [a.lower() for a in addrs]
    duplicates = sorted({a for a in seen if seen.count(a) > 1})
    if duplicates:
        raise _fail("PHYSICAL_NODES", setting, f"lists {', '.join(duplicates)} more than once",
                    "list each node once (one entry per machine; NPROC_PER_NODE sets the processes per node)")
    return len(addrs), addrs


def _same_host(a: str, b: str) -> bool:
    if _is_ip(a) and _is_ip(b):
        return ipaddress.ip_address(a) == ipaddress.ip_address(b)
    return a.lower().rstrip(".") == b.lower().rstrip(".")


def _is_ip(addr: str) -> bool:
    try:
        ipaddress.ip_address(addr)
        return True
    except ValueError:
        return False


_HOSTNAME = re.compile(r"^(?=.{1,253}$)([A-Za-z0-9]([A-Za-z0-9-]{0,61}[A-Za-z0-9])?)(\.[A-Za-z0-9]([A-Za-z0-9-]{0,61}[A-Za-z0-9])?)*\.?$")


def _is_address(addr: str) -> bool:
    """An IPv4/IPv6 address or an RFC 1123 host name."""
    try:
        ipaddress.ip_address(addr)
        return True
    except ValueError:
        return _HOSTNAME.match(addr) is not None


def _is_loopback(addr: str) -> bool:
    if addr == "localhost":
        return True
    try:
        return ipaddress.ip_address(addr).is_loopback
    except ValueError:
        return False


def _cuda(cuda_available: Callable[[], bool] | None) -> bool:
    if cuda_available is not None:
        return cuda_available()
    import torch

    return torch.cuda.is_available()
