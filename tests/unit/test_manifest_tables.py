"""The manifest's sharded tensors in format_version 3 (chunk and piece tables) against version 2 (chunk
objects), on random layouts: pyckpt writes version 3 and reads back the records it wrote; the same
manifest rewritten as version 2 (tests/reliability/helpers.chunk_objects, written apart from pyckpt's
encoder) reads to the same records; and one bad field, put in the version 2 form and carried into
both versions, is refused by both in the same words (version 3 checks its columns in bulk and falls
back to version 2's field checks to name the field)."""
from __future__ import annotations

import itertools
import json
import math

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from pyckpt.errors import IntegrityError
from pyckpt.manifest import Chunk, FileRecord, Manifest, Piece, TensorRecord
from tests.reliability.helpers import chunk_objects, chunk_tables

ITEMSIZE = {"float32": 4, "bfloat16": 2, "float64": 8, "uint8": 1}


@st.composite
def sharded_records(draw) -> tuple[list[TensorRecord], list[int]]:
    """Sharded tensors of 0-3 dims cut on a random grid (chunks in any order, several holders, each
    chunk's bytes in pieces of whole elements) in two files, and a whole tensor between them."""
    file_sizes = [0, 0]
    records = []
    for _ in range(draw(st.integers(1, 4))):
        dtype = draw(st.sampled_from(sorted(ITEMSIZE)))
        itemsize = ITEMSIZE[dtype]
        shape = draw(st.lists(st.integers(1, 5), max_size=3))
        cuts = [sorted(set(draw(st.lists(st.integers(1, n - 1), max_size=2)) if n > 1 else [])) for n in shape]
        spans = [list(zip([0] + c, c + [n])) for c, n in zip(cuts, shape)]
        boxes = [([a for a, _ in box], [b - a for a, b in box]) for box in itertools.product(*spans)]
        order = draw(st.permutations(range(len(boxes))))
        chunks = []
        for k in order:
            offsets, sizes = boxes[k]
            elements = math.prod(sizes)
            splits = sorted(set(draw(st.lists(st.integers(1, elements - 1), max_size=2)) if elements > 1 else []))
            pieces = []
            for lo, hi in zip([0] + splits, splits + [elements]):
                file = draw(st.integers(0, 1))
                pieces.append(Piece(file, file_sizes[file], (hi - lo) * itemsize, f"{draw(st.integers(0, 2**64 - 1)):016x}"))
                file_sizes[file] += (hi - lo) * itemsize
            chunks.append(Chunk(offsets, sizes, pieces, draw(st.lists(st.integers(0, 1), min_size=1, max_size=2))))
        nbytes = math.prod(shape) * itemsize
        records.append(TensorRecord(dtype, shape, nbytes, [], chunks, f"(Shard(dim={len(shape) - 1}),)"))
    records.insert(draw(st.integers(0, len(records))),
                   TensorRecord("int64", [3], 24, [Piece(0, file_sizes[0], 24, "0123456789abcdef")]))
    file_sizes[0] += 24
    return records, file_sizes


def _manifest(records: list[TensorRecord], file_sizes: list[int]) -> Manifest:
    tree = {"L": [{"S" if r.chunks is not None else "T": i} for i, r in enumerate(records)]}
    files = [FileRecord(f"data-{r}.bin", size) for r, size in enumerate(file_sizes)]
    return Manifest(2, files, records, tree, [{"D": []}, {"D": []}], {"step": 1})


def _read(body: dict) -> Manifest:
    return Manifest.from_json(json.dumps(body, separators=(",", ":")).encode(), "manifest.json")


@settings(max_examples=150, deadline=None)
@given(sharded_records())
def test_version_3_reads_back_what_it_wrote_and_version_2_reads_the_same(case):
    records, file_sizes = case
    data = _manifest(records, file_sizes).to_json()
    body = json.loads(data)
    assert body["format_version"] == 3 and all(type(t.get("chunks", 0)) is int for t in body["tensors"])
    assert Manifest.from_json(data, "manifest.json").tensors == records
    old = chunk_objects(body)
    assert old["format_version"] == 2 and "chunk_table" not in old
    assert _read(old).tensors == records
    assert chunk_tables(old) == body            # the helpers are each other's inverse on what pyckpt writes


def _bad_fields(itemsize: int) -> list:
    """One bad field each: (name, edit of a version 2 chunk object; a 0-d chunk has no offsets or
    sizes, so those edits put another bad field in it)."""
    return [
        ("offset past the file", lambda c: c["pieces"][0].update(offset=10**9)),
        ("file out of range", lambda c: c["pieces"][0].update(file=2)),
        ("negative length", lambda c: c["pieces"][0].update(length=-1)),
        ("length a float", lambda c: c["pieces"][0].update(length=float(c["pieces"][0]["length"]))),
        ("length one element more", lambda c: c["pieces"][0].update(length=c["pieces"][0]["length"] + itemsize)),
        ("digest not hex", lambda c: c["pieces"][0].update(xxh3="g" + c["pieces"][0]["xxh3"][1:])),
        ("offset a bool", lambda c: c["offsets"].__setitem__(0, False) if c["offsets"] else c.update(ranks=[True])),
        ("size zero", lambda c: c["sizes"].__setitem__(0, 0) if c["sizes"] else c.update(ranks=["0"])),
        ("size huge", lambda c: c["sizes"].__setitem__(0, 2**49) if c["sizes"] else c.update(ranks=[None])),
        ("offset shifted", lambda c: c["offsets"].__setitem__(0, c["offsets"][0] + 1)
         if c["offsets"] else c["pieces"][0].update(offset=-1)),
        ("rank a string", lambda c: c.update(ranks=["1"])),
    ]


@settings(max_examples=150, deadline=None)
@given(sharded_records(), st.data())
def test_one_bad_field_is_refused_by_both_versions_in_the_same_words(case, data):
    records, file_sizes = case
    old = chunk_objects(json.loads(_manifest(records, file_sizes).to_json()))
    sharded = [t for t in old["tensors"] if "chunks" in t]
    record = data.draw(st.sampled_from(sharded))
    chunk = data.draw(st.sampled_from(record["chunks"]))
    name, edit = data.draw(st.sampled_from(_bad_fields(ITEMSIZE[record["dtype"]])))
    edit(chunk)
    outcomes = []
    for body in (old, chunk_tables(old)):
        try:
            _read(body)
            outcomes.append(None)
        except IntegrityError as exc:
            outcomes.append(str(exc))
    assert outcomes[0] is not None, f"version 2 took {name}"
    assert outcomes[1] == outcomes[0], name


def test_a_piece_cut_mid_element_is_named_in_version_3_too():
    records = [TensorRecord("float32", [4], 16, [], [Chunk([0], [2], [Piece(0, 0, 8, "0" * 16)], [0]),
                                                     Chunk([2], [2], [Piece(0, 8, 3, "1" * 16),
                                                                      Piece(0, 11, 5, "2" * 16)], [1])])]
    data = Manifest(1, [FileRecord("data-0.bin", 16)], records, {"L": [{"S": 0}]}, [{"D": []}], {}).to_json()
    with pytest.raises(IntegrityError, match=r"tensor 0 chunk 1: piece length 3 is not a whole number of 4-byte"):
        Manifest.from_json(data, "manifest.json")
    with pytest.raises(IntegrityError, match=r"tensor 0 chunk 1: piece length 3 is not a whole number of 4-byte"):
        _read(chunk_objects(json.loads(data)))
