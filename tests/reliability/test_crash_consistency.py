"""SIGKILL snapshotting jobs (1 rank, 2 gloo ranks, async) at random moments and at each named phase.

CI runs a short series (PYCKPT_CRASH_TRIALS, default 18: every job, both kill kinds, every phase);
the long run is the same test or crash_harness.py with PYCKPT_CRASH_TRIALS=240 (docs/RELIABILITY.md).
"""
from __future__ import annotations

import os
import random

import pytest

import crash_harness

pytestmark = [pytest.mark.reliability, pytest.mark.multiproc]


@pytest.mark.timeout(int(os.environ.get("PYCKPT_CRASH_TIMEOUT", "3600")))
def test_restore_after_sigkill_is_previous_or_new_bit_exact(tmp_path):
    trials = int(os.environ.get("PYCKPT_CRASH_TRIALS", "18"))
    seed = int(os.environ.get("PYCKPT_CRASH_SEED", random.randrange(1 << 30)))
    lines: list[str] = []
    try:
        summary = crash_harness.run(trials, seed, str(tmp_path), log=lines.append)
    except crash_harness.HarnessFailure as exc:
        pytest.fail(f"seed {seed}: {exc}\n" + "\n".join(lines[-20:]))
    print("\n".join(lines))
    assert summary["trials"] == trials
    assert set(summary["by_job_and_kill"]) == {f"{j}/{k}" for j in crash_harness.JOBS for k in ("point", "random")}
    if trials >= 18:   # 9 point trials: all 8 phases
        assert set(summary["by_point"]) == set(crash_harness.STORAGE_POINTS + crash_harness.RANK_POINTS)
        assert summary["two_rank_trials_killing_one_rank"] >= 1
    # Both outcomes are legal; over a series the named phases after the record rename give "new".
    assert summary["outcomes"].get("new", 0) >= 1 and summary["outcomes"].get("previous", 0) >= 1


@pytest.mark.parametrize("point", ["stage-renamed", "record-tmp-written"])
def test_crash_during_the_very_first_snapshot_means_no_snapshot(tmp_path, point):
    """Killed before the first record exists: restore says "no snapshot" (missing_ok starts fresh), next writer cleans."""
    import subprocess
    import sys

    from helpers import WORKER, make_snapshots, worker_env

    from pyckpt import DistributedCoordinator, SnapshotNotFoundError, TrainingRuntime, load_config

    path = str(tmp_path / "checkpoint.bin")
    done = subprocess.run([sys.executable, WORKER, path, "--start", "1", "--steps", "3"], capture_output=True,
                          text=True, timeout=120, env=worker_env(PYCKPT_TEST_CRASH_AT=f"{point}:1"))
    assert done.returncode == -9, done.stderr[-2000:]
    assert crash_harness.leftovers(path), "the crash should leave a stage or an unlisted version behind"
    with DistributedCoordinator(load_config(environ={}, cuda_available=lambda: False)) as coord:
        with pytest.raises(SnapshotNotFoundError):
            coord.restore(path, TrainingRuntime())
        assert coord.restore(path, TrainingRuntime(), missing_ok=True) is False
    make_snapshots(path, start=5, steps=1)
    assert crash_harness.verify(path) == 5
    assert not crash_harness.leftovers(path)
