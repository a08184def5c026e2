"""pyckpt against torch.save, DCP, safetensors, torchsnapshot and the hardware limits, in one run.

    python -m bench.checkpoint --size-gib 1.5 --ranks 1,2,4 --out results.json --png results.png
    python -m bench.checkpoint --quick --out quick.json        # 64 MiB, end to end, for CI

Every figure is the median of --repeat runs (their spread is reported too); every restore is checked
bit-exact against the saved state. docs/PERFORMANCE.md explains the figures and holds the last table.
"""
from __future__ import annotations

import argparse
import gc
import json
import os
import platform
import shutil
import socket
import sys
import tempfile
import threading
import time
from datetime import datetime, timezone

import torch

from . import libs, report
from . import state as st
from .measure import (aligned_buffer, clear, drop_cache, fs_type, median, pack, read_direct_limit, read_limit,
                      spread, timed, write_direct_limit, write_limit)

GIB = 1 << 30
MIB = 1 << 20


class Results:
    def __init__(self):
        self.runs: dict[str, list[float]] = {}
        self.values: dict[str, object] = {}

    def add(self, key: str, seconds: float) -> None:
        self.runs.setdefault(key, []).append(seconds)

    def figures(self) -> dict:
        return {k: {"median": median(v), "spread": spread(v), "runs": v} for k, v in sorted(self.runs.items())}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


# ------------------------------------------------------------------------------------------------
# One process: limits, every library, large and small state
# ------------------------------------------------------------------------------------------------

def limits(res: Results, model, optimizer, workdir: str, settle: float = 0.0):
    """Returns two functions: one measures every disk and allocation limit once (called at the start of
    every round of the libraries, so each limit is measured next to what is compared with it: the
    disk is shared), the other one copy of the state (called right before every async snapshot:
    the memory bandwidth of this VM's host varies from one minute to the next, 0.04-0.16 s)."""
    tensors = st.state_tensors(model, optimizer)
    nbytes = sum(t.numel() * t.element_size() for t in tensors)
    aligned = aligned_buffer(nbytes)           # touched: first touch is not part of "one copy"
    buffer = aligned[:nbytes]
    path = os.path.join(workdir, "limit.bin")

    def copy() -> None:
        res.add("limit.copy", timed(lambda: pack(tensors, buffer))[0])

    def once() -> None:
        seconds, clones = timed(lambda: [t.clone() for t in tensors])
        del clones
        res.add("limit.clone", seconds)
        clear(path)
        res.add("limit.write_fdatasync", timed(lambda: write_limit(path, buffer))[0])
        res.add("limit.overwrite_fdatasync", timed(lambda: write_limit(path, buffer, overwrite=True))[0])
        clear(path)
        seconds, direct = timed(lambda: write_direct_limit(path, aligned))
        if direct:
            res.add("limit.write_direct", seconds)
        res.values["cache_drop_method"] = drop_cache(path, settle=settle)
        res.add("limit.read_cold", timed(lambda: read_limit(path, buffer))[0])
        res.add("limit.read_warm", timed(lambda: read_limit(path, buffer))[0])
        seconds, direct = timed(lambda: read_direct_limit(path, aligned))
        if direct:
            res.add("limit.read_direct", seconds)
        clear(path)
    return once, copy


def measure_libs(res: Results, kind: str, model, optimizer, lib_classes, workdir: str, repeat: int,
                 each_round=None, before_async=None, settle: float = 0.0) -> None:
    ref = st.fingerprint(model, optimizer)
    instances = [cls(model, optimizer) for cls in lib_classes]
    for lib in instances:
        if lib.has_async:   # the first async snapshot pays one-time set-up (pyckpt: faulting in its
            # staging buffer): reported on its own, so the stall figure is the one of every later snapshot
            path = os.path.join(workdir, f"{kind}-{lib.name}-first")
            start = time.perf_counter()
            wait = lib.async_save(path)
            res.values[f"{kind}.{lib.name}.async_blocked_first"] = time.perf_counter() - start
            wait()
            lib.settle()
            clear(path)
            clear(path + ".pyckpt")
    for rep in range(repeat):
        if each_round is not None:
            each_round()
        for lib in instances:
            key = f"{kind}.{lib.name}"
            path = os.path.join(workdir, f"{kind}-{lib.name}")
            if lib.name != "pyckpt":        # pyckpt snapshots the same path every time, as training does
                clear(path)
            res.add(f"{key}.save", timed(lambda: lib.save(path))[0])
            if lib.has_async:
                if lib.name != "pyckpt":
                    clear(path)
                # In training, steps separate two snapshots: the stall is measured once the last
                # save's background work is over, not competing with it for the 2 cores.
                lib.settle()
                if before_async is not None:
                    before_async()
                start = time.perf_counter()
                wait = lib.async_save(path)
                res.add(f"{key}.async_blocked", time.perf_counter() - start)
                wait()
                res.add(f"{key}.async_durable", time.perf_counter() - start)
            st.scramble(model, optimizer)
            lib.settle()  # a restore after a restart has no clean-up of a previous snapshot running
            res.values["cache_drop_method"] = drop_cache(path + ".pyckpt" if lib.name == "pyckpt" else path, path,
                                                         settle=settle)
            res.add(f"{key}.restore_cold", timed(lambda: lib.restore(path))[0])
            st.assert_equal(model, optimizer, ref, f"{key} cold restore")
            st.scramble(model, optimizer)
            res.add(f"{key}.restore_warm", timed(lambda: lib.restore(path))[0])
            st.assert_equal(model, optimizer, ref, f"{key} warm restore")
            if rep == repeat - 1:
                res.values[f"{key}.bytes_on_disk"] = _disk_bytes(path)
    for lib in instances:
        lib.close()


def _disk_bytes(path: str) -> int:
    from .measure import files_under
    paths = [path, path + ".pyckpt"]
    return sum(os.path.getsize(f) for p in paths if os.path.exists(p) for f in files_under(p))


def divergence_check_cost(res: Results, kind: str, model, optimizer, repeat: int) -> None:
    """What pyckpt adds to every snapshot of a job of several ranks, on the training thread, to catch
    "replicated" state that differs between ranks (checksums of samples of every tensor): measured here
    on the same state, as it does not depend on the number of ranks (off with one rank)."""
    from pyckpt.capture import divergence_samples
    from pyckpt.sysio import byte_view
    views = [byte_view(t) for t in st.state_tensors(model, optimizer)]
    for _ in range(repeat):
        res.add(f"{kind}.pyckpt.divergence_check", timed(lambda: divergence_samples(views))[0])


def run_single(args, workdir: str, res: Results) -> None:
    size = int(args.size_gib * GIB)
    import torch.distributed as dist
    # DCP's async_save wants a process group; a 1-rank gloo group changes nothing for the others.
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{free_port()}", rank=0, world_size=1)
    try:
        classes = [c for c in (libs.Pyckpt, libs.TorchSave, libs.Safetensors, libs.DCP) if c.name in args.libs]
        problem = libs.ensure_torchsnapshot(os.path.join(workdir, "..", "pyckpt-bench-deps")) \
            if args.torchsnapshot and "torchsnapshot" in args.libs else "skipped (not selected)"
        res.values["torchsnapshot"] = problem or "ran"
        for kind in args.states:
            model, optimizer = st.build(kind, size, small_tensors=args.small_tensors)
            res.values[f"{kind}.state_bytes"] = st.state_bytes(model, optimizer)
            res.values[f"{kind}.tensors"] = len(st.state_tensors(model, optimizer))
            log(f"{kind} state: {res.values[f'{kind}.tensors']} tensors, "
                f"{res.values[f'{kind}.state_bytes'] / MIB:.0f} MiB")
            each_round, copy = limits(res, model, optimizer, workdir, args.settle) if kind == "large" else (None, None)
            wanted = classes + ([libs.TorchSnapshot] if problem is None and kind == "large" else [])
            measure_libs(res, kind, model, optimizer, wanted, workdir, args.repeat, each_round, copy,
                         args.settle)
            divergence_check_cost(res, kind, model, optimizer, args.repeat)
            log(f"{kind} libraries done")
            del model, optimizer
            gc.collect()
    finally:
        dist.destroy_process_group()


# ------------------------------------------------------------------------------------------------
# Peak memory over consecutive async snapshots (own process, so RSS is not polluted)
# ------------------------------------------------------------------------------------------------

def rss_worker(size: int, count: int, workdir: str, out: str) -> None:
    import psutil
    proc = psutil.Process()
    model, optimizer = st.build("large", size)
    lib = libs.Pyckpt(model, optimizer)
    gc.collect()
    baseline = proc.memory_info().rss
    peak = [baseline]
    stop = threading.Event()

    def sample():
        while not stop.is_set():
            peak[0] = max(peak[0], proc.memory_info().rss)
            time.sleep(0.002)

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    peaks, blocked = [], []
    path = os.path.join(workdir, "rss-pyckpt")
    for _ in range(count):
        start = time.perf_counter()
        wait = lib.async_save(path)
        blocked.append(time.perf_counter() - start)
        with torch.no_grad():  # "training" touches the state while the snapshot is written
            for p in model.parameters():
                p.add_(1e-6)
        wait()
        peaks.append(peak[0] - baseline)
    stop.set()
    sampler.join()
    lib.close()
    with open(out, "w") as f:
        json.dump({"state_bytes": st.state_bytes(model, optimizer), "extra_peak_bytes": peaks,
                   "blocked": blocked}, f)


def run_rss(args, workdir: str, res: Results) -> None:
    import multiprocessing as mp
    out = os.path.join(workdir, "rss.json")
    p = mp.get_context("spawn").Process(target=rss_worker,
                                        args=(int(args.size_gib * GIB), args.rss_snapshots, workdir, out))
    p.start()
    p.join()
    if p.exitcode != 0:
        raise RuntimeError(f"rss worker failed ({p.exitcode})")
    with open(out) as f:
        data = json.load(f)
    peaks = data["extra_peak_bytes"]
    res.values["rss.snapshots"] = len(peaks)
    res.values["rss.extra_peak_bytes"] = max(peaks)
    res.values["rss.extra_peak_ratio"] = max(peaks) / data["state_bytes"]
    quarter = max(1, len(peaks) // 4)
    # growth: peak after the last quarter of snapshots vs after the first quarter
    res.values["rss.growth_bytes"] = max(peaks[-quarter:]) - max(peaks[:quarter])
    res.values["rss.blocked_median"] = median(data["blocked"])


# ------------------------------------------------------------------------------------------------
# Several ranks (gloo, spawned processes on this machine): the DDP case
# ------------------------------------------------------------------------------------------------

def rank_worker(rank: int, world: int, port: int, size: int, repeat: int, workdir: str, out: str,
                settle: float = 0.0) -> None:
    os.environ["OMP_NUM_THREADS"] = "1"
    torch.set_num_threads(1)
    import torch.distributed as dist
    from datetime import timedelta
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world,
                            timeout=timedelta(seconds=300))
    model, optimizer = st.build("large", size)           # same seed: replicated (DDP) state
    ref = st.fingerprint(model, optimizer)
    found: dict[str, list[float]] = {}
    values: dict[str, object] = {}

    def slowest(seconds: float) -> float:
        t = torch.tensor([seconds], dtype=torch.float64)
        dist.all_reduce(t, op=dist.ReduceOp.MAX)
        return float(t.item())

    def step(key: str, fn) -> None:
        dist.barrier()
        seconds = slowest(timed(fn)[0])
        found.setdefault(key, []).append(seconds)

    def cold(path: str) -> None:
        if rank == 0:
            values["cache_drop_method"] = drop_cache(path, settle=settle)
        dist.barrier()

    instances = [libs.Pyckpt(model, optimizer), libs.DCP(model, optimizer)]
    for _ in range(repeat):
        for lib in instances:
            path = os.path.join(workdir, f"ranks{world}-{lib.name}")
            if lib.name != "pyckpt" and rank == 0:
                clear(path)
            step(f"{lib.name}.save", lambda: lib.save(path))
            st.scramble(model, optimizer)
            lib.settle()
            cold(path + ".pyckpt" if lib.name == "pyckpt" else path)
            step(f"{lib.name}.restore_cold", lambda: lib.restore(path))
            st.assert_equal(model, optimizer, ref, f"{world} ranks {lib.name} cold restore")
            st.scramble(model, optimizer)
            step(f"{lib.name}.restore_warm", lambda: lib.restore(path))
            st.assert_equal(model, optimizer, ref, f"{world} ranks {lib.name} warm restore")
    if world > 1:
        restore_strategies(rank, world, os.path.join(workdir, f"ranks{world}-pyckpt"), repeat, step, cold)
    # bytes each rank wrote: pyckpt data-<rank>.bin, DCP __<rank>_0.distcp
    mine = {"pyckpt": instances[0].last_info.bytes_written,
            "dcp": os.path.getsize(os.path.join(workdir, f"ranks{world}-dcp", f"__{rank}_0.distcp"))}
    gathered: list = [None] * world
    dist.all_gather_object(gathered, mine)
    for lib in instances:
        lib.close()
    dist.destroy_process_group()
    if rank == 0:
        values["bytes_per_rank"] = {name: [g[name] for g in gathered] for name in mine}
        with open(out, "w") as f:
            json.dump({"runs": found, "values": values}, f)


def restore_strategies(rank: int, world: int, path: str, repeat: int, step, cold) -> None:
    """Three ways N ranks of one machine can get the same replicated bytes, on pyckpt's data files (raw:
    buffered reads, no parsing, no checksums): every rank reads every file; rank r reads file r once
    and broadcasts it over gloo; rank r reads file r and copies the others out of their processes'
    memory (process_vm_readv: what pyckpt's restore does, with O_DIRECT reads and checksums)."""
    import glob
    import torch.distributed as dist
    from pyckpt import peers
    files = sorted(glob.glob(os.path.join(path + ".pyckpt", "v*", "data-*.bin")),
                   key=lambda f: int(f.rsplit("-", 1)[1].split(".")[0]))
    if len(files) != world:
        return
    buffers = [torch.empty(os.path.getsize(f), dtype=torch.uint8) for f in files]
    for buf in buffers:
        buf.fill_(0)                               # preallocated and touched, like in-place restore targets

    def read_all():
        for f, buf in zip(files, buffers):
            read_limit(f, buf)

    def split_broadcast():
        read_limit(files[rank], buffers[rank])
        for owner, buf in enumerate(buffers):
            dist.broadcast(buf, src=owner)

    def split_cross_memory():
        read_limit(files[rank], buffers[rank])
        offers: list = [None] * world
        dist.all_gather_object(offers, (os.getpid(), buffers[rank].data_ptr(), buffers[rank].nbytes))
        for owner, buf in enumerate(buffers):
            if owner != rank:
                pid, address, nbytes = offers[owner]
                if not peers.copy_from(pid, [(address, nbytes)], [(buf.data_ptr(), buf.nbytes)]):
                    raise RuntimeError(f"rank {rank} cannot read rank {owner}'s memory (process_vm_readv refused)")
        dist.barrier()                             # until then a peer may still be copying from us

    for _ in range(repeat):
        cold(path + ".pyckpt")
        step("strategy.every_rank_reads_all", read_all)
        cold(path + ".pyckpt")
        step("strategy.split_read_broadcast", split_broadcast)
        cold(path + ".pyckpt")
        with peers.readable_by_peers():
            step("strategy.split_read_cross_memory", split_cross_memory)


def run_ranks(args, workdir: str, res: Results) -> None:
    import torch.multiprocessing as tmp
    size = int(args.size_gib * GIB)
    for world in args.ranks:
        out = os.path.join(workdir, f"ranks{world}.json")
        tmp.start_processes(rank_worker, args=(world, free_port(), size, args.repeat, workdir, out, args.settle),
                            nprocs=world, join=True, start_method="spawn")
        with open(out) as f:
            data = json.load(f)
        for key, runs in data["runs"].items():
            for seconds in runs:
                res.add(f"ranks{world}.{key}", seconds)
        for name, per_rank in data["values"]["bytes_per_rank"].items():
            res.values[f"ranks{world}.{name}.bytes_per_rank"] = per_rank
        for path in os.listdir(workdir):
            if path.startswith(f"ranks{world}-"):
                clear(os.path.join(workdir, path))
        log(f"{world} rank(s) done")


# ------------------------------------------------------------------------------------------------

def _command(argv: list[str]) -> str:
    """The command line as it can be re-run anywhere: output files by their names, no --workdir."""
    out, skip = [], False
    for i, arg in enumerate(argv):
        if skip:
            skip = False
            continue
        name, _, value = arg.partition("=")
        if name == "--workdir":
            skip = not value
            continue
        if name in ("--out", "--png", "--server-log"):
            if value:
                arg = f"{name}={os.path.basename(value)}"
            elif i + 1 < len(argv):
                out.append(arg)
                out.append(os.path.basename(argv[i + 1]))
                skip = True
                continue
        out.append(arg)
    return "python -m bench.checkpoint " + " ".join(out)


def log(msg: str) -> None:
    print(f"[bench {time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


def parse(argv=None):
    p = argparse.ArgumentParser(prog="python -m bench.checkpoint", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--size-gib", type=float, default=1.5, help="state size (model + Adam), GiB")
    p.add_argument("--ranks", default="1,2,4", help="rank counts for the DDP case, e.g. 1,2,4")
    p.add_argument("--repeat", type=int, default=3, help="runs per figure (medians are reported)")
    p.add_argument("--small-tensors", type=int, default=20_000, help="tensors in the second (small-tensor) state")
    p.add_argument("--rss-snapshots", type=int, default=20, help="consecutive async snapshots for peak RSS")
    p.add_argument("--out", default="results.json")
    p.add_argument("--png", default=None, help="chart file (PNG)")
    p.add_argument("--workdir", default=None, help="where files are written (default: the system temp dir; "
                   "must be a real disk, not tmpfs, for the figures to mean anything)")
    p.add_argument("--no-torchsnapshot", dest="torchsnapshot", action="store_false",
                   help="do not pip-install torchsnapshot into a private directory to measure it")
    p.add_argument("--libs", default="pyckpt,torch.save,safetensors,dcp,torchsnapshot",
                   help="libraries to measure (default: all)")
    p.add_argument("--states", default="large,small", help="states to measure (large, small)")
    p.add_argument("--no-rss", dest="rss", action="store_false", help="skip the peak-RSS measurement")
    p.add_argument("--pyckpt-reuse-files", choices=("on", "off"), default="off",
                   help="DistributedCoordinator(reuse_files=...): overwrite the data files of the dropped "
                   "version instead of allocating new ones (default off, as in pyckpt)")
    p.add_argument("--settle", type=float, default=4.0, help="seconds between a cache drop and a cold "
                   "figure (the VM returns the freed memory to the host meanwhile: bench/measure.py)")
    p.add_argument("--quick", action="store_true", help="64 MiB, 1 run, ranks 1,2, 2,000 small tensors, "
                   "3 RSS snapshots, no settle: checks the program end to end (for CI); the figures mean little")
    args = p.parse_args(argv)
    if args.quick:
        args.size_gib, args.repeat, args.rss_snapshots, args.small_tensors, args.settle = 64 / 1024, 1, 3, 2000, 0.0
        if args.ranks == p.get_default("ranks"):
            args.ranks = "1,2"
    args.ranks = [int(r) for r in str(args.ranks).split(",") if r.strip()]
    args.libs = [name.strip() for name in args.libs.split(",") if name.strip()]
    args.states = [name.strip() for name in args.states.split(",") if name.strip()]
    return args


def main(argv=None) -> int:
    args = parse(argv)
    os.environ[libs.REUSE_ENV] = "1" if args.pyckpt_reuse_files == "on" else "0"  # also for the rank processes
    os.environ.setdefault("OMP_NUM_THREADS", "1" if max(args.ranks, default=1) > 1 else str(os.cpu_count()))
    base = args.workdir or tempfile.gettempdir()
    os.makedirs(base, exist_ok=True)
    workdir = tempfile.mkdtemp(prefix="pyckpt-bench-", dir=base)
    res = Results()
    started = time.perf_counter()
    try:
        run_single(args, workdir, res)
        if args.rss:
            run_rss(args, workdir, res)
        if args.ranks:
            run_ranks(args, workdir, res)
    finally:
        shutil.rmtree(workdir, ignore_errors=True)
    data = {
        "meta": {
            "command": _command(sys.argv[1:] if argv is None else argv),
            "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
            "cpus": os.cpu_count(), "python": platform.python_version(),
            "torch": torch.__version__, "size_gib": args.size_gib, "repeat": args.repeat,
            "ranks": args.ranks, "small_tensors": args.small_tensors, "settle": args.settle,
            "pyckpt_options": {"reuse_files": args.pyckpt_reuse_files == "on"}, "workdir_fs": fs_type(base), "seconds": time.perf_counter() - started,
        },
        "values": res.values,
        "figures": res.figures(),
    }
    data["rows"] = report.rows(data)
    data["targets"] = report.targets(data)
    with open(args.out, "w") as f:
        json.dump(data, f, indent=1)
    print(report.table(data))
    if args.png:
        report.chart(data, args.png)
    log(f"wrote {args.out}" + (f" and {args.png}" if args.png else "") +
        f" in {data['meta']['seconds']:.0f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
