"""`python -m bench.read_paths` reads one file with every pattern it names and checks what it read.

No timing assertions (the machine is shared). Each pattern must have run --repeat times with a positive
time and have a mean disk request size (or none, where the device shows no counters), and the bench
itself compares the bytes of every pattern that fills memory with the file's checksum (it raises, and
the run fails, when they differ). Where the test's directory refuses O_DIRECT only the
buffered pattern runs, and the test asks exactly that."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

from tests.conftest import accepts_direct_io

REPO = Path(__file__).resolve().parents[2]


def test_read_paths_runs_every_pattern_and_checks_the_bytes(tmp_path):
    out, work = tmp_path / "read_paths.json", tmp_path / "work"
    work.mkdir()
    proc = subprocess.run(
        [sys.executable, "-m", "bench.read_paths", "--size-gib", "0.02", "--repeat", "2", "--settle", "0",
         "--workdir", str(work), "--out", str(out)],
        cwd=REPO, env={**os.environ, "OMP_NUM_THREADS": "1"}, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    data = json.loads(out.read_text())
    expected = ["limit", "windows", "windows_copy", "into_pages", "into_scattered", "buffered"] \
        if accepts_direct_io(str(tmp_path)) else ["buffered"]
    assert list(data["seconds"]) == expected, data
    assert all(len(runs) == 2 and min(runs) > 0 for runs in data["seconds"].values()), data
    # the disk's mean request size per pattern, where the kernel shows the device's counters
    assert list(data["request_kib"]) == expected, data
    assert all(kib is None or kib > 0 for kib in data["request_kib"].values()), data
    assert data["bytes"] == int(0.02 * 2**30) // 4096 * 4096, data   # whole 4 KiB blocks
    printed = {line.split()[0] for line in proc.stdout.splitlines() if line and not line.startswith("#")}
    assert set(expected) <= printed, proc.stdout
    assert os.listdir(work) == [], os.listdir(work)   # its file and directory removed
