"""Where pyckpt's time goes: save, async stall and restore split into phases, on one state.

    python -m bench.phases --state small --size-gib 1.5 --repeat 5 [--reuse-files off] [--sharded] [--cold]

Wraps pyckpt's internal steps with timers (capture = state_dict + encoding + planning; write = the
data file: direct or buffered write, checksums, fsync; commit = manifest, publish, pruning; open = commit record + manifest
validation; check = whether the snapshot fits the runtime (before anything is read); match = finding the live tensors to read in place; targets = where each
sharded tensor goes on this rank; plan = opening the data files, allocating buffers and listing the pieces; read = reads + checksums
(read.wait: the main thread waiting for the read jobs); tree = the state tree rebuilt; load =
load_state_dict; limit.torch_load = torch's own load_state_dict of the live model and optimizer onto
themselves, the part of `load` no restore through torch's API avoids) and prints min and median over --repeat runs. Warm page cache for restores (the
CPU side) unless --cold (each snapshot's page cache dropped before its restore, with a pause:
bench.measure.drop_cache); `python -m bench.checkpoint` and `python -m bench.sharded` measure
cold restores against the other libraries. --sharded: the bench's FSDP2 state of `bench.sharded`
(fully_shard on a 1-rank gloo group), whose restores read DTensors' shards in place.
"""
from __future__ import annotations

import argparse
import collections
import functools
import os
import shutil
import statistics
import sys
import tempfile
import time

from . import sharded_state as ss
from . import state as st
from .checkpoint import free_port
from .measure import drop_cache


def _timers(acc: dict) -> None:
    from pyckpt import commit, coordinator, fitting, posix_store, reader, runtime, writer

    def wrap(owner, name: str, label: str) -> None:
        original = getattr(owner, name)

        @functools.wraps(original)
        def timed(*args, **kwargs):
            start = time.perf_counter()
            try:
                return original(*args, **kwargs)
            finally:
                acc[label] += time.perf_counter() - start
        setattr(owner, name, timed)

    wrap(coordinator, "capture", "save.capture")
    wrap(coordinator, "stage", "async.stage_copy")
    wrap(commit, "_manifest", "save.commit.manifest")
    wrap(posix_store.PosixStore, "publish", "save.commit.publish")
    wrap(posix_store, "write_file", "save.write")
    wrap(writer, "_write_direct", "save.write.direct")
    wrap(writer, "_write_buffered", "save.write.buffered")
    wrap(writer.os, "fsync", "save.write.fsync")
    wrap(reader.Snapshot, "open", "restore.open")
    wrap(fitting, "check_fits", "restore.check")
    wrap(fitting, "live_destinations", "restore.match")
    wrap(reader, "_target", "restore.targets")
    wrap(reader.TensorRead, "__init__", "restore.plan")   # files opened, buffers allocated
    wrap(reader.TensorRead, "run", "restore.read")
    wrap(reader.Running, "wait", "restore.read.wait")
    wrap(reader.TreeRead, "tree", "restore.tree")
    wrap(runtime.TrainingRuntime, "load_state", "restore.load")


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--state", choices=("large", "small"), default="small")
    p.add_argument("--size-gib", type=float, default=1.5)
    p.add_argument("--small-tensors", type=int, default=20_000)
    p.add_argument("--repeat", type=int, default=5)
    p.add_argument("--reuse-files", choices=("on", "off"), default="on")
    p.add_argument("--workdir", default=None, help="a real disk (default: the system temp dir)")
    p.add_argument("--sharded", action="store_true", help="the FSDP2 state of bench.sharded, on 1 rank")
    p.add_argument("--cold", action="store_true", help="drop the snapshot's page cache before each restore")
    args = p.parse_args(argv)

    import pyckpt
    acc: dict = collections.defaultdict(float)
    _timers(acc)
    size = int(args.size_gib * (1 << 30))
    if args.sharded:
        model, optimizer = _sharded(args.state, size, args.small_tensors)
        from .sharded_ranks import check   # (bit-exact local shards; imports torch.distributed)
        fingerprint, scramble = ss.local_digests, ss.scramble
    else:
        model, optimizer = st.build(args.state, size, small_tensors=args.small_tensors)
        fingerprint, check, scramble = st.fingerprint, st.assert_equal, st.scramble
    runtime = pyckpt.TrainingRuntime()
    runtime.register_model(model)
    runtime.register_optimizer(optimizer)
    options = {"reuse_files": True} if args.reuse_files == "on" else {}  # (off: also runs on older pyckpt)
    coordinator = pyckpt.DistributedCoordinator(pyckpt.load_config(environ={}), keep_last=1, **options)
    workdir = tempfile.mkdtemp(prefix="pyckpt-phases-", dir=args.workdir)
    path = os.path.join(workdir, "checkpoint.bin")
    runs: dict = collections.defaultdict(list)

    def record(total_key: str, seconds: float) -> None:
        runs[total_key].append(seconds)
        for key, value in acc.items():
            runs[key].append(value)
        acc.clear()

    try:
        for _ in range(args.repeat):
            acc.clear()
            start = time.perf_counter()
            coordinator.snapshot(path, runtime)
            record("save.total", time.perf_counter() - start)
        for _ in range(args.repeat):
            acc.clear()
            start = time.perf_counter()
            future = coordinator.snapshot(path, runtime, blocking=False)
            runs["async.stall"].append(time.perf_counter() - start)
            runs["async.stage_copy"].append(acc.pop("async.stage_copy", 0.0))
            future.result()
            acc.clear()
        reference = fingerprint(model, optimizer)
        restore_key = "restore_cold.total" if args.cold else "restore_warm.total"
        for _ in range(args.repeat):
            scramble(model, optimizer)
            if args.cold:
                drop_cache(workdir, settle=1.0)
            acc.clear()
            start = time.perf_counter()
            coordinator.restore(path, runtime)
            record(restore_key, time.perf_counter() - start)
            check(model, optimizer, reference, "pyckpt restore")
        for _ in range(args.repeat):
            runs["limit.torch_load"].append(_torch_load(model, optimizer))
    finally:
        coordinator.shutdown()
        shutil.rmtree(workdir, ignore_errors=True)
        if args.sharded:
            import torch.distributed as dist
            dist.destroy_process_group()
    print(f"# python -m bench.phases {' '.join(sys.argv[1:] if argv is None else argv)}")
    tensors = len(ss.full_digests(model, optimizer)) if args.sharded else len(st.state_tensors(model, optimizer))
    gib = (ss.local_bytes(model, optimizer) if args.sharded else st.state_bytes(model, optimizer)) / 2**30
    print(f"# state {args.state}{' (FSDP2, 1 rank)' if args.sharded else ''}: {tensors} tensors, "
          f"{gib:.2f} GiB; reuse_files {args.reuse_files}; "
          f"OMP_NUM_THREADS={os.environ.get('OMP_NUM_THREADS', '-')}")
    print(f"{'phase':28} {'min s':>7} {'median s':>9}")
    order = ["save.total", "save.capture", "save.write", "save.write.direct", "save.write.buffered", "save.write.fsync",
             "save.commit",
             "async.stall", "async.stage_copy", "restore_warm.total", "restore_cold.total", "restore.open",
             "restore.check", "restore.match", "restore.targets", "restore.plan", "restore.read",
             "restore.read.wait", "restore.tree", "restore.load", "limit.torch_load"]
    for key in order + sorted(k for k in runs if k not in order):
        if runs.get(key):
            print(f"{key:28} {min(runs[key]):7.3f} {statistics.median(runs[key]):9.3f}")
    return 0


def _torch_load(model, optimizer) -> float:
    """Seconds of torch's own part of a restore's load: load_state_dict of the model's and the
    optimizer's live state onto themselves (no byte changes; the param groups with O(1) membership, as
    pyckpt's load_state passes them). Any restore through these APIs pays it at this tensor count."""
    import torch
    from pyckpt.runtime import _fast_membership
    model_state, optimizer_state = model.state_dict(keep_vars=True), _fast_membership(optimizer.state_dict())
    start = time.perf_counter()
    with torch.no_grad():
        model.load_state_dict(model_state)
        optimizer.load_state_dict(optimizer_state)
    return time.perf_counter() - start


def _sharded(kind: str, size: int, small_tensors: int):
    """The sharded bench's state on a 1-rank gloo group (loopback)."""
    import torch
    import torch.distributed as dist
    from torch.distributed.device_mesh import init_device_mesh
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{free_port()}", rank=0, world_size=1)
    torch.set_num_threads(1)
    return ss.build(kind, size, init_device_mesh("cpu", (1,)), small_tensors)


if __name__ == "__main__":
    sys.exit(main())
