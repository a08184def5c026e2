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

import numpy as np
import pytest
import torch

import pyckpt
from pyckpt.errors import IntegrityError
from tests.conftest import clean_env, free_port
from tests.reliability.helpers import chunk_objects, chunk_tables, manifest_json, write_manifest

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
            manifest = chunk_objects(manifest_json(str(base / f"fsdp{n}" / "ck.bin")))
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
    manifest = chunk_objects(manifest_json(str(base / "hsdp4" / "ck.bin")))
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


def test_a_second_snapshot_of_the_same_runtime_reuses_the_layout_and_loads_its_own_bytes(rounds):
    """The job snapshots each trained state again through the same runtime: no rank derives its
    capture again (capture.CaptureCache), the leader reuses its chunk table (commit.KeptTable) with
    the new checksums in it, and a plain process loads the new tensors, each piece checked."""
    base, saved, _ = rounds
    from tests.multiproc.sharded_worker import _digest
    for world in WORLDS:
        for kind, entry in saved[world][0].items():
            assert all(r[kind]["again_derived"] == 0 for r in saved[world]), (kind, world)
            assert entry["tables"] > 0 and entry["again_tables"] == 0, (kind, world)   # rank 0 leads
            assert entry["again"] != entry["digests"], (kind, world)   # trained on: other bytes
            state = pyckpt.load(str(base / f"{kind}{world}-again" / "ck.bin"))
            loaded = {f"model.{k}": _digest(v) for k, v in state["objects"]["model"].items()}
            loaded.update({f"optimizer.{pid}.{key}": _digest(value)
                           for pid, e in state["objects"]["optimizer"]["state"].items() for key, value in e.items()})
            assert loaded == entry["again"], (kind, world)
            if kind == "ddp":
                continue
            first, again = (manifest_json(str(base / f"{kind}{world}{tail}" / "ck.bin")) for tail in ("", "-again"))
            assert first["chunk_table"] == again["chunk_table"], (kind, world)
            assert first["piece_table"]["xxh3"] != again["piece_table"]["xxh3"], (kind, world)
            assert {**first["piece_table"], "xxh3": ""} == {**again["piece_table"], "xxh3": ""}, (kind, world)


def test_inspect_shows_the_global_shape_and_the_layout(rounds):
    base, _, _ = rounds
    out = subprocess.run([sys.executable, "-m", "pyckpt.cli", "inspect", "--chunks", str(base / "hsdp4" / "ck.bin")],
                         capture_output=True, text=True, env=clean_env(COLUMNS="200"), timeout=120)
    assert out.returncode == 0, out.stderr
    assert "4097x6" in out.stdout and "Shard(dim=0)" in out.stdout and "ranks 0,2" in out.stdout, out.stdout


def _copy(rounds, tmp_path: Path) -> Path:
    base, _, _ = rounds
    subprocess.run(["cp", "-a", str(base / "fsdp2" / "ck.bin"), str(base / "fsdp2" / "ck.bin.pyckpt"), str(tmp_path)],
                   check=True)
    return tmp_path / "ck.bin"


def _refused_after(rounds, tmp_path: Path, edit, problem: str, version: int = 3) -> None:
    """Copy the FSDP2 snapshot, edit its largest sharded record in version 2's form (edit(record)),
    write the manifest as `version` (3: the chunk and piece tables pyckpt writes; 2: chunk objects, as
    written before 2026-12-01), recompute the checksums over the edit, and check that loading it is
    refused with `problem`."""
    copy = _copy(rounds, tmp_path)
    body = chunk_objects(manifest_json(str(copy)))
    edit(max((r for r in body["tensors"] if "chunks" in r), key=lambda r: r["nbytes"]))
    write_manifest(str(copy), chunk_tables(body) if version == 3 else body, recompute_record=True)
    with pytest.raises(IntegrityError, match=problem):
        pyckpt.load(str(copy))


def _overlap(record):
    first, second = record["chunks"][0], record["chunks"][1]
    second["offsets"][0] = first["offsets"][0]
    second["sizes"][0], second["pieces"] = first["sizes"][0], first["pieces"]


@pytest.mark.parametrize("version", [3, 2])
@pytest.mark.parametrize("edit, problem", [
    (_overlap, "overlap"),
    (lambda record: record["chunks"].pop(1), "not covered"),
    (lambda record: record["chunks"][1]["offsets"].__setitem__(0, record["shape"][0]), "out of bounds"),
], ids=["overlap", "hole", "out of bounds"])
def test_chunks_that_do_not_tile_are_refused(rounds, tmp_path, edit, problem, version):
    _refused_after(rounds, tmp_path, edit, problem, version)


def _split_mid_element(pieces: list) -> list:
    """The first piece cut after its first byte, inside a float32 element: lengths still add up."""
    first = pieces[0]
    return [dict(first, length=1), dict(first, offset=first["offset"] + 1, length=first["length"] - 1)] + pieces[1:]


def _second(change):
    return lambda record: change(record["chunks"][1])


@pytest.mark.parametrize("version", [3, 2])
@pytest.mark.parametrize("edit, problem", [
    (_second(lambda c: c["offsets"].__setitem__(0, "1x")), r"tensor \d+ chunk 1 offset/size '1x' is not an integer"),
    (_second(lambda c: c["sizes"].__setitem__(0, True)), r"tensor \d+ chunk 1 offset/size 'True' is not an integer"),
    (_second(lambda c: c.update(ranks=["0"])), r"tensor \d+ chunk 1: ranks must be integers"),
    (_second(lambda c: c["pieces"][0].update(xxh3="z" * 16)), r"tensor \d+ chunk 1: piece checksum 'z{16}' is malformed"),
    (_second(lambda c: c["pieces"][0].update(length=c["pieces"][0]["length"] + 4)),
     r"tensor \d+ chunk 1: pieces cover \d+ of \d+ bytes"),
    (_second(lambda c: c["pieces"][0].update(offset=10 ** 12)), r"tensor \d+ chunk 1 piece offset '1000000000000' is not an integer in \[0, \d+\]"),
    (_second(lambda c: c["pieces"][0].update(file=7)), r"tensor \d+ chunk 1 piece file '7' is not an integer in \[0, 1\]"),
    (_second(lambda c: c.update(pieces=_split_mid_element(c["pieces"]))),
     r"tensor \d+ chunk 1: piece length 1 is not a whole number of 4-byte elements"),
], ids=["offset-string", "size-bool", "ranks-strings", "piece-checksum", "piece-length", "piece-offset", "piece-file",
        "piece-mid-element"])
def test_malformed_chunk_fields_are_refused_naming_tensor_and_chunk(rounds, tmp_path, edit, problem, version):
    """The same refusal, in the same words, whether the chunks are version 3's columns (checked in
    bulk, then the bad tensor's rows one by one) or version 2's objects."""
    _refused_after(rounds, tmp_path, edit, problem, version)


@pytest.mark.parametrize("edit, problem", [
    (_second(lambda c: c.update(sizes=c["sizes"][:-1])),
     r"tensor \d+ chunk 1: offsets and sizes must be lists of \d+ integers"),
    (_second(lambda c: c.update(pieces={"0": c["pieces"][0]})), r"tensor \d+ chunk 1 pieces must be a list"),
    (_second(lambda c: c["pieces"][0].update(xxh3="zz")), r"tensor \d+ chunk 1: piece checksum 'zz' is malformed"),
], ids=["sizes-short", "pieces-object", "piece-checksum-short"])
def test_malformed_version_2_chunk_objects_are_refused(rounds, tmp_path, edit, problem):
    """Edits that only chunk objects can hold (version 3's columns have no place for them)."""
    _refused_after(rounds, tmp_path, edit, problem, version=2)


def _tables_edit(change):
    """An edit of the version 3 body itself (its tables)."""
    return lambda body: change(body["chunk_table"], body["piece_table"], body)


def _extra_chunk(chunks: dict) -> None:
    """A chunk of no piece that no tensor names, at the end of the table."""
    chunks["offsets"] += [0, 0]
    chunks["sizes"] += [1, 1]
    chunks["holders"].append(0)
    chunks["pieces"].append(0)


def _largest_chunks(body: dict, count) -> None:
    max((r for r in body["tensors"] if "chunks" in r), key=lambda r: r["nbytes"])["chunks"] = count


@pytest.mark.parametrize("edit, problem", [
    (_tables_edit(lambda c, p, b: c.pop("holders")), "chunk_table must be an object of offsets, sizes, holders"),
    (_tables_edit(lambda c, p, b: p.update(xxh3=list(p["xxh3"]))), "piece_table xxh3 must be a string"),
    (_tables_edit(lambda c, p, b: c["sizes"].pop()), "offsets and sizes one per chunk dimension"),
    (_tables_edit(lambda c, p, b: c["pieces"].__setitem__(0, -1)), r"chunk_table holders and pieces must be counts"),
    (_tables_edit(lambda c, p, b: c["pieces"].__setitem__(0, c["pieces"][0] + 1)), "chunk_table names"),
    (_tables_edit(lambda c, p, b: p.update(xxh3=p["xxh3"][:-1])), "not 16 per piece"),
    (_tables_edit(lambda c, p, b: c["holders"].__setitem__(0, c["holders"][0] + 1)),
     "ranks must hold the holders of each chunk"),
    (_tables_edit(lambda c, p, b: _largest_chunks(b, 10 ** 6)), r"tensor \d+: 1000000 chunks of 2 dimensions run past"),
    (_tables_edit(lambda c, p, b: _largest_chunks(b, 1)), r"tensor \d+: its chunks do not tile"),
    (_tables_edit(lambda c, p, b: _largest_chunks(b, [])), r"tensor \d+ chunks '\[\]' is not an integer"),
    (_tables_edit(lambda c, p, b: _extra_chunk(c)), r"chunk_table holds \d+ chunks \(\d+ offsets\); the tensors name"),
], ids=["column-missing", "xxh3-list", "sizes-short", "count-negative", "count-past-pieces", "xxh3-short",
        "holders-past-ranks", "chunks-past-table", "chunks-too-few", "chunks-list", "chunks-left-over"])
def test_malformed_tables_are_refused(rounds, tmp_path, edit, problem):
    copy = _copy(rounds, tmp_path)
    body = manifest_json(str(copy))
    assert body["format_version"] == 3 and "chunks" not in body["chunk_table"]
    edit(body)
    write_manifest(str(copy), body, recompute_record=True)
    with pytest.raises(IntegrityError, match=problem):
        pyckpt.load(str(copy))


def test_a_version_2_manifest_still_loads_bit_exact(rounds, tmp_path):
    """Snapshots written between 2026-11-30 and 2026-12-01 hold chunk objects (format_version 2):
    the same snapshot with its manifest in that form loads to the same tensors."""
    copy = _copy(rounds, tmp_path)
    expected = pyckpt.load(str(copy))
    write_manifest(str(copy), chunk_objects(manifest_json(str(copy))), recompute_record=True)
    assert pyckpt.Snapshot.open(str(copy)).manifest.format_version == 2
    loaded = pyckpt.load(str(copy))
    assert _same(loaded, expected)


def _same(a, b) -> bool:
    if isinstance(a, torch.Tensor):
        return isinstance(b, torch.Tensor) and a.dtype == b.dtype and a.shape == b.shape and \
            torch.equal(a.contiguous().reshape(-1).view(torch.uint8), b.contiguous().reshape(-1).view(torch.uint8))
    if isinstance(a, np.ndarray):
        return isinstance(b, np.ndarray) and a.dtype == b.dtype and np.array_equal(a, b)
    if isinstance(a, dict):
        return isinstance(b, dict) and a.keys() == b.keys() and all(_same(a[k], b[k]) for k in a)
    if isinstance(a, (list, tuple)):
        return type(a) is type(b) and len(a) == len(b) and all(_same(x, y) for x, y in zip(a, b))
    return a == b
