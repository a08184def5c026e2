"""`python -m bench.phases` runs and times every phase it names, on the DDP state and on the sharded one.

No timing assertions (the machine is shared): each named phase must have been timed (a row: its timer
ran; a phase of under half a millisecond prints 0.000, as the check of objects read in place does on this
small state), the totals must be positive, and every restore is checked by the bench itself (it raises when the restored
state differs from the saved one, and the run then fails). The sharded run is a real 1-rank gloo
group on loopback with FSDP2 (fully_shard), and its restores read cold (page cache dropped)."""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
COMMON = ["restore.open", "restore.check", "restore.match", "restore.plan", "restore.read", "restore.read.wait",
          "restore.tree", "restore.load", "limit.torch_load", "save.total", "save.capture", "save.write", "async.stall"]


def _phases(tmp_path: Path, *extra: str) -> dict[str, tuple[float, float]]:
    proc = subprocess.run(
        [sys.executable, "-m", "bench.phases", "--size-gib", "0.01", "--small-tensors", "400", "--repeat", "2",
         "--workdir", str(tmp_path), *extra],
        cwd=REPO, env={**os.environ, "OMP_NUM_THREADS": "1"}, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    rows = {}
    for line in proc.stdout.splitlines():
        parts = line.split()
        if len(parts) == 3 and not line.startswith("#") and parts[0] != "phase":
            rows[parts[0]] = (float(parts[1]), float(parts[2]))
    return rows


@pytest.mark.parametrize("mode", ["ddp", "sharded"])
def test_phases_times_every_phase_it_names(tmp_path, mode):
    extra = ("--sharded", "--cold") if mode == "sharded" else ()
    rows = _phases(tmp_path, *extra)
    expected = COMMON + (["restore_cold.total", "restore.targets"] if mode == "sharded" else ["restore_warm.total"])
    missing = [key for key in expected if key not in rows]
    assert not missing, (missing, rows)
    assert all(0 <= low <= median for low, median in (rows[key] for key in expected)), rows
    totals = ["save.total", "restore_cold.total" if mode == "sharded" else "restore_warm.total"]
    assert all(rows[key][0] > 0 for key in totals), rows
    if mode == "ddp":
        assert "restore_cold.total" not in rows, rows   # warm unless --cold
