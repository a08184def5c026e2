"""Crash-consistency harness: SIGKILL snapshotting processes, then prove restore gives old or new, exactly.

Each trial starts a job (1 rank, 2 gloo ranks, or 1 rank with async snapshots) that snapshots the
same path in a loop, each snapshot filled from its step number (state.make_state). The trial kills
the job either after a random delay (a random victim: the single rank, rank 0, rank 1 or both) or
at a named phase (PYCKPT_TEST_CRASH_AT, see crash_worker.py) on one rank while the others go on.
Then, in this process:
  - Snapshot.open + read of every tensor and DistributedCoordinator.restore must succeed;
  - the restored step S must be the last step the job reported committed, or the one in flight;
  - every tensor and every rank's private state (loss, RNG) must equal the reference of step S
    bit for bit (so a mix of two snapshots cannot pass);
  - leftovers (stages, unlisted versions, record tmp files) are removed by PosixStore.gc on even
    trials and must be gone after the next trial's first commit on odd trials.

Long run (documented in docs/RELIABILITY.md):
    .venv/bin/python tests/reliability/crash_harness.py --trials 240 --json crash-report.json
or  PYCKPT_CRASH_TRIALS=240 .venv/bin/python -m pytest tests/reliability/test_crash_consistency.py
"""
from __future__ import annotations

import argparse
import collections
import json
import os
import random
import re
import signal
import socket
import subprocess
import sys
import tempfile
import time
import warnings
from dataclasses import asdict, dataclass, field

import torch

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)

from state import Blob, loss, reference_for, rng_seed, same  # noqa: E402

from pyckpt import DistributedCoordinator, TrainingRuntime, load_config  # noqa: E402
from pyckpt.reader import Snapshot  # noqa: E402
from pyckpt.posix_store import PosixStore  # noqa: E402

WORKER = os.path.join(HERE, "crash_worker.py")
STORAGE_POINTS = ["stage-created", "manifest-written", "stage-renamed", "record-tmp-written", "record-renamed",
                  "pruned"]
RANK_POINTS = ["data-written", "data-fsynced"]       # reached by every rank
JOBS = ["1rank", "2rank", "async"]
KEEP_LAST = 2
SURVIVOR_GRACE_S = 20.0                              # time the other rank gets to notice and exit by itself


@dataclass
class Trial:
    index: int
    job: str
    kill: str            # "random" or "point"
    point: str | None
    victims: list[int]
    delay: float | None
    last_reported: int   # last step the job printed as committed (start-1 if none)
    restored: int = -1
    outcome: str = ""    # "previous" (= last reported) or "new" (the one in flight)
    leftovers: list[str] = field(default_factory=list)
    survivors_exit: list[str] = field(default_factory=list)
    output: str = ""     # the tail of rank 0's stdout (diagnostics)
    seconds: float = 0.0


class HarnessFailure(AssertionError):
    pass


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def leftovers(path: str) -> list[str]:
    """Stages, versions the record does not list, and record tmp files."""
    store = PosixStore(path)
    record = store.committed()
    listed = {v.name for v in record.versions} if record else set()
    out = [e for e in os.listdir(store.root) if re.match(r"^v[0-9]{8}", e) and e not in listed] \
        if os.path.isdir(store.root) else []
    parent, base = os.path.split(store.path)
    out += [e for e in os.listdir(parent) if e.startswith(base + ".tmp-")]
    return sorted(out)


def _inode(path: str, name: str) -> int | None:
    """Inode of a leftover (a version dir under path.pyckpt, or a record tmp file next to path)."""
    for where in (PosixStore(path).root, os.path.dirname(path)):
        try:
            return os.lstat(os.path.join(where, name)).st_ino
        except FileNotFoundError:
            continue
    return None


def verify(path: str) -> int:
    """Everything a user could do with the snapshot at path succeeds and is bit-exact; returns its step."""
    snap = Snapshot.open(path)
    replicated = snap.replicated()
    step = replicated["progress"]["step"]
    expected = reference_for(replicated["objects"]["blob"])
    if replicated["objects"]["blob"]["step"] != step or not same(expected, replicated["objects"]["blob"]):
        raise HarnessFailure(f"{path}: snapshot claims step {step} but its tensors differ from that step's reference")
    for rank in range(snap.manifest.world_size):
        private = snap.private(rank)
        if private["loss"] != loss(step, rank):
            raise HarnessFailure(f"{path}: rank {rank} loss {private['loss']} is not step {step}'s")
        want = torch.Generator().manual_seed(rng_seed(step, rank)).get_state()
        if not torch.equal(private["rng"]["torch"], want):
            raise HarnessFailure(f"{path}: rank {rank} RNG state is not step {step}'s (mixed snapshots)")
    if snap.meta.get("step") != step or snap.ref.step != step:
        raise HarnessFailure(f"{path}: manifest/record step disagree with the state ({snap.meta.get('step')}, "
                             f"{snap.ref.step}, {step})")
    # And the public restore path into a runtime.
    runtime = TrainingRuntime(capture_rng=False)
    blob = Blob(-7, expected["size"])      # a live state of the same shapes (restore may read into it in place)
    runtime.register("blob", blob)
    with DistributedCoordinator(load_config(environ={}, cuda_available=lambda: False)) as coord:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")   # "restoring a 2-rank snapshot on 1 rank" is expected here
            coord.restore(path, runtime)
    if runtime.step != step or not same(expected, blob.loaded if blob.loaded is not None else blob.state):
        raise HarnessFailure(f"{path}: DistributedCoordinator.restore gave different state than Snapshot")
    return step


def _spawn(path: str, job: str, start: int, crash: dict[int, str]) -> list[subprocess.Popen]:
    world = 2 if job == "2rank" else 1
    port = _free_port()
    procs = []
    for rank in range(world):
        env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1", GLOO_SOCKET_IFNAME="lo")
        env.pop("PYCKPT_TEST_CRASH_AT", None)
        if rank in crash:
            env["PYCKPT_TEST_CRASH_AT"] = crash[rank]
        cmd = [sys.executable, WORKER, path, "--rank", str(rank), "--world-size", str(world), "--port", str(port),
               "--start", str(start), "--keep-last", str(KEEP_LAST)]
        if job == "async":
            cmd.append("--async")
        procs.append(subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True))
    return procs


def _wait_ready(proc: subprocess.Popen, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    line = proc.stdout.readline()
    if line.strip() != "ready" or time.monotonic() > deadline:
        proc.kill()
        raise HarnessFailure(f"worker did not start: {line!r} {proc.stderr.read()[-2000:]}")


def run_trial(path: str, index: int, start: int, rng: random.Random) -> Trial:
    job = JOBS[index % len(JOBS)]
    world = 2 if job == "2rank" else 1
    kill = "point" if (index // len(JOBS)) % 2 == 0 else "random"
    point, victims, delay, crash = None, [], None, {}
    if kill == "point":
        # The k-th point trial takes point k % 8 on job k % 3: every (point, job) pair within 24.
        k = (index // (2 * len(JOBS))) * len(JOBS) + index % len(JOBS)
        point = (STORAGE_POINTS + RANK_POINTS)[k % (len(STORAGE_POINTS) + len(RANK_POINTS))]
        victims = [0] if point in STORAGE_POINTS else [rng.randrange(world)]
        crash = {victims[0]: f"{point}:{rng.randint(1, 3)}"}
    else:
        victims = rng.choice([[0], [1], [0, 1]]) if world == 2 else [0]
        delay = rng.uniform(0.0, 1.5)
    began = time.monotonic()
    procs = _spawn(path, job, start, crash)
    out0: list[str] = []
    try:
        for p in procs:
            _wait_ready(p, 60)
        if kill == "random":
            time.sleep(delay)
            for v in victims:
                procs[v].send_signal(signal.SIGKILL)
        deadline = time.monotonic() + 60
        victim = procs[victims[0]]
        while victim.poll() is None and time.monotonic() < deadline:
            time.sleep(0.02)
        if victim.returncode is None:
            raise HarnessFailure(f"trial {index}: {point} was never reached within 60 s")
        survivors = []
        grace = time.monotonic() + SURVIVOR_GRACE_S
        for rank, p in enumerate(procs):
            if rank in victims:
                continue
            try:
                p.wait(timeout=max(0.1, grace - time.monotonic()))
                survivors.append(f"rank{rank}:exit {p.returncode}")
            except subprocess.TimeoutExpired:
                survivors.append(f"rank{rank}:hung, killed")
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
        for p in procs:
            p.wait()
    out0 = procs[0].stdout.read().split()
    if procs[0].returncode != -signal.SIGKILL and 0 in victims:
        raise HarnessFailure(f"trial {index}: rank 0 exited with {procs[0].returncode}, not killed: "
                             f"{procs[0].stderr.read()[-2000:]}")
    committed = [int(out0[i + 1]) for i, w in enumerate(out0) if w == "committed"]
    last = committed[-1] if committed else start - 1
    trial = Trial(index, job, kill, point, victims, delay, last, survivors_exit=survivors,
                  output=" ".join(out0[-12:]))
    trial.restored = verify(path)
    if trial.restored == last:
        trial.outcome = "previous"
    elif trial.restored == last + 1:
        trial.outcome = "new"
    else:
        raise HarnessFailure(f"trial {index}: restored step {trial.restored}, but the job last committed {last} "
                             "(only that or the next one is allowed)")
    trial.leftovers = leftovers(path)
    trial.seconds = time.monotonic() - began
    return trial


def run(trials: int, seed: int = 0, workdir: str | None = None, log=print) -> dict:
    """Run `trials` kill trials on one snapshot path; raises HarnessFailure on the first violation."""
    rng = random.Random(seed)
    with tempfile.TemporaryDirectory(dir=workdir) as tmp:
        path = os.path.join(tmp, "snapshots", "checkpoint.bin")
        # A first committed snapshot, written by a job that is not killed.
        subprocess.run([sys.executable, WORKER, path, "--start", "0", "--steps", "1"], check=True,
                       capture_output=True, timeout=120, env=dict(os.environ, OMP_NUM_THREADS="1"))
        step = verify(path)
        results: list[Trial] = []
        # Leftovers of an odd trial must be gone once the next trial has committed a snapshot
        # (its first begin() removes them). Compared by name and inode: after removal a name may be reused.
        pending: dict[str, int] = {}
        for index in range(trials):
            trial = run_trial(path, index, step + 1, rng)
            if pending and trial.last_reported > step:
                still = sorted(name for name, ino in pending.items() if _inode(path, name) == ino)
                if still:
                    raise HarnessFailure(
                        f"trial {index}: leftovers of the previous crash survived a commit: {still}; now "
                        f"{sorted(os.listdir(PosixStore(path).root))}, record "
                        f"{[v.name for v in PosixStore(path).read_commit().versions]}, trial {asdict(trial)}")
            pending = {}
            if index % 2 == 0:
                PosixStore(path).gc(KEEP_LAST)
                if leftovers(path):
                    raise HarnessFailure(f"trial {index}: gc left {leftovers(path)}")
            else:
                pending = {name: _inode(path, name) for name in trial.leftovers}
            step = trial.restored
            results.append(trial)
            log(f"trial {index:4d} {trial.job:6s} {trial.kill:6s} {str(trial.point):19s} victims={trial.victims} "
                f"last={trial.last_reported} restored={trial.restored} ({trial.outcome}) "
                f"leftovers={len(trial.leftovers)} {' '.join(trial.survivors_exit)} {trial.seconds:.1f}s")
        PosixStore(path).gc(KEEP_LAST)
        if leftovers(path):
            raise HarnessFailure(f"final gc left {leftovers(path)}")
    return summarize(results)


def summarize(results: list[Trial]) -> dict:
    by = collections.Counter((t.job, t.kill) for t in results)
    points = collections.Counter(t.point for t in results if t.point)
    outcomes = collections.Counter(t.outcome for t in results)
    one_rank_killed = sum(1 for t in results if t.job == "2rank" and len(t.victims) == 1)
    return {
        "trials": len(results),
        "failures": 0,
        "by_job_and_kill": {f"{j}/{k}": n for (j, k), n in sorted(by.items())},
        "by_point": dict(sorted(points.items())),
        "outcomes": dict(outcomes),
        "two_rank_trials_killing_one_rank": one_rank_killed,
        "trials_with_leftovers": sum(1 for t in results if t.leftovers),
        "survivors": dict(collections.Counter(s.split(":", 1)[1].split()[0] for t in results
                                              for s in t.survivors_exit)),
        "seconds": round(sum(t.seconds for t in results), 1),
        "trial_log": [asdict(t) for t in results],
    }


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--trials", type=int, default=int(os.environ.get("PYCKPT_CRASH_TRIALS", "240")))
    ap.add_argument("--seed", type=int, default=int(os.environ.get("PYCKPT_CRASH_SEED", "0")))
    ap.add_argument("--json", help="write the summary (with every trial) to this file")
    args = ap.parse_args()
    summary = run(args.trials, args.seed)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(summary, f, indent=1)
    print(json.dumps({k: v for k, v in summary.items() if k != "trial_log"}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
