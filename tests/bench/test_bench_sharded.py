"""The sharded bench runs end to end (quick mode) and reports every figure and target it promises.

No timing assertions (a shared, noisy machine): each figure must be a real number, the per-rank
counters must be there, and every restore was verified (the bench raises if a restored state, or a
plain-process load, differs from the saved state).
"""
from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

from tests.conftest import accepts_direct_io

REPO = Path(__file__).resolve().parents[2]


def _number(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value) and value >= 0


def _expected(direct: bool) -> list[str]:
    limits = ["copy", "write_fdatasync", "read_cold"] + (["write_direct", "read_direct"] if direct else [])
    out = []
    for kind in ("large", "small"):
        for n in (1, 2):
            p = f"{kind}.n{n}"
            out += [f"{p}.limit.{lim}" for lim in limits]
            out += [f"{p}.pyckpt.{m}" for m in ("save", "async_blocked", "restore_cold")]
            out += [f"{p}.dcp.{m}" for m in ("save_t1", "save_t4", "plan_t1", "plan_t4", "get_state_dict",
                                             "async_blocked", "restore_cold")]
            out += [f"{p}.plain.pyckpt.load", f"{p}.plain.limit.read_cold"]
            out += [f"{p}.plain.limit.read_direct", f"{p}.plain.limit.read_fresh"] if direct else []
        for n, m in ((1, 2), (2, 1)):
            out += [f"{kind}.n{n}to{m}.{lib}.restore_cold" for lib in ("pyckpt", "dcp")]
    return out


def test_quick_sharded_benchmark_reports_every_figure(tmp_path):
    out, png = tmp_path / "sharded.json", tmp_path / "sharded.png"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)}
    proc = subprocess.run(
        [sys.executable, "-m", "bench.sharded", "--quick", "--out", str(out), "--png", str(png),
         "--workdir", str(tmp_path / "work")],
        cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    data = json.loads(out.read_text())
    figures, values = data["figures"], data["values"]
    expected = _expected(accepts_direct_io(str(tmp_path)))
    missing = [k for k in expected if k not in figures]
    assert not missing, f"figures missing from the JSON: {missing}"
    for key in expected:
        assert _number(figures[key]["median"]) and figures[key]["median"] > 0, (key, figures[key])

    assert values["large.tensors"] < 100 and values["small.tensors"] == 400
    for kind in ("large", "small"):
        assert len(values[f"{kind}.n2.local_bytes"]) == 2
        assert abs(sum(values[f"{kind}.n2.local_bytes"]) - values[f"{kind}.n1.local_bytes"][0]) < 4096
        for key in (f"{kind}.n2.pyckpt.save", f"{kind}.n1to2.pyckpt.restore_cold", f"{kind}.n2.dcp.restore_cold"):
            per_rank = values[f"{key}.per_rank"]
            assert len(per_rank) == 2, key
            for rank in per_rank:
                assert all(_number(rank[f]) for f in ("rchar", "wchar", "read_bytes", "write_bytes", "rss_extra"))
        # pyckpt's own count of what a resharded restore reads: at least what each rank holds
        reads = [r["shard_read_bytes"] for r in values[f"{kind}.n1to2.pyckpt.restore_cold.per_rank"]]
        assert all(r >= b for r, b in zip(reads, values[f"{kind}.n2.local_bytes"])), reads
        assert values[f"{kind}.n2to1.edge_allowance"][0] > 0

    names = [t["target"] for t in data["targets"]]
    assert all(isinstance(t["met"], bool) and _number(t["value"]) for t in data["targets"])
    for want in ("durable save <= 1.15x O_DIRECT write", "durable save <= 0.8x DCP's best", "one copy",
                 "async_save", "cold restore <= 1.2x", "cold restore <= 0.5x DCP's", "plain-process load",
                 "an O_DIRECT read into new memory",
                 "small tensors save", "small tensors restore_cold", "1 -> 2 ranks: restore <= 1.3x",
                 "2 -> 1 ranks: restore <= 0.35x DCP's", "peak extra RSS"):
        assert any(want in n for n in names), want
        assert want in proc.stdout, want
    assert "targets (issue 16)" in proc.stdout and "large.n1to2.pyckpt.restore_cold" in proc.stdout
    assert png.stat().st_size > 10_000 and png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
