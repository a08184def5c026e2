"""One rank of a job that snapshots the same path over and over, for the crash harness.

    python crash_worker.py PATH --rank R --world-size W --port P --start S [--async] [--steps N]

Prints "ready" once initialised and "committed <step>" (rank 0) after each snapshot is committed.
The harness SIGKILLs it at random moments, or sets PYCKPT_TEST_CRASH_AT=<point>[:n] so that it kills
itself right after a named phase. Points in pyckpt.posix_store: stage-created, manifest-written,
stage-renamed, record-tmp-written, record-renamed; in pyckpt.coordinator: pruned (after the background
deletion of the versions a commit dropped). Points added here by wrapping the
writer (so coordinator.py needs no hook): data-written (data file written, before its fsync) and
data-fsynced (this rank's data file durable, before the leader gathers).
"""
from __future__ import annotations

import argparse
import os
import sys
from datetime import timedelta

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import torch  # noqa: E402
import torch.distributed as dist  # noqa: E402

from pyckpt import (DistributedCoordinator, SnapshotLockedError, TrainingRuntime, load_config, posix_store,  # noqa: E402
                    testhooks, writer)
from state import Blob, loss, rng_seed  # noqa: E402


class _OsWithCrashPoint:
    """writer.py's `os`, with a crash point just before a data file is fsynced."""

    def __getattr__(self, name):
        return getattr(os, name)

    @staticmethod
    def fsync(fd: int) -> None:
        try:
            target = os.readlink(f"/proc/self/fd/{fd}")
        except OSError:
            target = ""
        if os.path.basename(target).startswith("data-"):
            testhooks.crash_point("data-written")
        os.fsync(fd)


def _install_hooks() -> None:
    writer.os = _OsWithCrashPoint()
    original = posix_store.write_file

    def write_file(*args, **kwargs):
        digests = original(*args, **kwargs)
        testhooks.crash_point("data-fsynced")
        return digests

    posix_store.write_file = write_file


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("path")
    ap.add_argument("--rank", type=int, default=0)
    ap.add_argument("--world-size", type=int, default=1)
    ap.add_argument("--port", type=int, default=0)
    ap.add_argument("--start", type=int, required=True)
    ap.add_argument("--steps", type=int, default=1000)
    ap.add_argument("--size", type=int, default=None)
    ap.add_argument("--async", dest="use_async", action="store_true")
    ap.add_argument("--keep-last", type=int, default=2)
    ap.add_argument("--tolerate-locked", action="store_true", help='print "locked <step>" and go on')
    args = ap.parse_args()
    if os.environ.get("PYCKPT_TEST_CRASH_AT"):
        _install_hooks()
    if args.world_size > 1:
        dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{args.port}", rank=args.rank,
                                world_size=args.world_size, timeout=timedelta(seconds=30))
    config = load_config(environ={"DISTRIBUTED_MODE": "single"}, cuda_available=lambda: False)
    coord = DistributedCoordinator(config, keep_last=args.keep_last).initialize()
    blob = Blob(args.start, **({"size": args.size} if args.size else {}))
    runtime = TrainingRuntime()
    runtime.register("blob", blob)
    print("ready", flush=True)

    def report(step):
        if args.rank == 0:
            print(f"committed {step}", flush=True)

    for step in range(args.start, args.start + args.steps):
        blob.set_step(step, in_place=args.use_async)
        runtime.set_step(step)
        runtime.set_loss(loss(step, args.rank))
        torch.manual_seed(rng_seed(step, args.rank))
        if args.use_async:
            future = coord.snapshot(args.path, runtime, blocking=False)
            future.add_done_callback(lambda f, s=step: f.exception() is None and report(s))
        else:
            try:
                coord.snapshot(args.path, runtime)
            except SnapshotLockedError:
                if not args.tolerate_locked:
                    raise
                print(f"locked {step}", flush=True)
                continue
            report(step)
    coord.shutdown()
    if args.world_size > 1:
        dist.destroy_process_group()   # joined here, so left here (a live gloo group can abort at exit)
    print("done", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
