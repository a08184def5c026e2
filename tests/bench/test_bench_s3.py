"""The S3 bench runs end to end (quick mode: 32 MiB, ranks 1,2, against the moto server it starts) and
reports every figure, ratio and target it promises.

No timing assertions (a shared, noisy machine): each figure must be a real, positive number, every
restore was verified (the bench raises if a restored state differs from the saved one, and if the
limit's download differs from its upload), and the server's CPU was counted during each figure.
"""
from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
FIGURES = ["limit.upload", "limit.download", "pyckpt.save", "pyckpt.async_blocked", "pyckpt.async_durable",
           "pyckpt.restore", "dcp.save_t1", "dcp.save_t4", "dcp.restore_t1", "dcp.restore_t4"]


def _positive(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value) and value > 0


def test_quick_s3_benchmark_reports_every_figure(tmp_path):
    out = tmp_path / "s3.json"
    env = {k: v for k, v in os.environ.items() if not k.startswith("AWS_")}   # the bench sets its own
    proc = subprocess.run([sys.executable, "-m", "bench.s3", "--quick", "--out", str(out)],
                          cwd=REPO, env={**env, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)},
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    data = json.loads(out.read_text())
    figures, values = data["figures"], data["values"]
    expected = [f"n{n}.{f}" for n in (1, 2) for f in FIGURES]
    missing = [k for k in expected if k not in figures]
    assert not missing, f"figures missing from the JSON: {missing}"
    for key in expected:
        fig = figures[key]
        assert _positive(fig["median"]) and all(_positive(r) for r in fig["runs"]), (key, fig)
        if key.endswith("async_blocked"):
            continue                                  # measured inside the async figure, no server CPU of its own
        assert all(_positive(c) for c in values[f"{key}.server_cpu"]), key   # the server did the work

    rows = {r["figure"]: r for r in data["rows"]}
    assert sorted(rows) == sorted(expected)
    for n in (1, 2):
        for name in ("save", "async_durable", "restore"):
            row = rows[f"n{n}.pyckpt.{name}"]
            assert _positive(row["mb_per_s"]) and _positive(row["x_limit"]) and _positive(row["dcp_over_this"]), row
        # the limit moves the same bytes: each rank its 1/n of the state, as pyckpt splits replicated state
        per = values[f"n{n}.bytes_per_rank"]
        assert len(per["limit"]) == n and abs(sum(per["limit"]) - values[f"n{n}.state_bytes"]) < n
        assert all(abs(p - s) < 0.01 * s for p, s in zip(per["pyckpt"], per["limit"])), per
    names = [t["target"] for t in data["targets"]]
    assert len(names) == 8 and all(isinstance(t["met"], bool) and _positive(t["value"]) for t in data["targets"])
    for n in (1, 2):
        for want in ("save <= 1.3x the server's upload limit", "restore <= 1.3x the server's download limit",
                     "save >= 2x faster than DCP", "restore >= 2x faster than DCP"):
            assert any(name.startswith(f"{n} rank(s): {want}") for name in names), (n, want)
    assert "targets (issue 19)" in proc.stdout and "n2.pyckpt.restore" in proc.stdout
