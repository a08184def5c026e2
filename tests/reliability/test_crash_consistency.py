"""SIGKILL snapshotting jobs (1 rank, 2 gloo ranks, async) at random moments and at each named phase.

CI runs a short series (PYCKPT_CRASH_TRIALS, default 21: every job, both kill kinds, every phase);
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
    trials = int(os.environ.get("PYCKPT_CRASH_TRIALS", "21"))
    seed = int(os.environ.get("PYCKPT_CRASH_SEED", random.randrange(1 << 30)))
    lines: list[str] = []
    try:
        summary = crash_harness.run(trials, seed, str(tmp_path), log=lines.append)
    except crash_harness.HarnessFailure as exc:
        pytest.fail(f"seed {seed}: {exc}\n" + "\n".join(lines[-20:]))
    print("\n".join(lines))
    assert summary["trials"] == trials
    assert set(summary["by_job_and_kill"]) == {f"{j}/{k}" for j in crash_harness.JOBS for k in ("point", "random")}
    if trials >= 21:
        assert set(summary["by_point"]) == set(crash_harness.STORAGE_POINTS + crash_harness.RANK_POINTS)
        assert summary["two_rank_trials_killing_one_rank"] >= 1
    # Both outcomes are legal; over a series the named phases after the record rename give "new".
    assert summary["outcomes"].get("new", 0) >= 1 and summary["outcomes"].get("previous", 0) >= 1
