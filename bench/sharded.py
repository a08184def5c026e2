"""The sharded bench: pyckpt against DCP on FSDP2 state over N gloo ranks, with the limits, in one run.

    python -m bench.sharded --size-gib 1.5 --ranks 1,2,4 --repeat 3 --out sharded.json --png sharded.png
    python -m bench.sharded --quick --out quick.json      # 24 MiB, ranks 1,2, 1 run: end to end, for CI

The bench's large (8 Linear layers, rows not divisible by 3 or 4) and small (--small-tensors tensors)
models, `fully_shard`ed on a CPU mesh, AdamW after one step (--size-gib is each state's size). On the
same state: the limits of each rank's bytes, pyckpt and DCP saves and async stalls, cold restores on
the same N and on every other M of --ranks (N -> M, resharded), and pyckpt.load of each N-rank
snapshot in a plain process. Medians of --repeat, slowest rank; every restore checked bit-exact.
docs/PERFORMANCE.md ("Sharded state") explains the figures.
"""
from __future__ import annotations

import argparse
import json
import mmap
import os
import platform
import shutil
import sys
import tempfile
import time
from datetime import datetime, timezone

import torch

from . import sharded_report as report
from . import sharded_state as ss
from .checkpoint import Results, _command, free_port, log
from .measure import aligned_buffer, drop_cache, files_under, fresh_buffer, fs_type, read_direct_limit, read_limit, \
    timed

GIB = 1 << 30


def run_job(world: int, job: dict, res: Results, worker=None, prefix: str = "") -> dict:
    """`world` spawned gloo ranks running worker (default: sharded_ranks.worker); their timings go into
    res (keys with prefix); returns the values rank 0 wrote to job["out"]."""
    import torch.multiprocessing as tmp
    if worker is None:
        from .sharded_ranks import worker
    tmp.start_processes(worker, args=(world, free_port(), job), nprocs=world, join=True, start_method="spawn")
    with open(job["out"]) as f:
        data = json.load(f)
    for key, runs in data["runs"].items():
        for seconds in runs:
            res.add(prefix + key, seconds)
    return data["values"]


def run_jobs(args, workdir: str, res: Results) -> None:
    """Ascending N: each job saves and restores on its N, and restores the snapshots of the smaller N
    already saved (N -> M up); then one restore-only job per M that has larger sources (N -> M down)."""
    digests: dict = {}
    base = {"workdir": workdir, "repeat": args.repeat, "size": int(args.size_gib * GIB),
            "small_tensors": args.small_tensors, "kinds": args.states, "settle": args.settle}
    ranks = sorted(args.ranks)
    jobs = [(m, True, [n for n in ranks if n < m]) for m in ranks]
    jobs += [(m, False, [n for n in ranks if n > m]) for m in ranks if any(n > m for n in ranks)]
    for i, (world, saves, sources) in enumerate(jobs):
        job = {**base, "saves": saves, "sources": sources, "out": os.path.join(workdir, f"job{i}.json")}
        values = run_job(world, job, res)
        for key, value in values.items():
            if ".full_digests." in key:
                digests[key] = value
            else:
                res.values[key] = value
        log(f"{world} rank(s): " + ("saved, " if saves else "") + f"restored from {sources or 'itself'}")
    for key, value in digests.items():   # every rank count built the same global state
        kind = key.split(".")[0]
        if value != digests[f"{kind}.full_digests.n{ranks[0]}"]:
            raise AssertionError(f"{key}: the states built on different rank counts differ")
    res.values["reference"] = {kind: digests[f"{kind}.full_digests.n{ranks[0]}"] for kind in args.states}


def read_fresh(files: list[str]) -> bool:
    """The snapshot's files read with O_DIRECT into one new, untouched buffer (the limit for a load
    that returns new tensors: the memory has to be faulted in too)."""
    buffer = fresh_buffer(sum(os.path.getsize(f) for f in files))
    at = 0
    for f in files:
        size = os.path.getsize(f)
        if not read_direct_limit(f, buffer[at: at + size + (-size % mmap.PAGESIZE)]):
            return False
        at += size + (-size % mmap.PAGESIZE)
    return True


def plain_loads(args, workdir: str, res: Results) -> None:
    """pyckpt.load of each N-rank snapshot in this process (no process group), cold, checked against
    the full tensors at save; next to cold buffered and O_DIRECT reads of the snapshot's files."""
    import pyckpt
    for kind in args.states:
        for world in args.ranks:
            snap = os.path.join(workdir, f"{kind}-n{world}", "ck.bin.pyckpt")
            files = [f for f in files_under(snap) if os.path.basename(f).startswith("data-")]
            biggest = max(os.path.getsize(f) for f in files)
            aligned = aligned_buffer(biggest)
            prefix = f"{kind}.n{world}.plain"
            res.values[f"{prefix}.snapshot_bytes"] = sum(os.path.getsize(f) for f in files_under(snap))
            pyckpt.load(snap[: -len(".pyckpt")])    # once untimed: the first call of a process sets up
            for _ in range(args.repeat):
                drop_cache(snap, settle=args.settle)
                res.add(f"{prefix}.limit.read_cold",
                        timed(lambda: [read_limit(f, aligned[:os.path.getsize(f)]) for f in files])[0])
                drop_cache(snap, settle=args.settle)
                seconds, ok = timed(lambda: all([read_direct_limit(f, aligned) for f in files]))
                if ok:
                    res.add(f"{prefix}.limit.read_direct", seconds)
                drop_cache(snap, settle=args.settle)
                seconds, ok = timed(lambda: read_fresh(files))
                if ok:
                    res.add(f"{prefix}.limit.read_fresh", seconds)
                drop_cache(snap, settle=args.settle)
                seconds, state = timed(lambda: pyckpt.load(snap[: -len(".pyckpt")]))
                res.add(f"{prefix}.pyckpt.load", seconds)
                if ss.plain_digests(state) != res.values["reference"][kind]:
                    raise AssertionError(f"{prefix}: pyckpt.load differs from the saved state")
                del state


def parse(argv=None):
    p = argparse.ArgumentParser(prog="python -m bench.sharded", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--size-gib", type=float, default=1.5, help="size of each state (params + AdamW), GiB")
    p.add_argument("--ranks", default="1,2,4", help="rank counts; restores go N -> M for every pair")
    p.add_argument("--repeat", type=int, default=3, help="runs per figure (medians are reported)")
    p.add_argument("--small-tensors", type=int, default=20_000, help="tensors in the small-tensor state")
    p.add_argument("--states", default="large,small", help="states to measure (large, small)")
    p.add_argument("--out", default="sharded.json")
    p.add_argument("--png", default=None, help="chart file (PNG)")
    p.add_argument("--workdir", default=None, help="where files are written (a real disk, not tmpfs)")
    p.add_argument("--settle", type=float, default=4.0, help="seconds between a cache drop and a cold "
                   "figure (the VM returns the freed memory to the host meanwhile: bench/measure.py)")
    p.add_argument("--quick", action="store_true", help="24 MiB, 1 run, ranks 1,2, 400 small tensors, no settle: "
                   "checks the program end to end (for CI); the figures mean little")
    args = p.parse_args(argv)
    if args.quick:
        args.size_gib, args.repeat, args.small_tensors, args.settle = 24 / 1024, 1, 400, 0.0
        if args.ranks == p.get_default("ranks"):
            args.ranks = "1,2"
    args.ranks = sorted({int(r) for r in str(args.ranks).split(",") if r.strip()})
    args.states = [name.strip() for name in args.states.split(",") if name.strip()]
    return args


def main(argv=None) -> int:
    args = parse(argv)
    os.environ["OMP_NUM_THREADS"] = "1"
    base = args.workdir or tempfile.gettempdir()
    os.makedirs(base, exist_ok=True)
    workdir = tempfile.mkdtemp(prefix="pyckpt-sharded-", dir=base)
    res = Results()
    started = time.perf_counter()
    try:
        run_jobs(args, workdir, res)
        plain_loads(args, workdir, res)
    finally:
        shutil.rmtree(workdir, ignore_errors=True)
    res.values.pop("reference", None)
    command = _command(sys.argv[1:] if argv is None else argv).replace("bench.checkpoint", "bench.sharded")
    data = {"meta": {"command": command, "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
                     "cpus": os.cpu_count(), "python": platform.python_version(), "torch": torch.__version__,
                     "size_gib": args.size_gib, "repeat": args.repeat, "ranks": args.ranks,
                     "small_tensors": args.small_tensors, "states": args.states, "settle": args.settle,
                     "workdir_fs": fs_type(base),
                     "seconds": time.perf_counter() - started},
            "values": res.values, "figures": res.figures()}
    data["rows"] = report.rows(data)
    data["targets"] = report.targets(data)
    with open(args.out, "w") as f:
        json.dump(data, f, indent=1)
    print(report.table(data))
    if args.png:
        report.chart(data, args.png)
    log(f"wrote {args.out}" + (f" and {args.png}" if args.png else "") + f" in {data['meta']['seconds']:.0f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
