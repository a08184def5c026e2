"""The snapshot format: the manifest and the commit record (docs/FORMAT.md; state trees: tree.py).

Everything here is JSON plus raw tensor bytes: nothing in a snapshot can execute code when loaded.
Every field read from disk is validated before it is used, so a hostile or corrupted manifest
raises IntegrityError instead of allocating huge memory or touching paths outside the snapshot.
"""
from __future__ import annotations

import bisect
import itertools
import json
import math
import re
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np
import xxhash

from .boxes import Box, check_tiling, dim0_slabs_in_order
from .errors import IntegrityError, SnapshotError
from .tree import ARRAY, NUMPY_KINDS, SHARDED, TENSOR, TORCH_DTYPES, tensor_paths, validate

# Manifest versions: 2 added chunked (sharded) tensors, each chunk an object with its pieces; 3 stores
# every chunk and piece in two tables of columns instead (a 20k-tensor FSDP2 state on 4 ranks has 60k
# chunks: half the bytes, and a reader checks the columns in bulk). A snapshot without sharded tensors
# is written as version 1, which pyckpt before sharded state reads too; this pyckpt reads all three.
FORMAT_VERSION = 3
PLAIN_VERSION = 1
OBJECT_CHUNKS = 2               # the version whose chunks are objects inside their tensor (read only)
READ_VERSIONS = (1, 2, 3)
COMMIT_VERSION = 1              # the commit record's own format
MAX_CHUNKS = 1 << 20            # chunks of one tensor (a hostile manifest may not make tiling checks slow)
ALIGN = 64                      # every tensor starts on a 64-byte boundary in its file
# A replicated tensor is checksummed (and read) in pieces of at most 16 MiB: fine enough for ranks that
# split a restore to copy each other's pieces while the next ones are still being read (peers.py).
# Sharded tensors are cut finer (shards.SHARD_PIECE); readers take pieces of any size.
MAX_PIECE = 16 << 20
MAX_DIM_PRODUCT = 1 << 48       # no shape may claim more elements than this
MAX_MANIFEST = 1 << 30          # bytes; a commit record naming a larger manifest is refused
# Decoding JSON costs up to ~30x its bytes in memory for dense empty containers ('{"L":[]}' padding);
# pyckpt's own encoding has at least BYTES_PER_NODE bytes per '{' or '[' (dicts of plain values:
# '[0,{"V":0}],' is 12 bytes for 2), so a manifest may hold no more than that, which keeps the
# memory of loading it at about 25x its size.
BYTES_PER_NODE = 6
MAX_TIME = 253_402_300_799      # 9999-12-31 23:59:59 UTC: the latest time a snapshot may claim
DATA_FILE = re.compile(r"^data-(0|[1-9][0-9]{0,5})\.bin$")
VERSION_NAME = re.compile(r"^v[0-9]{8}$")
_HEX16 = re.compile(r"[0-9a-f]{16}")
_HEX = re.compile(r"[0-9a-f]*")

_ITEMSIZE = {name: dtype.itemsize for name, dtype in TORCH_DTYPES.items()}


# checksum(buffer) -> xxh3-64 as 16 hex digits (releases the GIL; ~30 GB/s here). The function
# itself, not a wrapper: it is called once per piece, 60k times for a 20k-tensor state.
checksum = xxhash.xxh3_64_hexdigest


def data_file_name(rank: int) -> str:
    """The format names rank r's data file data-r.bin (inside its version)."""
    return f"data-{rank}.bin"


def align(offset: int) -> int:
    return (offset + ALIGN - 1) // ALIGN * ALIGN


def _tensor_json(t: TensorRecord) -> dict:
    if t.chunks is None:
        return {"dtype": t.dtype, "shape": list(t.shape), "nbytes": t.nbytes, "pieces": _pieces_json(t.pieces)}
    return {"dtype": t.dtype, "shape": list(t.shape), "nbytes": t.nbytes, "placements": t.placements,
            "chunks": len(t.chunks)}


def _chunk_table(tensors: list[TensorRecord]) -> ChunkTable:
    """The table of every sharded tensor's chunks: the one their records are rows of (the leader's,
    or a read manifest's), else made from their Chunk objects."""
    table, chunk, cell = None, 0, 0
    for t in tensors:
        rows = t.chunks
        if rows is None:
            continue
        if type(rows) is not ChunkRows or (table is not None and rows.table is not table) \
                or (rows.first, rows.cell) != (chunk, cell):
            break
        table, chunk, cell = rows.table, chunk + rows.count, cell + rows.count * rows.dims
    else:
        if table is not None and chunk == len(table.holders) and cell == len(table.offsets):
            return table
    table, digests = ChunkTable(), []
    for t in tensors:
        for c in t.chunks or ():
            table.offsets += c.offsets
            table.sizes += c.sizes
            table.holders.append(len(c.ranks))
            table.ranks += c.ranks
            table.pieces.append(len(c.pieces))
            for p in c.pieces:
                table.file.append(p.file)
                table.offset.append(p.offset)
                table.length.append(p.length)
                digests.append(p.xxh3)
    table.xxh3 = "".join(digests)
    return table


def _pieces_json(pieces: list[Piece]) -> list[dict]:
    return [{"file": p.file, "offset": p.offset, "length": p.length, "xxh3": p.xxh3} for p in pieces]


def _records_json(records: list[TensorRecord]) -> bytes:
    return json.dumps([_tensor_json(t) for t in records], separators=(",", ":"), check_circular=False).encode()


_DIGEST_KEY = re.compile(rb'"xxh3":"')   # only a key: a quote inside a JSON string is escaped
_DIGEST_BYTES = np.arange(16, dtype=np.int64)


class RecordsText:
    """The JSON text of a run of tensor records, made once, with their pieces' checksums written into
    it for each manifest whose records differ from these only in checksums: the leader's, while every
    rank keeps its derivation (commit.KeptTable). Encoding 20,000 records was 0.07 s of the leader's
    0.11 s `to_json`, which the other ranks wait for (docs/PERFORMANCE.md); writing 5,000 checksums into
    the text takes a few ms."""

    def __init__(self, records: list[TensorRecord]):
        self.count = len(records)
        self.text = _records_json(records)
        # where each checksum's 16 digits go, in the order of the records' pieces
        self.digits = (np.array([m.end() for m in _DIGEST_KEY.finditer(self.text)], dtype=np.int64)[:, None]
                       + _DIGEST_BYTES).ravel()

    def fill(self, records: list[TensorRecord]) -> bytes | None:
        """The text of `records` (the same records as the ones it was made of, but for the checksums);
        None where their count or their checksums' differ (to_json then encodes them all)."""
        digests = "".join([p.xxh3 for t in records if t.chunks is None for p in t.pieces]).encode()
        if len(records) != self.count or len(digests) != len(self.digits):
            return None
        text = bytearray(self.text)
        np.frombuffer(text, dtype=np.uint8)[self.digits] = np.frombuffer(digests, dtype=np.uint8)
        return bytes(text)


def _check_node_budget(data: bytes, where: str) -> None:
    """Refuse JSON with more '{'/'[' than BYTES_PER_NODE allows, before decoding it (numpy counts
    3 MB in ~1 ms; brackets inside strings count too, which only makes the check stricter)."""
    raw = np.frombuffer(data, dtype=np.uint8)
    nodes = int(np.count_nonzero(raw == ord("{"))) + int(np.count_nonzero(raw == ord("[")))
    if nodes > len(data) // BYTES_PER_NODE + 64:
        raise IntegrityError(f"{where}: {nodes} JSON objects/lists in {len(data)} bytes, more than pyckpt writes "
                             f"(one per {BYTES_PER_NODE} bytes); the manifest is padded or corrupted", file=where)


# ---------------------------------------------------------------------------------------------
# Manifest
# ---------------------------------------------------------------------------------------------

@dataclass
class Piece:
    file: int       # index into Manifest.files (== the rank that wrote it)
    offset: int     # byte offset in that file
    length: int
    xxh3: str


class _Lazy:
    """'tensor I chunk C' for messages, formatted only when one is raised."""

    __slots__ = ("index", "chunk")

    def __init__(self, index: int, chunk: int):
        self.index, self.chunk = index, chunk

    def __str__(self) -> str:
        return f"tensor {self.index} chunk {self.chunk}"


@dataclass
class Chunk:
    """One box of a sharded tensor's global index space; its bytes (row-major within the box) are the
    pieces, in order. ranks: the ranks that held it when it was saved (informational)."""

    offsets: list[int]
    sizes: list[int]
    pieces: list[Piece]
    ranks: list[int] = field(default_factory=list)

    @property
    def box(self) -> Box:
        return Box(tuple(self.offsets), tuple(self.sizes))


@dataclass
class ChunkTable:
    """Version 3's chunk and piece tables, one list per column (docs/FORMAT.md): every sharded tensor's
    chunks in tensor order, each chunk's pieces in chunk order. The leader fills it from the ranks'
    reports; a reader gets it from the manifest. A sharded record's chunks are ChunkRows of it."""

    offsets: list[int] = field(default_factory=list)   # each chunk's box: one entry per dimension
    sizes: list[int] = field(default_factory=list)
    holders: list[int] = field(default_factory=list)   # how many ranks held each chunk, and
    ranks: list[int] = field(default_factory=list)     # those ranks, chunk after chunk (informational)
    pieces: list[int] = field(default_factory=list)    # how many pieces each chunk has
    file: list[int] = field(default_factory=list)      # each piece's data file, place in it, length
    offset: list[int] = field(default_factory=list)
    length: list[int] = field(default_factory=list)
    xxh3: str = ""                                     # and checksum: 16 hex digits per piece
    _starts: tuple[list[int], list[int]] | None = field(default=None, repr=False, compare=False)

    def starts(self) -> tuple[list[int], list[int]]:
        """Where each chunk's pieces and ranks begin: chunk j's pieces are [piece_at[j], piece_at[j + 1]).
        Computed once, when first asked (of a complete table: a reader's, never the leader's while it fills)."""
        if self._starts is None:
            self._starts = (list(itertools.accumulate(self.pieces, initial=0)),
                            list(itertools.accumulate(self.holders, initial=0)))
        return self._starts

    def row(self, j: int, cell: int, dims: int) -> Chunk:
        """Chunk j (its offsets and sizes at [cell, cell + dims) of their columns)."""
        _, rank_at = self.starts()
        return Chunk(self.offsets[cell: cell + dims], self.sizes[cell: cell + dims], self.pieces_of(j),
                     self.ranks[rank_at[j]: rank_at[j + 1]])

    def pieces_of(self, j: int) -> list[Piece]:
        """Chunk j's pieces, in order."""
        piece_at = self.starts()[0]
        files, offsets, lengths, x = self.file, self.offset, self.length, self.xxh3
        return [Piece(files[k], offsets[k], lengths[k], x[16 * k: 16 * k + 16])
                for k in range(piece_at[j], piece_at[j + 1])]

    def to_json(self) -> tuple[dict, dict]:
        return ({"offsets": self.offsets, "sizes": self.sizes, "holders": self.holders, "ranks": self.ranks,
                 "pieces": self.pieces},
                {"file": self.file, "offset": self.offset, "length": self.length, "xxh3": self.xxh3})


class ChunkRows(Sequence):
    """A sharded tensor's chunks as rows of a ChunkTable (version 3), made into Chunk
    objects when asked for: all of them when listed, or only the one with a given box (find). A
    restore on the saved layout reads one chunk of each tensor: a 20k-tensor FSDP2 state on 4 ranks has
    60k chunks, and making objects of all of them was ~0.1 s of each rank's 0.5 s open."""

    __slots__ = ("table", "first", "count", "cell", "dims", "_made")

    def __init__(self, table: ChunkTable, first: int, count: int, cell: int, dims: int):
        self.table, self.first, self.count, self.cell, self.dims = table, first, count, cell, dims
        self._made: list[Chunk] | None = None

    def __len__(self) -> int:
        return self.count

    def __getitem__(self, k):
        return self._all()[k]

    def __iter__(self):
        return iter(self._all())

    def __eq__(self, other: Any) -> bool:
        if isinstance(other, (list, ChunkRows)):
            return self._all() == list(other)
        return NotImplemented

    __hash__ = None  # type: ignore[assignment]

    def __repr__(self) -> str:
        return repr(self._all())

    def _all(self) -> list[Chunk]:
        if self._made is None:
            table, dims = self.table, self.dims
            self._made = [table.row(self.first + c, self.cell + c * dims, dims) for c in range(self.count)]
        return self._made

    def pieces_at(self, offsets: tuple[int, ...], sizes: tuple[int, ...]) -> list[Piece] | None:
        """The pieces of the chunk whose box is exactly (offsets, sizes), or None; no Chunk is made (a
        restore on the saved layout asks this of every tensor it reads)."""
        table, dims, cell = self.table, self.dims, self.cell
        if not dims:   # a 0-d tensor: one chunk of no dims
            return self[0].pieces if self.count == 1 and not offsets and not sizes else None
        offsets, sizes = list(offsets), list(sizes)
        starts = table.offsets[cell: cell + self.count * dims: dims]   # each chunk's offset in dim 0
        c = -1
        while True:
            try:
                c = starts.index(offsets[0], c + 1)
            except ValueError:
                return None
            at = cell + c * dims
            if table.offsets[at: at + dims] == offsets and table.sizes[at: at + dims] == sizes:
                return table.pieces_of(self.first + c)


@dataclass
class TensorRecord:
    dtype: str      # a TORCH_DTYPES name, or "numpy:<dtype.str>" for numpy arrays
    shape: list[int]
    nbytes: int
    pieces: list[Piece] = field(default_factory=list)   # a whole tensor's bytes, row-major
    chunks: Sequence[Chunk] | None = None                # a sharded tensor's (then pieces is empty; a list,
    #                                                      or ChunkRows in a read manifest)
    placements: str = ""                                 # how it was sharded, e.g. "(Shard(dim=0),)" (informational)

    @property
    def is_numpy(self) -> bool:
        return self.dtype.startswith("numpy:")

    @property
    def kind(self) -> str:
        """The state tree's reference kind for this record."""
        return ARRAY if self.is_numpy else SHARDED if self.chunks is not None else TENSOR

    def as_chunks(self) -> Sequence[Chunk]:
        """Its chunks; a whole tensor is one chunk of its full shape (one overlap planner for both)."""
        if self.chunks is not None:
            return self.chunks
        return [Chunk([0] * len(self.shape), list(self.shape), self.pieces)] if self.nbytes else []


@dataclass
class FileRecord:
    name: str
    size: int


@dataclass
class Manifest:
    world_size: int
    files: list[FileRecord]
    tensors: list[TensorRecord]
    replicated: Any               # state tree shared by every rank (stored once)
    per_rank: list[Any]           # one state tree per rank (RNG etc.)
    meta: dict[str, Any]          # step, epoch, loss, created, versions: informational
    format_version: int = PLAIN_VERSION

    def to_json(self, known: RecordsText | None = None) -> bytes:
        """The manifest's bytes; SnapshotError if the reader would refuse them (too large, or too many
        JSON nodes for its size: see _check_node_budget). `known`: the text of its first records, but
        for their checksums (the leader's last manifest's)."""
        # Built by hand: dataclasses.asdict deep-copies every field and takes seconds at 20k tensors.
        body = {"format": "pyckpt-manifest", "world_size": self.world_size,
                "files": [{"name": f.name, "size": f.size} for f in self.files],
                "tensors": [],   # its text is put in below
                "replicated": self.replicated, "per_rank": self.per_rank, "meta": self.meta,
                "format_version": self.format_version}
        if any(t.chunks is not None for t in self.tensors):
            body["format_version"] = FORMAT_VERSION
            body["chunk_table"], body["piece_table"] = _chunk_table(self.tensors).to_json()
        data = json.dumps(body, separators=(",", ":"), check_circular=False).encode()
        head = known.fill(self.tensors[:known.count]) if known is not None else None
        if head is None:
            records = _records_json(self.tensors)
        else:
            tail = _records_json(self.tensors[known.count:])
            records = head if tail == b"[]" else tail if head == b"[]" else head[:-1] + b"," + tail[1:]
        # the first '"tensors":[]' is the key's: only the file names and the world size come before it
        data = data.replace(b'"tensors":[]', b'"tensors":' + records, 1)
        if len(data) > MAX_MANIFEST:
            raise SnapshotError(f"the manifest would be {len(data)} bytes, more than {MAX_MANIFEST}: the state "
                                "holds too many or too long plain values; store large data as tensors")
        try:
            _check_node_budget(data, "the manifest")
        except IntegrityError as exc:
            raise SnapshotError(f"{exc}; the state is mostly empty lists/dicts: store such data as tensors "
                                "or strings") from None
        return data

    @property
    def total_bytes(self) -> int:
        return sum(f.size for f in self.files)

    def tensor_names(self) -> dict[int, str]:
        names = tensor_paths(self.replicated)
        for rank, tree in enumerate(self.per_rank):
            names.update({i: f"rank{rank}:{p}" for i, p in tensor_paths(tree).items()})
        return names

    @classmethod
    def from_json(cls, data: bytes, where: str) -> "Manifest":
        _check_node_budget(data, where)
        try:
            body = json.loads(data)
        except (ValueError, UnicodeDecodeError, RecursionError) as exc:
            raise IntegrityError(f"{where}: manifest is not valid JSON ({str(exc)[:200]})", file=where) from None
        v = _Validator(where)
        v.check(isinstance(body, dict) and body.get("format") == "pyckpt-manifest", "not a pyckpt manifest")
        version = body.get("format_version")
        v.check(type(version) is int and version in READ_VERSIONS,
                f"format_version {str(version)[:40]!r} is not supported (this pyckpt reads {READ_VERSIONS}); "
                "upgrade pyckpt")
        v.chunked_ok = version >= OBJECT_CHUNKS
        world = v.int(body.get("world_size"), "world_size", 1, 1 << 20)
        files = [FileRecord(v.file_name(f.get("name") if isinstance(f, dict) else None),
                            v.int(f.get("size"), "file size", 0, 1 << 62))
                 for f in v.list(body.get("files"), "files")]
        v.check([f.name for f in files] == [data_file_name(r) for r in range(len(files))] and len(files) == world,
                "files must be data-0.bin .. data-<world_size-1>.bin")
        total = sum(f.size for f in files)
        if version > OBJECT_CHUNKS:
            v.tables = _Tables(v, body.get("chunk_table"), body.get("piece_table"), files)
        tensors = []
        for i, t in enumerate(v.list(body.get("tensors"), "tensors")):
            v.check(isinstance(t, dict), f"tensor {i} is not an object")
            tensors.append(v.tensor(i, t, files, total))
        if v.tables is not None:
            v.tables.finish()
        # Each stored byte belongs to one tensor: a manifest claiming more than the files hold would
        # make the reader allocate memory for bytes that do not exist.
        claimed = sum(t.nbytes for t in tensors)
        v.check(claimed <= total, f"tensors claim {claimed} bytes but the data files hold {total}")
        per_rank = v.list(body.get("per_rank"), "per_rank")
        v.check(len(per_rank) == world, "per_rank must have one tree per rank")
        kinds = [t.kind for t in tensors]
        for tree in [body.get("replicated")] + per_rank:
            v.tree(tree, kinds)
        meta = v.meta(body.get("meta"))
        return cls(world, files, tensors, body.get("replicated"), per_rank, meta, version)


class _Validator:
    def __init__(self, where: str):
        self.where = where
        self.chunked_ok = False          # chunked tensors: format version 2 on
        self.tables: _Tables | None = None   # version 3: where the chunks are

    def fail(self, problem: str) -> IntegrityError:
        return IntegrityError(f"{self.where}: {problem}", file=self.where)

    def check(self, ok: bool, problem: str) -> None:
        if not ok:
            raise self.fail(problem)

    def int(self, value: Any, what: str, low: int, high: int) -> int:
        self.check(isinstance(value, int) and not isinstance(value, bool) and low <= value <= high,
                   f"{what} {str(value)[:40]!r} is not an integer in [{low}, {high}]")
        return value

    def time(self, value: Any, what: str) -> float | None:
        """A Unix time: None, or a finite number in [0, MAX_TIME] (time.localtime shows any of them)."""
        if value is not None:
            self.check(type(value) in (int, float) and 0 <= value <= MAX_TIME,
                       f"{what} {str(value)[:40]!r} is not a time (seconds since 1970, at most year 9999)")
        return value

    def meta(self, meta: Any) -> dict:
        """The informational fields the commands show: a value of the wrong type is refused, not shown.
        pyckpt writes plain values only (no nesting: the commands print meta as it is)."""
        self.check(type(meta) is dict, "meta must be an object")
        for key, value in meta.items():
            self.check(type(value) not in (list, dict) and (type(value) is not str or len(value) <= 1000),
                       f"meta {key[:40]!r}: {str(value)[:40]!r} is not a number or a string of at most 1000 "
                       "characters")
        for key in ("step", "epoch", "world_size"):
            self.check(meta.get(key) is None or type(meta[key]) is int,
                       f"meta {key} {str(meta.get(key))[:40]!r} is not an integer")
        self.check(meta.get("loss") is None or type(meta["loss"]) in (int, float),  # NaN/inf: a diverged run
                   f"meta loss {str(meta.get('loss'))[:40]!r} is not a number")
        self.time(meta.get("created"), "meta created")
        for key in ("host", "torch"):
            self.check(meta.get(key) is None or type(meta[key]) is str,
                       f"meta {key} {str(meta.get(key))[:40]!r} is not a string")
        return meta

    def list(self, value: Any, what: str) -> list:
        self.check(isinstance(value, list), f"{what} must be a list")
        return value

    def tree(self, root: Any, kinds: list[str]) -> None:
        """A state tree's nodes, depth and references (each with its record's kind)."""
        validate(root, kinds, self.where)

    def file_name(self, name: Any) -> str:
        self.check(isinstance(name, str) and DATA_FILE.match(name) is not None,
                   f"data file name {str(name)[:80]!r} is not allowed (only data-<rank>.bin inside the snapshot)")
        return name

    def tensor(self, index: int, t: dict, files: list[FileRecord], total: int) -> TensorRecord:
        # The common case is checked with plain comparisons and messages are formatted only on failure:
        # this runs once per tensor on every restore (20k tensors: ~10x faster than eager messages).
        dtype = t.get("dtype")
        itemsize = _ITEMSIZE.get(dtype) if type(dtype) is str else None
        if itemsize is None:
            itemsize = self._numpy_itemsize(index, dtype)
        shape = t.get("shape")
        if type(shape) is not list:
            raise self.fail(f"tensor {index} shape must be a list")
        if len(shape) > 32:
            raise self.fail(f"tensor {index}: {len(shape)} dimensions")
        count = 1
        for dim in shape:
            if type(dim) is not int or not 0 <= dim <= MAX_DIM_PRODUCT:
                self.int(dim, f"tensor {index} dimension", 0, MAX_DIM_PRODUCT)
            count *= dim
        if count > MAX_DIM_PRODUCT:
            raise self.fail(f"tensor {index}: shape {shape} is too large")
        nbytes = t.get("nbytes")
        if type(nbytes) is not int or not 0 <= nbytes <= total:
            self.int(nbytes, f"tensor {index} nbytes", 0, total)
        if nbytes != count * itemsize:
            raise self.fail(f"tensor {index}: nbytes {nbytes} does not match shape {shape} x {itemsize} bytes")
        if "chunks" in t:
            if self.tables is not None:
                return self.tables.take(index, t, dtype, shape, nbytes, itemsize)
            return self.chunk_objects(index, t, dtype, shape, nbytes, itemsize, files)
        # numpy arrays of any itemsize are cut at 64-byte boundaries between ranks; torch's itemsizes divide 64
        whole = 1 if dtype.startswith("numpy:") else itemsize
        return TensorRecord(dtype, shape, nbytes, self.pieces(f"tensor {index}", t.get("pieces"), nbytes, whole, files))

    def pieces(self, what: str | _Lazy, raw: Any, nbytes: int, itemsize: int, files: list[FileRecord]) -> list[Piece]:
        """The pieces of a tensor or chunk of nbytes bytes: each inside its file and a whole number of
        elements (a piece under a column block is copied out element by element), together exactly
        nbytes."""
        if type(raw) is not list:
            raise self.fail(f"{what} pieces must be a list")
        pieces = []
        covered = 0
        nfiles = len(files)
        hex16 = _HEX16.fullmatch
        for p in raw:
            if type(p) is not dict:
                raise self.fail(f"{what}: piece is not an object")
            file, length, offset, digest = p.get("file"), p.get("length"), p.get("offset"), p.get("xxh3")
            if type(file) is not int or not 0 <= file < nfiles:
                self.int(file, f"{what} piece file", 0, nfiles - 1)
            if type(length) is not int or not 0 <= length <= nbytes:
                self.int(length, f"{what} piece length", 0, nbytes)
            if length % itemsize:
                raise self.fail(f"{what}: piece length {length} is not a whole number of {itemsize}-byte elements")
            if type(offset) is not int or not 0 <= offset <= files[file].size - length:
                self.int(offset, f"{what} piece offset", 0, files[file].size - length)
            if type(digest) is not str or hex16(digest) is None:
                raise self.fail(f"{what}: piece checksum {str(digest)[:40]!r} is malformed")
            pieces.append(Piece(file, offset, length, digest))
            covered += length
        if covered != nbytes:
            raise self.fail(f"{what}: pieces cover {covered} of {nbytes} bytes")
        return pieces

    def chunked_tensor(self, index: int, t: dict, dtype: str) -> None:
        """What every version asks of a sharded tensor's own record."""
        if not self.chunked_ok:
            raise self.fail(f"tensor {index}: chunks in a format_version 1 manifest")
        if dtype.startswith("numpy:"):
            raise self.fail(f"tensor {index}: a numpy array cannot be chunked")
        if "pieces" in t:
            raise self.fail(f"tensor {index}: both pieces and chunks")

    def sharded(self, index: int, t: dict, dtype: str, shape: list[int], nbytes: int,
                chunks: list[Chunk], tiled: bool = False) -> TensorRecord:
        """The record of a sharded tensor whose chunks are read: they must tile its shape (tiled: the
        caller saw them do so)."""
        problem = None if tiled else check_tiling(tuple(shape), [c.box for c in chunks])
        if problem is not None:
            raise self.fail(f"tensor {index}: its chunks do not tile shape {shape}: {problem}")
        placements = t.get("placements", "")
        if type(placements) is not str or len(placements) > 1000:
            raise self.fail(f"tensor {index}: placements is not a string")
        return TensorRecord(dtype, shape, nbytes, [], chunks, placements)

    def chunk_objects(self, index: int, t: dict, dtype: str, shape: list[int], nbytes: int, itemsize: int,
                      files: list[FileRecord]) -> TensorRecord:
        """A sharded tensor whose chunks are objects (version 2, and version 3's check of a tensor
        whose columns failed the bulk checks): chunks that tile its shape exactly, each with pieces
        covering its bytes. As in tensor(): plain comparisons, messages formatted only on failure."""
        self.chunked_tensor(index, t, dtype)
        raw = self.list(t.get("chunks"), f"tensor {index} chunks")
        if len(raw) > MAX_CHUNKS:
            raise self.fail(f"tensor {index}: {len(raw)} chunks, more than {MAX_CHUNKS}")
        dims = len(shape)
        chunks = []
        for c, entry in enumerate(raw):
            if type(entry) is not dict:
                raise self.fail(f"tensor {index} chunk {c} is not an object")
            offsets, sizes = entry.get("offsets"), entry.get("sizes")
            if not (type(offsets) is list and type(sizes) is list and len(offsets) == len(sizes) == dims):
                raise self.fail(f"tensor {index} chunk {c}: offsets and sizes must be lists of {dims} integers")
            for value in offsets + sizes:
                if type(value) is not int or not 0 <= value <= MAX_DIM_PRODUCT:
                    self.int(value, f"tensor {index} chunk {c} offset/size", 0, MAX_DIM_PRODUCT)
            volume = math.prod(sizes)
            ranks = entry.get("ranks", [])
            if type(ranks) is not list or any(type(r) is not int for r in ranks):
                raise self.fail(f"tensor {index} chunk {c}: ranks must be integers")
            if volume > MAX_DIM_PRODUCT:
                raise self.fail(f"tensor {index} chunk {c}: sizes {sizes} are too large")
            pieces = self.pieces(_Lazy(index, c), entry.get("pieces"), volume * itemsize, itemsize, files)
            chunks.append(Chunk(offsets, sizes, pieces, ranks))
        return self.sharded(index, t, dtype, shape, nbytes, chunks)

    def _numpy_itemsize(self, index: int, dtype: Any) -> int:
        if isinstance(dtype, str) and dtype.startswith("numpy:"):
            try:
                np_dtype = np.dtype(dtype[len("numpy:"):])
            except Exception:  # numpy raises TypeError, ValueError, SyntaxError... for odd strings
                raise self.fail(f"tensor {index}: numpy dtype {dtype!r} is unknown") from None
            self.check(np_dtype.kind in NUMPY_KINDS and not np_dtype.hasobject,
                       f"tensor {index}: numpy dtype {dtype!r} is not plain numbers")
            return np_dtype.itemsize
        raise self.fail(f"tensor {index}: dtype {str(dtype)[:40]!r} is not supported")


def _all_ints(values: list, low: int, high: int) -> bool:
    """Whether every value is an int (not a bool) in [low, high], checked in C (map, set, min, max)."""
    return not values or (set(map(type, values)) == {int} and low <= min(values) and max(values) <= high)


class _Tables:
    """Version 3's chunk and piece tables (docs/FORMAT.md), handed out tensor by tensor in order.

    Their columns are checked in bulk first: types and bounds in C, each piece's place in its file with
    numpy. If that passes, a tensor whose chunks are FSDP2's dim-0 slabs, in order, is seen to tile with
    a few C-level list operations, and its chunks stay rows of the tables (ChunkRows: a rank builds
    objects only for the chunks it reads); the bytes each chunk's pieces cover are checked for all of
    them at once in finish(). Any other layout is cut into Chunk objects with per-chunk checks and goes
    through check_tiling. If the bulk checks fail, or a chunk's pieces do not cover it, the tensor is
    checked field by field as the version 2 record of its rows, which names the first bad field in the
    same words as a version 2 manifest."""

    CHUNK_COLUMNS = ("offsets", "sizes", "holders", "ranks", "pieces")
    PIECE_COLUMNS = ("file", "offset", "length", "xxh3")

    def __init__(self, v: _Validator, chunk_table: Any, piece_table: Any, files: list[FileRecord]):
        self.v, self.files = v, files
        for name, table, columns in (("chunk_table", chunk_table, self.CHUNK_COLUMNS),
                                     ("piece_table", piece_table, self.PIECE_COLUMNS)):
            v.check(type(table) is dict and sorted(table) == sorted(columns),
                    f"{name} must be an object of {', '.join(columns)}")
            for column in columns:
                v.check(type(table[column]) is (str if column == "xxh3" else list),
                        f"{name} {column} must be a {'string' if column == 'xxh3' else 'list'}")
        table = self.table = ChunkTable(**chunk_table, **piece_table)
        self.offsets, self.sizes, self.ranks = table.offsets, table.sizes, table.ranks
        holders, counts = table.holders, table.pieces
        npieces = len(piece_table["file"])
        v.check(len(holders) == len(counts) and len(self.offsets) == len(self.sizes),
                "chunk_table: holders and pieces need one entry per chunk, offsets and sizes one per chunk dimension")
        v.check(_all_ints(holders, 0, 1 << 20) and _all_ints(counts, 0, npieces),
                f"chunk_table holders and pieces must be counts (integers in [0, {npieces}])")
        v.check(sum(counts) == npieces == len(piece_table["offset"]) == len(piece_table["length"]),
                f"piece_table holds {npieces} files, {len(piece_table['offset'])} offsets and "
                f"{len(piece_table['length'])} lengths; chunk_table names {sum(counts)} pieces")
        v.check(len(piece_table["xxh3"]) == 16 * npieces,
                f"piece_table xxh3 holds {len(piece_table['xxh3'])} characters, not 16 per piece")
        v.check(sum(holders) == len(self.ranks), "chunk_table ranks must hold the holders of each chunk in turn")
        self.piece_at, self.rank_at = table.starts()
        self.chunk = self.cell = 0           # the next tensor's first chunk and its first offset
        self.fast = self._bulk_checks()
        self.itemsizes: list[int] = []   # of each chunk handed out, for the whole-element check
        self.firsts: list[int] = []      # the first chunk of each sharded tensor handed out, and
        self.taken: list[tuple] = []     # its (index, count, cell, dims, itemsize): to recheck or name it
        self.slab_chunks: list[int] = []     # the chunks of the tensors handed out as rows, and the
        self.slab_bytes: list[int] = []      # bytes their pieces must cover (checked in finish())

    def _bulk_checks(self) -> bool:
        """Whether the columns hold only what version 2's per-field checks allow (the bytes each chunk's
        pieces cover and their whole elements are checked per chunk and in finish())."""
        table, nfiles = self.table, len(self.files)
        if not (_all_ints(self.offsets, 0, MAX_DIM_PRODUCT) and _all_ints(self.sizes, 0, MAX_DIM_PRODUCT)
                and (not self.ranks or set(map(type, self.ranks)) == {int})
                and _all_ints(table.file, 0, nfiles - 1) and _all_ints(table.offset, 0, 1 << 62)
                and _all_ints(table.length, 0, 1 << 62) and _HEX.fullmatch(table.xxh3) is not None
                and sum(table.length) < 1 << 62):   # (finish() sums them in int64)
            return False
        if not table.file:
            return True
        sizes = np.array([f.size for f in self.files], dtype=np.int64)
        file, offset, length = (np.array(c, dtype=np.int64) for c in (table.file, table.offset, table.length))
        return bool((offset <= sizes[file] - length).all())

    def take(self, index: int, t: dict, dtype: str, shape: list[int], nbytes: int, itemsize: int) -> TensorRecord:
        """The record of sharded tensor `index`: its "chunks" is how many of the next chunks are its."""
        v = self.v
        v.chunked_tensor(index, t, dtype)
        count = t.get("chunks")
        if type(count) is not int or not 0 <= count <= MAX_CHUNKS:
            v.int(count, f"tensor {index} chunks", 0, MAX_CHUNKS)
        first, cell, dims = self.chunk, self.cell, len(shape)
        end = cell + count * dims
        if first + count > len(self.piece_at) - 1 or end > len(self.offsets):
            raise v.fail(f"tensor {index}: {count} chunks of {dims} dimensions run past the end of chunk_table")
        self.chunk, self.cell = first + count, end
        if not self.fast:
            record = {**t, "chunks": [self._row(j, cell + (j - first) * dims, dims) for j in range(first, first + count)]}
            return v.chunk_objects(index, record, dtype, shape, nbytes, itemsize, self.files)
        self.itemsizes += [itemsize] * count
        self.firsts.append(first)
        self.taken.append((index, count, cell, dims, itemsize))
        if dim0_slabs_in_order(self.offsets, self.sizes, cell, end, dims, shape):
            # each slab's volume is at most the tensor's: finish() checks the bytes their pieces cover
            self.slab_chunks += range(first, first + count)
            row = math.prod(shape[1:]) * itemsize
            self.slab_bytes += [size * row for size in self.sizes[cell: end: dims]]
            rows = ChunkRows(self.table, first, count, cell, dims)
            return v.sharded(index, t, dtype, shape, nbytes, rows, tiled=True)
        return v.sharded(index, t, dtype, shape, nbytes, self._chunks(index, first, count, cell, dims, itemsize))

    def _chunks(self, index: int, first: int, count: int, cell: int, dims: int, itemsize: int) -> list[Chunk]:
        """A tensor's chunks as objects, each checked: its volume, and the bytes its pieces cover (the
        version 2 checks of its row name the bad field)."""
        v, chunks = self.v, []
        for c, j in enumerate(range(first, first + count)):
            box_sizes = self.sizes[cell: cell + dims]
            volume = math.prod(box_sizes)
            if volume > MAX_DIM_PRODUCT:
                raise v.fail(f"tensor {index} chunk {c}: sizes {box_sizes} are too large")
            chunk = self.table.row(j, cell, dims)
            if sum(p.length for p in chunk.pieces) != volume * itemsize:   # raises, naming the piece or the sum
                v.pieces(_Lazy(index, c), self._row(j, cell, dims)["pieces"], volume * itemsize, itemsize, self.files)
            chunks.append(chunk)
            cell += dims
        return chunks

    def _row(self, j: int, cell: int, dims: int) -> dict:
        """Chunk j as a version 2 chunk object (for the checks that name a bad field)."""
        chunk = self.table.row(j, cell, dims)
        return {"offsets": chunk.offsets, "sizes": chunk.sizes, "ranks": chunk.ranks,
                "pieces": _pieces_json(chunk.pieces)}

    def finish(self) -> None:
        """After the last tensor: every chunk was some tensor's, the pieces of each slab cover its bytes,
        and every piece is a whole number of its tensor's elements (a piece under a column block is
        copied out element by element)."""
        v = self.v
        v.check(self.chunk == len(self.piece_at) - 1 and self.cell == len(self.offsets),
                f"chunk_table holds {len(self.piece_at) - 1} chunks ({len(self.offsets)} offsets); the tensors "
                f"name {self.chunk} ({self.cell} offsets)")
        if not self.fast or not self.piece_at[-1]:
            return
        lengths = np.array(self.table.length, dtype=np.int64)
        if self.slab_chunks:
            byte_at = np.concatenate(([0], np.cumsum(lengths)))[np.array(self.piece_at, dtype=np.int64)]
            chunks = np.array(self.slab_chunks, dtype=np.int64)
            bad = np.flatnonzero(byte_at[chunks + 1] - byte_at[chunks] != np.array(self.slab_bytes, dtype=np.int64))
            if len(bad):   # that tensor's chunks checked one by one name the piece or the sum
                t = bisect.bisect_right(self.firsts, self.slab_chunks[int(bad[0])]) - 1
                index, count, cell, dims, itemsize = self.taken[t]
                self._chunks(index, self.firsts[t], count, cell, dims, itemsize)
                raise v.fail(f"tensor {index}: the pieces of its chunks do not cover their bytes")   # (not reached)
        whole = np.repeat(np.array(self.itemsizes, dtype=np.int64), self.table.pieces)
        bad = np.flatnonzero(lengths % whole)
        if len(bad):
            k = int(bad[0])
            j = bisect.bisect_right(self.piece_at, k) - 1
            t = bisect.bisect_right(self.firsts, j) - 1
            raise v.fail(f"tensor {self.taken[t][0]} chunk {j - self.firsts[t]}: piece length {int(lengths[k])} is "
                         f"not a whole number of {int(whole[k])}-byte elements")


# ---------------------------------------------------------------------------------------------
# Commit record: the small file at the user's path that names the committed versions.
# ---------------------------------------------------------------------------------------------

@dataclass
class VersionRef:
    name: str               # directory name under <path>.pyckpt/
    manifest_xxh3: str
    manifest_size: int
    step: int | None = None
    epoch: int | None = None
    created: float | None = None


@dataclass
class CommitRecord:
    versions: list[VersionRef]   # newest first; versions[0] is what restore loads

    @property
    def current(self) -> VersionRef:
        return self.versions[0]

    def to_json(self) -> bytes:
        body = {"format": "pyckpt-commit", "format_version": COMMIT_VERSION,
                "versions": [asdict(v) for v in self.versions]}
        text = json.dumps(body, sort_keys=True, separators=(",", ":"))
        return json.dumps({"body": body, "xxh3": checksum(text.encode())}, sort_keys=True, indent=1).encode()

    @classmethod
    def from_json(cls, data: bytes, where: str) -> "CommitRecord":
        v = _Validator(where)
        try:
            outer = json.loads(data)
        except (ValueError, UnicodeDecodeError, RecursionError):
            raise v.fail("is not a pyckpt snapshot (no commit record); it may be a file from another tool "
                         "or a corrupted record") from None
        v.check(isinstance(outer, dict) and isinstance(outer.get("body"), dict), "not a pyckpt commit record")
        body = outer["body"]
        text = json.dumps(body, sort_keys=True, separators=(",", ":"))
        v.check(outer.get("xxh3") == checksum(text.encode()), "commit record checksum mismatch (corrupted)")
        v.check(body.get("format") == "pyckpt-commit", "not a pyckpt commit record")
        v.check(body.get("format_version") == COMMIT_VERSION,
                f"commit format_version {body.get('format_version')!r} is not supported; upgrade pyckpt")
        versions = []
        for ref in v.list(body.get("versions"), "versions"):
            v.check(isinstance(ref, dict) and isinstance(ref.get("name"), str)
                    and VERSION_NAME.match(ref["name"]) is not None, f"bad version entry {str(ref)[:80]!r}")
            v.check(isinstance(ref.get("manifest_xxh3"), str) and re.fullmatch(r"[0-9a-f]{16}", ref["manifest_xxh3"])
                    is not None, "bad manifest checksum")
            v.int(ref.get("manifest_size"), "manifest size", 1, MAX_MANIFEST)
            for key in ("step", "epoch"):
                v.check(ref.get(key) is None or (isinstance(ref[key], int) and not isinstance(ref[key], bool)),
                        f"version {key} {str(ref.get(key))[:40]!r} is not an integer")
            v.time(ref.get("created"), f"version {ref['name']} created")
            versions.append(VersionRef(**{k: ref.get(k) for k in VersionRef.__dataclass_fields__}))
        v.check(len(versions) >= 1, "commit record names no version")
        v.check(len({r.name for r in versions}) == len(versions), "commit record names a version twice")
        record = cls(versions)
        # The checksum covers the parsed body; also refuse any byte changed outside it (whitespace, key order).
        v.check(record.to_json() == data, "commit record is not in pyckpt's exact form (edited or corrupted)")
        return record
