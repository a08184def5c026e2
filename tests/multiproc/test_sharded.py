"""Sharded state (FSDP2 / HSDP / FSDP2 + tensor parallel) saved on N ranks and restored on M, for every
pair of N, M in {1, 2, 3, 4}, DDP <-> FSDP2 both ways, and in a plain process. Real gloo process groups
on 127.0.0.1, real DTensors, real files (sharded_worker.py runs the ranks).

Oracles: xxh3 of every full tensor of the model and of the optimizer (restored into optimizers that had
not stepped) equals the one at save; training on after an N -> N restore gives bit-identical losses to
the run that was never interrupted; after N -> M the losses equal those of the same snapshot restored
with torch.distributed.checkpoint (the differential reference); bytes read per rank are those the rank
holds, plus at most a piece at each edge of each saved chunk it overlaps.
"""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import pyckpt
from pyckpt.errors import IntegrityError
from tests.conftest import clean_env, free_port
from tests.reliability.helpers import manifest_json, write_manifest

# The module fixture runs 4 jobs (10 ranks) side by side: minutes on 2 loaded cores, past the 600 s default.
pytestmark = [pytest.mark.multiproc, pytest.mark.timeout(1800)]
WORKER = Path(__file__).with_name("sharded_worker.py")
WORLDS = (1, 2, 3, 4)
SMALL_PIECE = 4096     # sharded_worker.SMALL_PIECE


def _results(base: Path, world: int, round_: str) -> list[dict]:
    return [json.loads((base / f"{round_}-{world}-{rank}.json").read_text()) for rank in range(world)]


@pytest.fixture(scope="module")
def rounds(tmp_path_factory) -> tuple[Path, dict, dict]:
    """One job per world size, side by side (each saves, waits for the others, restores them all)."""
    base = tmp_path_factory.mktemp("sharded")
    worlds = ",".join(map(str, WORLDS))
    logs = {world: open(base / f"stderr-{world}.txt", "w") for world in WORLDS}   # no pipe to fill and block
    jobs = {world: subprocess.Popen([sys.executable, str(WORKER), str(world), str(free_port()), str(base), worlds],
                                    env=clean_env(OMP_NUM_THREADS="1"), stdout=subprocess.DEVNULL,
                                    stderr=logs[world]) for world in WORLDS}
    for world, job in jobs.items():
        job.wait(timeout=1200)
        logs[world].close()
    failed = {world: (base / f"stderr-{world}.txt").read_text()[-3000:] for world, job in jobs.items()
              if job.returncode != 0}
    assert not failed, failed
    return base, {w: _results(base, w, "save") for w in WORLDS}, {w: _results(base, w, "restore") for w in WORLDS}


def _source(name: str) -> tuple[str, int]:
    kind = name.rstrip("0123456789")
    return kind, int(name[len(kind):])


def test_every_restore_gives_the_saved_tensors_exactly(rounds):
    _, saved, restored = rounds
    checked = 0
    for world, ranks in restored.items():
        for rank, cases in enumerate(ranks):
            for case, entry in cases.items():
                kind, n = _source(case.split("->")[0])
                expected = saved[n][0][kind]["digests"]
                wrong = sorted(k for k in set(expected) | set(entry["digests"])
                               if expected.get(k) != entry["digests"].get(k))
                assert not wrong, f"{case} on {world} ranks, rank {rank}: {wrong[:6]}"
                checked += 1
    assert checked == sum(len(cases) for ranks in restored.values() for cases in ranks) > 60


def test_training_on_matches_the_uninterrupted_run_and_dcp(rounds):
    _, saved, restored = rounds
    for world, ranks in restored.items():
        for n in WORLDS:
            entry = ranks[0][f"fsdp{n}->fsdp"]
            if n == world:   # same world size: bit-identical to the run that was never stopped
                assert entry["losses"] == saved[n][0]["fsdp"]["losses"][-len(entry["losses"]):], (n, world)
            # any world size: the same as DCP restoring the same state on the same ranks
            assert entry["losses"] == entry["dcp_losses"], (n, world)


def test_each_rank_reads_what_it_holds_plus_at_most_the_edge_pieces(rounds):
    base, _, restored = rounds
    for world, ranks in restored.items():
        for n in WORLDS:
            manifest = manifest_json(str(base / f"fsdp{n}" / "ck.bin"))
            for rank, cases in enumerate(ranks):
                entry = cases[f"fsdp{n}->fsdp"]
                allowance = 2 * SMALL_PIECE * _overlaps(manifest, world, rank)
                assert entry["needed"] <= entry["read"] <= entry["needed"] + allowance, (n, world, rank)
                if n == world:
                    assert entry["read"] == entry["needed"], (n, world, rank)


def _overlaps(manifest: dict, world: int, rank: int) -> int:
    """(saved chunk, this rank's rows) overlaps of the multi-piece sharded tensors, FSDP2 rows being
    torch.chunk's: each may cost a piece at its two edges."""
    count = 0
    for record in manifest["tensors"]:
        if "chunks" not in record or record["nbytes"] <= SMALL_PIECE:
            continue
        rows = record["shape"][0]
        size = -(-rows // world)
        lo, hi = min(rank * size, rows), min((rank + 1) * size, rows)
        count += sum(1 for c in record["chunks"] if c["offsets"][0] < hi and lo < c["offsets"][0] + c["sizes"][0])
    return count


def test_hsdp_writes_each_byte_once(rounds):
    base, saved, _ = rounds
    manifest = manifest_json(str(base / "hsdp4" / "ck.bin"))
    sharded = sum(r["nbytes"] for r in manifest["tensors"] if "chunks" in r)
    parts = sum(len(c["pieces"]) for r in manifest["tensors"] if "chunks" in r for c in r["chunks"])
    other = sum(r["nbytes"] for r in manifest["tensors"] if "chunks" not in r)
    written = [saved[4][rank]["hsdp"]["written"] for rank in range(4)]
    assert sum(written) == sum(f["size"] for f in manifest["files"])
    # replicas hold each shard twice; written once, the files hold it once (plus 64-byte alignment)
    assert sharded + other <= sum(written) <= sharded + other + 64 * (parts + len(manifest["tensors"]))
    assert all(w > 0 for w in written), written
    holders = {tuple(c["ranks"]) for r in manifest["tensors"] if "chunks" in r for c in r["chunks"]}
    assert holders == {(0, 2), (1, 3)}, holders     # (replicate, shard) mesh: replicas 0/2 and 1/3


def test_a_plain_process_loads_full_tensors(rounds):
    base, saved, _ = rounds
    from tests.multiproc.sharded_worker import _digest
    for name in ("fsdp4", "fsdp3", "hsdp4", "tp4"):
        kind, n = _source(name)
        state = pyckpt.load(str(base / name / "ck.bin"))
        model = {f"model.{k}": _digest(v) for k, v in state["objects"]["model"].items()}
        expected = saved[n][0][kind]["digests"]
        assert model == {k: v for k, v in expected.items() if k.startswith("model.")}, name
        optimizer = {f"optimizer.{pid}.{key}": _digest(value)
                     for pid, entry in state["objects"]["optimizer"]["state"].items() for key, value in entry.items()}
        assert optimizer == {k: v for k, v in expected.items() if k.startswith("optimizer.")}, name
        assert all(type(v) is torch.Tensor for v in state["objects"]["model"].values())


def test_inspect_shows_the_global_shape_and_the_layout(rounds):
    base, _, _ = rounds
    out = subprocess.run([sys.executable, "-m", "pyckpt.cli", "inspect", "--chunks", str(base / "hsdp4" / "ck.bin")],
                         capture_output=True, text=True, env=clean_env(COLUMNS="200"), timeout=120)
    assert out.returncode == 0, out.stderr
    assert "4097x6" in out.stdout and "Shard(dim=0)" in out.stdout and "ranks 0,2" in out.stdout, out.stdout


def _refused_after(rounds, tmp_path: Path, edit, problem: str) -> None:
    """Copy the FSDP2 snapshot, edit its largest sharded record (edit(record)), recompute the
    checksums over the edit, and check that loading it is refused with `problem`."""
    base, _, _ = rounds
    copy = tmp_path / "ck.bin"
    subprocess.run(["cp", "-a", str(base / "fsdp2" / "ck.bin"), str(base / "fsdp2" / "ck.bin.pyckpt"), str(tmp_path)],
                   check=True)
    body = manifest_json(str(copy))
    edit(max((r for r in body["tensors"] if "chunks" in r), key=lambda r: r["nbytes"]))
    write_manifest(str(copy), body, recompute_record=True)
    with pytest.raises(IntegrityError, match=problem):
        pyckpt.load(str(copy))


def _overlap(record):
    first, second = record["chunks"][0], record["chunks"][1]
    second["offsets"][0] = first["offsets"][0]
    second["sizes"][0], second["pieces"] = first["sizes"][0], first["pieces"]


@pytest.mark.parametrize("edit, problem", [
    (_overlap, "overlap"),
    (lambda record: record["chunks"].pop(1), "not covered"),
    (lambda record: record["chunks"][1]["offsets"].__setitem__(0, record["shape"][0]), "out of bounds"),
], ids=["overlap", "hole", "out of bounds"])
def test_chunks_that_do_not_tile_are_refused(rounds, tmp_path, edit, problem):
    _refused_after(rounds, tmp_path, edit, problem)


def _split_mid_element(pieces: list) -> list:
    """The first piece cut after its first byte, inside a float32 element: lengths still add up."""
    first = pieces[0]
    return [dict(first, length=1), dict(first, offset=first["offset"] + 1, length=first["length"] - 1)] + pieces[1:]


def _second(change):
    return lambda record: change(record["chunks"][1])


@pytest.mark.parametrize("edit, problem", [
    (_second(lambda c: c["offsets"].__setitem__(0, "1x")), r"tensor \d+ chunk 1 offset/size '1x' is not an integer"),
    (_second(lambda c: c.update(sizes=c["sizes"][:-1])),
     r"tensor \d+ chunk 1: offsets and sizes must be lists of \d+ integers"),
    (_second(lambda c: c.update(ranks=["0"])), r"tensor \d+ chunk 1: ranks must be integers"),
    (_second(lambda c: c.update(pieces={"0": c["pieces"][0]})), r"tensor \d+ chunk 1 pieces must be a list"),
    (_second(lambda c: c["pieces"][0].update(xxh3="zz")), r"tensor \d+ chunk 1: piece checksum 'zz' is malformed"),
    (_second(lambda c: c.update(pieces=_split_mid_element(c["pieces"]))),
     r"tensor \d+ chunk 1: piece length 1 is not a whole number of 4-byte elements"),
], ids=["offset-string", "sizes-short", "ranks-strings", "pieces-object", "piece-checksum", "piece-mid-element"])
def test_malformed_chunk_fields_are_refused_naming_tensor_and_chunk(rounds, tmp_path, edit, problem):
    _refused_after(rounds, tmp_path, edit, problem)
