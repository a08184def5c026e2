"""Load possibly corrupted or hostile snapshots in a separate process and report what happened.

    python load_probe.py CASES.json [--max-extra-mb N]

CASES.json: [{"name": ..., "path": ...}, ...]. For each case prints "start <name>" then one JSON line
{"name", "restore", "verify", "cli_verify": outcome} where an outcome is {"kind": "ok"|"error"|"unexpected",
"type", "file", "tensor", "message", "exact"}; "exact" says whether loaded values equal the
reference of the step they claim (state.make_state). Run as a subprocess so that a segfault or an
abort shows up as the process dying after "start <name>", never as a crash of the test runner.

Pickle is disabled in this process (pickle.loads/load/Unpickler and torch.load raise), so a snapshot
that tried to unpickle anything would be reported as unexpected. With --max-extra-mb, RLIMIT_AS caps
the address space at its size after imports + N MiB: huge allocations fail loudly instead of paging.
"""
from __future__ import annotations

import argparse
import json
import os
import pickle
import resource
import sys
import warnings

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import torch  # noqa: E402

from pyckpt import DistributedCoordinator, PyckptError, TrainingRuntime, load_config  # noqa: E402
from pyckpt.reader import Snapshot  # noqa: E402
from state import Blob, loss, make_state, reference_for, same  # noqa: E402


def _forbidden(*args, **kwargs):
    raise AssertionError("pickle used while loading a snapshot")


def _disable_pickle() -> None:
    pickle.loads = pickle.load = _forbidden
    pickle.Unpickler = _forbidden
    torch.load = _forbidden


def _vm_bytes() -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmSize:"):
                return int(line.split()[1]) * 1024
    raise RuntimeError("no VmSize")


def _outcome(fn) -> dict:
    try:
        exact = fn()
        return {"kind": "ok", "exact": exact}
    except PyckptError as exc:
        return {"kind": "error", "type": type(exc).__name__, "file": getattr(exc, "file", None),
                "tensor": getattr(exc, "tensor", None), "message": str(exc)[:500]}
    except BaseException as exc:  # noqa: BLE001 - this is what the probe is for
        return {"kind": "unexpected", "type": type(exc).__name__, "message": str(exc)[:500]}


def verify(path: str) -> bool:
    snap = Snapshot.open(path)
    replicated = snap.replicated()
    privates = [snap.private(r) for r in range(snap.manifest.world_size)]
    step = replicated["progress"]["step"]
    return (same(reference_for(replicated["objects"]["blob"]), replicated["objects"]["blob"])
            and all(p["loss"] == loss(step, r) for r, p in enumerate(privates)))


def cli_verify(path: str) -> bool:
    """What `pyckpt verify` runs: every tensor of the manifest read and checked (no comparison of values)."""
    from pyckpt.inspect import verify as verify_all

    verify_all(Snapshot.open(path))
    return True


class LiveStateClobbered(Exception):
    """A restore that failed had already overwritten the job's live state."""


def restore(path: str) -> bool:
    runtime = TrainingRuntime(capture_rng=False)
    blob = Blob(-7)                       # the job's live state before the restore (same shapes as the snapshot)
    runtime.register("blob", blob)
    coord = DistributedCoordinator(load_config(environ={}, cuda_available=lambda: False))
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            coord.restore(path, runtime)
    except PyckptError:
        if not same(blob.state, make_state(-7)) or blob.loaded is not None:
            raise LiveStateClobbered("restore raised, but the registered object's state was already changed")
        raise
    loaded = blob.loaded if blob.loaded is not None else blob.state
    return same(reference_for(loaded), loaded) and loaded["step"] == runtime.step


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("cases")
    ap.add_argument("--max-extra-mb", type=int, default=0)
    args = ap.parse_args()
    with open(args.cases) as f:
        cases = json.load(f)
    _disable_pickle()
    make_state(0)  # warm up allocations made by the reference itself
    if args.max_extra_mb:
        limit = _vm_bytes() + (args.max_extra_mb << 20)
        resource.setrlimit(resource.RLIMIT_AS, (limit, limit))
    for case in cases:
        print(f"start {case['name']}", flush=True)
        result = {"name": case["name"], "restore": _outcome(lambda: restore(case["path"])),
                  "verify": _outcome(lambda: verify(case["path"])),
                  "cli_verify": _outcome(lambda: cli_verify(case["path"]))}
        print(json.dumps(result), flush=True)
    print("end", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
