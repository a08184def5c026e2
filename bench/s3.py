"""pyckpt against DCP (fsspec/s3fs) and the server's own limit, on S3, against a local moto server or Ceph RGW.

    python -m bench.s3 --size-gib 0.5 --ranks 1,2 --repeat 3 --out s3.json
    python -m bench.s3 --server ceph --size-gib 0.5 --ranks 1,2 --repeat 3 --out s3-ceph.json
    python -m bench.s3 --quick --out quick.json        # 32 MiB, ranks 1,2, 1 run: end to end, for CI

The bench starts moto's standalone S3 server in its own process (bench/s3server.py) and, for each
rank count N of --ranks, N gloo ranks with the same replicated (DDP) state (bench/state.py's large
state, --size-gib in all). On it, each round: the server's limit with pyckpt's client (boto3): each
rank uploads its 1/N of the state's bytes with s3transfer's multipart upload (pyckpt's part size and
parts in flight), then downloads them with parallel ranged GETs into a buffer; pyckpt's snapshot
(blocking, then async: the stall and the time until committed) and restore to s3://; DCP's save (1
and 4 writer threads) and load through FsspecWriter/FsspecReader (s3fs). Medians of --repeat, the
slowest rank's; every restore checked bit-exact. docs/PERFORMANCE.md ("S3") explains the figures.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import sys
import subprocess
import tempfile
import time
from dataclasses import dataclass, field
from datetime import datetime, timezone
from typing import Callable

import torch

from . import s3_report as report
from . import s3server
from .checkpoint import Results, _command, free_port, log
from .sharded import run_job

GIB = 1 << 30
BUCKET = "pyckpt-bench"


@dataclass
class Server:
    name: str                 # and version
    url: str
    pids: list[int]           # the processes whose CPU is the server's
    stop: Callable[[], None]
    collect: list[str] = field(default_factory=list)   # a command that frees deleted objects' space now


def run_world(world: int, job: dict, res: Results) -> None:
    from .s3_ranks import worker
    for key, value in run_job(world, job, res, worker, prefix=f"n{world}.").items():
        res.values[f"n{world}.{key}"] = value


def parse(argv=None):
    p = argparse.ArgumentParser(prog="python -m bench.s3", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--size-gib", type=float, default=0.5, help="state size (model + Adam), GiB")
    p.add_argument("--ranks", default="1,2", help="rank counts, e.g. 1,2")
    p.add_argument("--repeat", type=int, default=3, help="runs per figure (medians are reported)")
    p.add_argument("--out", default="s3.json")
    p.add_argument("--server", choices=("moto", "ceph"), default="moto",
                   help="the local S3 server: moto (an emulator, one Python process: the bottleneck) or a one-node "
                        "Ceph RGW (bench/cephrgw.py; `make setup-ceph` installs it)")
    p.add_argument("--server-log", default=None, help="file for the moto server's request log and errors")
    p.add_argument("--quick", action="store_true", help="32 MiB, 1 run, ranks 1,2: checks the program end to "
                   "end (for CI); the figures mean little")
    args = p.parse_args(argv)
    if args.quick:
        args.size_gib, args.repeat = 32 / 1024, 1
    args.ranks = [int(r) for r in str(args.ranks).split(",") if r.strip()]
    return args


def main(argv=None) -> int:
    args = parse(argv)
    os.environ["OMP_NUM_THREADS"] = "1"
    res, started = Results(), time.perf_counter()
    server = start_server(args)
    workdir = tempfile.mkdtemp(prefix="pyckpt-bench-s3-")       # the ranks' results
    try:
        from pyckpt.s3_store import PART_SIZE, UPLOADS_IN_FLIGHT, client
        client().create_bucket(Bucket=BUCKET)
        log(f"{server.name} S3 server at {server.url} (pids {server.pids})")
        for world in args.ranks:
            job = {"bucket": BUCKET, "size": int(args.size_gib * GIB), "repeat": args.repeat,
                   "server_pids": server.pids, "collect": server.collect, "out": os.path.join(workdir, f"n{world}.json")}
            run_world(world, job, res)
            log(f"{world} rank(s) done")
    finally:
        server.stop()
        shutil.rmtree(workdir, ignore_errors=True)
    command = _command(sys.argv[1:] if argv is None else argv).replace("bench.checkpoint", "bench.s3")
    data = {"meta": {"command": command, "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
                     "cpus": os.cpu_count(), "python": platform.python_version(), "torch": torch.__version__,
                     "size_gib": args.size_gib, "repeat": args.repeat, "ranks": args.ranks,
                     "server": server.name, "client": "boto3 " + _version("boto3"),
                     "s3fs": _version("s3fs"), "part_size": PART_SIZE, "parts_in_flight": UPLOADS_IN_FLIGHT,
                     "seconds": time.perf_counter() - started},
            "values": res.values, "figures": res.figures()}
    data["rows"] = report.rows(data)
    data["targets"] = report.targets(data)
    with open(args.out, "w") as f:
        json.dump(data, f, indent=1)
    print(report.table(data))
    log(f"wrote {args.out} in {data['meta']['seconds']:.0f} s")
    return 0


def start_server(args) -> Server:
    """The S3 server for the run, this process's AWS_* variables pointing at it."""
    if args.server == "ceph":
        from . import cephrgw
        # Memory for a round's objects; deleted ones are freed between the figures (collect), not
        # during one (a collection costs the server CPU that would slow the figure it falls in).
        ceph = cephrgw.cluster(memstore_bytes=max(8 << 30, int(12 * args.size_gib * GIB)), gc_period=3600)
        os.environ.update(ceph.env)
        pids = [p.pid for name, p in ceph.procs.items() if name.startswith(("osd.", "client.rgw"))]
        version = subprocess.run(["radosgw", "--version"], capture_output=True, text=True).stdout.split()
        return Server(f"Ceph RGW {version[2] if len(version) > 2 else '?'} (memstore)", ceph.endpoint, pids,
                      lambda: cephrgw.stop(ceph), cephrgw.collect_command(ceph))
    proc, url = s3server.start(free_port(), args.server_log)
    return Server("moto " + _version("moto"), url, [proc.pid], lambda: s3server.stop(proc))


def _version(name: str) -> str:
    from importlib.metadata import version
    return version(name)


if __name__ == "__main__":
    sys.exit(main())
