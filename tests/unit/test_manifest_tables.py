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
import re

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from pyckpt.boxes import Box
from pyckpt.commit import KeptTable, _chunk_rows
from pyckpt.errors import IntegrityError, SnapshotError
from pyckpt.manifest import Chunk, ChunkRows, FileRecord, Manifest, Piece, TensorRecord
from pyckpt.shards import SHARD_PIECE, pieces_of
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


# -- the leader's table (commit._chunk_rows) and the rows a reader hands out -------------------------

def _part(tensor, offsets, sizes, start, length, rank, file_offset, ranks=(0,)):
    """A part as a rank reports it, its pieces' digests made up from where it lies."""
    count = len(pieces_of(length)) if length > SHARD_PIECE else 1
    return (tensor, tuple(offsets), tuple(sizes), start, length, tuple(ranks), rank, file_offset,
            [f"{rank:04x}{file_offset + i:012x}" for i in range(count)])


def _leader_records(parts, shapes):
    """What the leader makes of these parts: each numbered with where its digests start among all
    of them (rank after rank, as the leader concatenates them), the table built, then filled."""
    records = [TensorRecord("float32", list(shape), math.prod(shape) * 4, [], []) for shape in shapes]
    digests, numbered = [], []
    for part in sorted(parts, key=lambda p: p[6]):
        numbered.append((*part, len(digests)))
        digests += part[8]
    kept = KeptTable()
    _chunk_rows(records, numbered, {"L": [{"S": i} for i in range(len(shapes))]}, kept)
    kept.fill(records, digests)
    return records


def test_the_leaders_table_holds_each_box_once_in_order_with_its_holders_pieces():
    # tensor 0: two dim-0 slabs, reported out of order; the first split between two holders (HSDP);
    # tensor 1: a 0-d tensor; tensor 2: column blocks (not slabs: check_tiling decides); tensor 3: one
    # slab longer than a piece
    big = SHARD_PIECE // 4 + 1           # elements of a (1, big) float32 slab: a part of 2 pieces
    parts = [_part(0, [2, 0], [2, 3], 0, 24, 1, 0, (1,)),
             _part(0, [0, 0], [2, 3], 12, 12, 1, 24, (0, 1)), _part(0, [0, 0], [2, 3], 0, 12, 0, 0, (0, 1)),
             _part(1, [], [], 0, 4, 0, 12),
             _part(2, [0, 2], [2, 2], 0, 16, 1, 36, (1,)), _part(2, [0, 0], [2, 2], 0, 16, 0, 16),
             _part(3, [0, 0], [1, big], 0, 4 * big, 0, 64)]
    records = _leader_records(parts, [(4, 3), (), (2, 4), (1, big)])
    assert all(type(r.chunks) is ChunkRows for r in records)
    table = records[0].chunks.table
    assert all(r.chunks.table is table for r in records)
    assert table.offsets == [0, 0, 2, 0, 0, 0, 0, 2, 0, 0] and table.sizes == [2, 3, 2, 3, 2, 2, 2, 2, 1, big]
    assert table.holders == [2, 1, 1, 1, 1, 1] and table.ranks == [0, 1, 1, 0, 0, 1, 0]
    assert table.pieces == [2, 1, 1, 1, 1, 2]
    assert table.file == [0, 1, 1, 0, 0, 1, 0, 0] and table.offset == [0, 24, 0, 12, 16, 36, 64, 64 + SHARD_PIECE]
    assert table.length == [12, 12, 24, 4, 16, 16, SHARD_PIECE, 4 * big - SHARD_PIECE]
    assert len(table.xxh3) == 16 * 8 and table.xxh3.startswith("0000000000000000" + "0001000000000018")
    assert [c.box for c in records[0].chunks] == [Box((0, 0), (2, 3)), Box((2, 0), (2, 3))]
    assert records[2].chunks.pieces_at((0, 2), (2, 2)) == records[2].chunks[1].pieces   # the second with offset 0 in dim 0
    assert records[2].chunks.pieces_at((0, 2), (2, 1)) is None and records[0].chunks.pieces_at((1, 0), (2, 3)) is None
    assert records[1].chunks.pieces_at((), ()) == [Piece(0, 12, 4, "000000000000000c")]
    files = [FileRecord("data-0.bin", 64 + 4 * big), FileRecord("data-1.bin", 52)]
    data = Manifest(2, files, records, {"L": [{"S": i} for i in range(4)]}, [{"D": []}, {"D": []}], {}).to_json()
    assert json.loads(data)["chunk_table"] == table.to_json()[0]
    assert Manifest.from_json(data, "manifest.json").tensors == records


@pytest.mark.parametrize("parts, problem", [
    ([_part(0, [0], [4], 0, 8, 0, 0), _part(0, [0], [4], 12, 4, 1, 0)],
     "bytes 8-12 of the box at [0] were written by no rank"),
    ([_part(0, [0], [4], 0, 12, 0, 0)], "the box at [0] has 12 bytes written, not 16"),
    ([_part(0, [0], [3], 0, 12, 0, 0), _part(0, [2], [2], 0, 8, 1, 0)], "overlap"),
    ([_part(0, [0], [3], 0, 12, 0, 0)], "hole"),
    ([], "hole"),
])
def test_the_leader_refuses_parts_that_do_not_cover_or_tile_naming_the_tensor(parts, problem):
    with pytest.raises(SnapshotError, match=r"sharded tensor '\[0\]' of shape \[4\]: .*" + re.escape(problem)
                       + r".*not hold a consistent layout"):
        _leader_records(parts, [(4,)])


def test_a_restore_on_the_saved_layout_makes_no_chunk_object():
    parts = [_part(0, [r, 0], [1, 2], 0, 8, r, 0, (r,)) for r in range(4)]
    records = _leader_records(parts, [(4, 2)])
    files = [FileRecord(f"data-{r}.bin", 8) for r in range(4)]
    data = Manifest(4, files, records, {"L": [{"S": 0}]}, [{"D": []}] * 4, {}).to_json()
    rows = Manifest.from_json(data, "manifest.json").tensors[0].chunks
    assert type(rows) is ChunkRows and len(rows) == 4
    assert rows.pieces_at((2, 0), (1, 2)) == [Piece(2, 0, 8, "0002000000000000")]
    assert rows._made is None          # no chunk was made
    assert rows.pieces_at((2, 0), (2, 2)) is None
    assert rows[2] == Chunk([2, 0], [1, 2], [Piece(2, 0, 8, "0002000000000000")], [2])
    assert rows == list(rows) and rows._made is not None
