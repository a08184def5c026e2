"""A job whose world size changes between restarts (4 -> 2 -> 3 ranks, as torchrun's elastic rendezvous
does when nodes leave and come back) trains every sample of the epoch exactly once.

Real: train.py under torchrun with gloo on 127.0.0.1, FSDP2 (sharded state resharded at each restart),
snapshots on disk; train.py's --sample-log records the indices each rank trained at each step.
"""
from __future__ import annotations

import re
from collections import Counter
from pathlib import Path

import pytest

import pyckpt
from tests.conftest import torchrun

pytestmark = pytest.mark.multiproc

BATCH = 8
# 4 ranks x 3 steps + 2 ranks x 3 steps + 3 ranks x 4 steps = 96 + 48 + 96: the epoch ends on a full batch.
SAMPLES = 240
LEGS = [(4, 3), (2, 6), (3, 11)]   # (ranks, the step this leg runs to); step 11 is the next epoch's first


def _trained(log: Path) -> list[tuple[int, int, int, list[int]]]:
    rows = []
    for path in sorted(log.parent.glob(f"{log.name}.rank*")):
        for line in path.read_text().splitlines():
            m = re.fullmatch(r"step=(\d+) epoch=(\d+) world=(\d+) samples=([\d,]+)", line)
            assert m, f"{path}: {line!r}"
            rows.append((int(m[1]), int(m[2]), int(m[3]), [int(i) for i in m[4].split(",")]))
    return rows


def test_every_sample_of_the_epoch_is_trained_once_across_world_size_changes(tmp_path):
    path, log = tmp_path / "ck" / "checkpoint.bin", tmp_path / "samples"
    for ranks, until in LEGS:
        out = torchrun(ranks, ["--steps", str(until), "--checkpoint-interval", "100", "--batch-size", str(BATCH),
                               "--samples", str(SAMPLES), "--parallel", "fsdp", "--snapshot-path", str(path),
                               "--sample-log", str(log), "--log-every", "1000"], timeout=300).stdout
        assert f"group: world_size={ranks} nodes=1 node_rank=0" in out, out[-2000:]
        if ranks != LEGS[0][0]:
            assert re.search(r"resumed from \S+ at step \d+ \(epoch 0, sample \d+\)", out), out[-2000:]
        assert pyckpt.load(path)["progress"]["step"] == until

    rows = _trained(log)
    steps = sorted({row[0] for row in rows})
    assert steps == list(range(1, 12)), steps
    for step, epoch, world, samples in rows:   # each step ran at its leg's world size, every rank a full batch
        assert world == next(r for r, until in LEGS if step <= until) and len(samples) == BATCH
    seen = Counter(i for step, epoch, world, samples in rows if epoch == 0 for i in samples)
    assert sorted(seen) == list(range(SAMPLES)), f"missing: {sorted(set(range(SAMPLES)) - set(seen))[:20]}"
    assert max(seen.values()) == 1, f"trained twice: {[i for i, n in seen.items() if n > 1][:20]}"
    # Step 11 opened epoch 1 on 3 ranks: a fresh permutation, 24 distinct samples.
    first = [i for step, epoch, world, samples in rows if step == 11 for i in samples]
    assert {row[1] for row in rows if row[0] == 11} == {1} and len(set(first)) == 3 * BATCH
    assert pyckpt.load(path)["objects"]["data"] == {"samples": SAMPLES, "seed": 1234, "shuffle": True,
                                                    "epoch": 1, "position": 3 * BATCH}
