"""Sharded tensors at the edges, on 2 real gloo ranks (one spawn, edge_worker.py): bf16, fp16,
float8_e4m3fn (random bits, NaN patterns included), int64 without grad, a 0-d Replicate DTensor, a
1-row tensor whose second shard is empty, a Shard(1) tensor with an odd column count (strided reads)
and a Replicate tensor over 1 MiB whose bytes its two holders split. Also: a Partial DTensor is
refused naming its key, and an FSDP1 model or an optimizer over FSDP1 flat parameters is refused at
registration with what to do instead.

Oracle: the tensors made from the same seed here; compared as bytes, so NaNs and -0.0 count."""
from __future__ import annotations

import json

import pytest
import torch
import torch.multiprocessing as mp

import pyckpt
from tests.conftest import free_port
from tests.multiproc.edge_worker import LAYOUTS, full_values, main
from tests.reliability.helpers import chunk_objects, manifest_json

pytestmark = pytest.mark.multiproc


@pytest.fixture(scope="module")
def ranks(tmp_path_factory):
    base = tmp_path_factory.mktemp("edges")
    path, out = str(base / "ck.bin"), str(base / "result")
    mp.spawn(main, args=(free_port(), path, out), nprocs=2, join=True)
    results = []
    for rank in range(2):
        with open(f"{out}.{rank}") as f:
            results.append(json.load(f))
    return path, results


def test_edge_dtypes_and_shapes_restore_bit_exact_on_the_same_ranks(ranks):
    """Proves: each rank's shard of every edge tensor comes back byte for byte into a zeroed DTensor
    of the same layout (read in place, still a DTensor), and the zeros differed beforehand; a plain
    buffer of the same model that cannot be read in place (as on a GPU) does not stop that."""
    _, results = ranks
    for rank, result in enumerate(results):
        assert result["zeroed_differs"] and result["still_dtensors"], rank
        assert result["strided"] == [0.0, 2.0, 4.0, 6.0, 8.0], rank
        wrong = [name for name in LAYOUTS if result["restored"][name] != result["expected"][name]]
        assert not wrong, f"rank {rank}: {wrong}"
    assert results[1]["expected"]["one_row"] == []      # the empty shard really is empty


def test_a_changed_model_restored_with_strict_false_gets_its_shards(ranks):
    """Proves: a sharded model whose structure differs from the saved one (an extra layer, restored
    with strict=False) reads its tensors whole and still loads each rank's shard of them, bit-exact
    (it failed with torch's "mixed torch.Tensor and DTensor")."""
    _, results = ranks
    for rank, result in enumerate(results):
        wrong = [name for name in LAYOUTS if result["changed"][name] != result["expected"][name]]
        assert not wrong, f"rank {rank}: {wrong}"


def test_a_plain_process_loads_every_full_tensor_bit_exact(ranks):
    """Proves: pyckpt.load assembles the full tensors from the chunks of both ranks' files (strided
    columns, the empty shard, the 0-d tensor, float8 bytes)."""
    path, _ = ranks
    state = pyckpt.load(path)["objects"]["model"]
    values = full_values()
    for name, value in values.items():
        got = state[name]
        assert type(got) is torch.Tensor and got.dtype == value.dtype and got.shape == value.shape, name
        assert torch.equal(got.reshape(-1).view(torch.uint8), value.reshape(-1).view(torch.uint8)), name


def test_a_replicated_tensor_over_1_mib_is_written_half_by_each_holder(ranks):
    """Proves: the two holders of the Replicate tensor each write part of it (the manifest's pieces
    are in both ranks' files) and no byte twice; the small replicated 0-d tensor is written once."""
    path, _ = ranks
    manifest = chunk_objects(manifest_json(path))
    names = list(LAYOUTS)
    records = [r for r in manifest["tensors"] if "chunks" in r]
    assert len(records) == len(names)
    big = next(r for r in records if r["shape"] == [300, 1000])
    (chunk,) = big["chunks"]
    assert chunk["ranks"] == [0, 1]
    files = {p["file"] for p in chunk["pieces"]}
    assert files == {0, 1}, files
    assert sum(p["length"] for p in chunk["pieces"]) == big["nbytes"] == 300 * 1000 * 4
    scalar = next(r for r in records if r["shape"] == [])
    assert [sum(p["length"] for p in c["pieces"]) for c in scalar["chunks"]] == [4]


def test_a_partial_placement_is_refused_naming_the_key(ranks):
    """Proves: a DTensor holding pending partial sums is not written as if it were data: the snapshot
    fails on both ranks (a SnapshotError, as every failed snapshot on several ranks; the capture's
    TypeError is its cause where it was raised) with the key of the tensor and what to do."""
    _, results = ranks
    for rank, result in enumerate(results):
        message = result["partial"]
        assert message.startswith("SnapshotError: snapshot to "), message
        assert ": TypeError: cannot snapshot replicated['objects']['x']['p']: it has a Partial placement" \
            in message and ".redistribute()" in message, message
    assert results[0]["partial_cause"] == "TypeError"


def test_fsdp1_models_and_their_optimizers_are_refused_with_what_to_do(ranks):
    """Proves: FSDP1 (flat, per-rank optimizer state that the divergence check would refuse only at
    the first snapshot, with a message about diverged ranks) is refused at registration, pointing to
    FSDP2 fully_shard or DDP."""
    _, results = ranks
    for result in results:
        for what in ("fsdp1_model", "fsdp1_optimizer"):
            message = result[what]
            assert message.startswith("TypeError: ") and "FSDP1" in message, (what, message)
            assert "fully_shard" in message and "DistributedDataParallel" in message, (what, message)
