"""Read a committed snapshot back: validated manifest, data read into fresh or live tensors, every
byte verified.

Data files are read with O_DIRECT where the filesystem allows it: each read job reads its file range
in 4 MiB aligned windows into a per-thread huge-page buffer and copies the pieces out. That keeps a
cold restore at the device's speed instead of the speed at which the VM hands out fresh page-cache
memory (docs/PERFORMANCE.md), and checks the bytes on disk rather than cached copies. Elsewhere the
pieces are read with buffered preadv straight into their tensors. A read is planned first
(TensorRead) and can be run in parts: ranks on one machine each run a share of the jobs and copy
the others from each other (peers.py).
"""
from __future__ import annotations

import ctypes
import errno
import os
import threading
import weakref
from concurrent.futures import wait
from dataclasses import dataclass, field
from typing import Any, Iterable, NamedTuple

import numpy as np
import torch

from .errors import IntegrityError, PyckptError
from .manifest import Manifest, Piece, TensorRecord, VersionRef, checksum
from .messages import as_read_error
from .storage import DataSource, Store
from .stores import open_store
from .sysio import address, aligned_buffers, byte_view, gc_paused, helper_pool
from .shards import SHARD_PIECE, Edge, Strided, Target, dtensor_target, plan_reads, whole_target
from .tree import TORCH_DTYPES, is_dtensor, references, unflatten


@dataclass
class Snapshot:
    """One committed version, opened for reading."""

    store: Store
    ref: VersionRef
    manifest: Manifest
    files: dict[int, DataSource] = field(default_factory=dict, repr=False)  # data files, open while this lives

    @classmethod
    def open(cls, path: str | os.PathLike, version: str | None = None) -> "Snapshot":
        """Open a committed version (the current one by default): its manifest, and its data files,
        which stay open so that a writer pruning the version afterwards cannot take them away. If the
        current version is pruned while being opened (a newer one was committed meanwhile, keep_last=1),
        the newer one is opened instead, up to _OPEN_TRIES times."""
        store = open_store(path)
        tries = 1
        while True:
            ref = _pick(store.path, store.read_commit(), version)
            try:
                manifest = store.read_manifest(ref)
                files = store.open_data(ref, manifest)
            except IntegrityError:
                if version is None and tries < _OPEN_TRIES and _superseded(store, ref):
                    tries += 1
                    continue
                raise
            snap = cls(store, ref, manifest, files)
            weakref.finalize(snap, _close_all, list(files.values()))
            return snap

    @property
    def manifest_where(self) -> str:
        """Where the manifest is, for messages."""
        return self.store.where(self.ref.name, "manifest.json")

    @property
    def meta(self) -> dict:
        return self.manifest.meta

    def file_path(self, index: int) -> str:
        return self.files[index].where

    def reading(self, tree: Any, into: dict[int, torch.Tensor] | None = None) -> "TreeRead":
        """Plan the read of a state tree (files opened and size-checked, buffers allocated); run it
        with .run(), whole or in parts, then take .tree(). Use as a context manager (closes the files).

        `into` maps tensor indices to existing contiguous CPU tensors of the same dtype and shape:
        those are read in place (no allocation, no copy later) and returned as those tensors."""
        wanted = sorted(set(references(tree)))
        out = [into.get(i) for i in wanted] if into else None
        return TreeRead(self, tree, wanted, out)

    def read_tree(self, tree: Any, into: dict[int, torch.Tensor] | None = None, direct: bool = True) -> Any:
        """Materialise a state tree of this snapshot with CPU tensors, verifying every checksum."""
        with self.reading(tree, into) as read:
            read.run(direct=direct)
            return read.tree()

    def replicated(self, into: dict[int, torch.Tensor] | None = None, direct: bool = True) -> Any:
        return self.read_tree(self.manifest.replicated, into=into, direct=direct)

    def private(self, rank: int, direct: bool = True) -> Any:
        return self.read_tree(self.manifest.per_rank[rank], direct=direct)

    def read_tensors(self, indices: list[int], out: list[torch.Tensor | None] | None = None, *,
                     direct: bool = True) -> list[torch.Tensor | np.ndarray]:
        """Read tensors (by manifest index) into fresh CPU buffers, or into `out[i]` where given (a
        contiguous CPU tensor of the record's dtype and shape, returned as is); every piece's checksum
        is verified before this returns. `direct`: read with O_DIRECT where the filesystem takes it
        (pass False when other processes on this host read the same files: they share the page cache)."""
        with TreeRead(self, None, indices, out) as read:
            read.run(direct=direct)
            return read.requested_values()


class PieceRead(NamedTuple):
    """One piece of a planned read: where it is in its file, its record, and where its bytes go."""

    offset: int            # in the data file
    piece: Piece
    view: memoryview       # the destination bytes (a slice of the tensor's buffer); a ShardRead's edge
    #                        and strided pieces hold an Edge or a Strided here, replaced by scratch
    #                        while their job runs
    slot: int              # which of the read's tensors it belongs to (for messages)


class ReadJob(NamedTuple):
    """Neighbouring pieces of one data file, read with one request and verified together."""

    file: int
    pieces: list[PieceRead]


class TensorRead:
    """The read of some tensors of a snapshot, planned: data files open (their sizes checked before
    any memory is allocated), buffers allocated, pieces grouped into read jobs (neighbouring pieces
    of one file, up to the source's job_bytes). run() reads jobs on the helper threads and verifies every checksum;
    ranks sharing a machine each run a share of the jobs and copy the rest from one another."""

    def __init__(self, snap: Snapshot, indices: list[int], out: list[torch.Tensor | None] | None = None):
        where = snap.manifest_where
        count = len(snap.manifest.tensors)
        if any(not 0 <= i < count for i in indices):
            raise IntegrityError(f"{where}: state tree references a tensor that does not exist", file=where)
        self.snap, self.indices, self.out = snap, indices, out
        self.records = [snap.manifest.tensors[i] for i in indices]
        self._names = _LazyNames(snap.manifest, indices)
        self._sources = _copies(snap)
        try:
            by_file = self._pieces()
        except BaseException:
            self.close()
            raise
        self.jobs: list[ReadJob] = []
        for file, pieces in by_file.items():
            pieces.sort(key=lambda item: item.offset)   # linear when already in order
            self.jobs.extend(ReadJob(file, batch) for batch in _batches(pieces, self._sources[file].job_bytes))
        # One byte per job, 0 until it is read (DONE or FAILED): peers on this machine poll it.
        self.progress = bytearray(len(self.jobs))
        self.progress_address = ctypes.addressof((ctypes.c_char * len(self.jobs)).from_buffer(self.progress))

    def _pieces(self) -> dict[int, list[PieceRead]]:
        """Allocate the buffers and list every piece to read, grouped by file (neighbours are read with
        one preadv)."""
        out = self.out
        self.buffers = [out[k] if out is not None and out[k] is not None
                        else torch.empty(r.nbytes, dtype=torch.uint8) for k, r in enumerate(self.records)]
        by_file: dict[int, list] = {}
        for k, (rec, buf) in enumerate(zip(self.records, self.buffers)):
            if rec.chunks is not None:   # its bytes are in chunks, read by a ShardRead: never leave it unread
                raise ValueError(f"tensor {self.indices[k]} is sharded: read it with a ShardRead")
            view = byte_view(buf) if rec.nbytes else memoryview(b"")
            pieces = rec.pieces
            if len(pieces) == 1:  # the common case: a tensor of at most 16 MiB in one file
                p = pieces[0]
                by_file.setdefault(p.file, []).append(PieceRead(p.offset, p, view, k))
                continue
            for p, start in _piece_starts(rec):
                by_file.setdefault(p.file, []).append(PieceRead(p.offset, p, view[start: start + p.length], k))
        return by_file

    def __enter__(self) -> "TensorRead":
        return self

    def __exit__(self, *exc_info) -> None:
        self.close()

    def close(self) -> None:
        sources, self._sources = self._sources, {}
        _close_all(sources.values())

    def job_sizes(self) -> list[int]:
        return [sum(item.piece.length for item in job.pieces) for job in self.jobs]

    def extents(self, jobs: list[int]) -> list[tuple[int, int]]:
        """(address, length) in this process of every non-empty piece of those jobs, in job order."""
        out = []
        for j in jobs:
            for item in self.jobs[j].pieces:
                if item.piece.length:
                    out.append((address(item.view), item.piece.length))
        return out

    def run(self, jobs: list[int] | None = None, *, direct: bool = True) -> None:
        """Read those jobs (all by default) and verify their checksums; the first error is raised.
        `direct`: read with O_DIRECT where the filesystem takes it (pass False when other processes on
        this host read the same bytes: they share the page cache)."""
        self.start(jobs, direct=direct).wait()

    def start(self, jobs: list[int] | None = None, *, direct: bool = True) -> "Running":
        """run() without waiting: the jobs are read on the helper threads, and progress[j] turns to
        DONE (read and verified) or FAILED as each finishes; .wait() on the result ends it."""
        jobs = list(range(len(self.jobs))) if jobs is None else jobs
        files = {self.jobs[j].file for j in jobs}
        direct_sources = _open_direct({f: self._sources[f] for f in files}) if direct else {}
        futures = [helper_pool().submit(self._read_job, j, direct_sources.get(self.jobs[j].file)) for j in jobs]
        return Running(futures, direct_sources)

    def _read_job(self, j: int, direct: DataSource | None) -> None:
        file, batch = self.jobs[j]
        try:
            self._read_batch(self._sources[file], direct, batch)
        except BaseException:
            self.progress[j] = FAILED
            raise
        self.progress[j] = DONE

    def intact(self, jobs: list[int]) -> bool:
        """Whether every piece of those jobs (filled some other way: copied from a peer) matches its
        checksum."""
        return all(_intact(item.piece, item.view) for j in jobs for item in self.jobs[j].pieces)

    def values(self) -> list[torch.Tensor | np.ndarray]:
        if self.out is None:
            return [_as_value(rec, buf) for rec, buf in zip(self.records, self.buffers)]
        return [buf if given is not None else _as_value(rec, buf)
                for rec, buf, given in zip(self.records, self.buffers, self.out)]

    def _read_batch(self, source: DataSource, direct: DataSource | None, batch: list[PieceRead]) -> None:
        """Read a run of pieces (direct through the bounce buffer unless cached, else one read into the
        tensors), then verify their checksums."""
        first, last = batch[0].piece, batch[-1].piece
        start, end = first.offset, last.offset + last.length
        if direct is None or source.cached(start, end) or not _read_direct(direct, batch, start, end):
            self._read_buffered(source, batch, start, end)
        for offset, piece, view, k in batch:
            if not _intact(piece, view):
                path = self.snap.file_path(piece.file)
                raise IntegrityError(
                    f"{path}: checksum mismatch in tensor {self._names[k]} (bytes {piece.offset}-"
                    f"{piece.offset + piece.length}); the snapshot is corrupted: restore an older version or take "
                    "a new snapshot", file=path, tensor=self._names[k])

    def _read_buffered(self, source: DataSource, batch: list, start: int, end: int) -> None:
        """One read for the run (gaps between pieces land in a scratch buffer)."""
        iov: list[memoryview] = []
        pos = start
        for offset, piece, view, _ in batch:
            if offset > pos:  # alignment padding (or a small gap): read into scratch, never looked at
                iov.append(_SCRATCH[: offset - pos] if offset - pos <= _MAX_GAP else memoryview(bytearray(offset - pos)))
            if piece.length:
                iov.append(view)
            pos = offset + piece.length
        done = 0
        while done < end - start:
            got = source.read_into(start + done, iov)
            if got == 0:
                offset, piece, _, k = next(item for item in batch if item.offset + item.piece.length > start + done)
                path, name = self.snap.file_path(piece.file), self._names[k]
                raise IntegrityError(f"{path}: ends early while reading tensor {name}", file=path, tensor=name)
            done += got
            iov = _advance(iov, got)


_SPILLED = (Edge, Strided)   # read into scratch, then put in place
_SCRATCH_ALIGN = 64         # any dtype's view of a piece in scratch starts aligned
# Scratch bytes of one read job (more only for one larger piece): two sharded pieces, so a resharded
# restore holds at most 2 x SHARD_PIECE x reader threads of scratch (16 MiB with 4 threads).
SPILL_JOB = 2 * SHARD_PIECE


def _scratch_bytes(length: int) -> int:
    return -(-length // _SCRATCH_ALIGN) * _SCRATCH_ALIGN


class ShardRead(TensorRead):
    """The read of tensors into Targets (shards.py): for each, only the saved pieces that overlap the
    boxes this rank needs, straight into place where the bytes are contiguous on both sides. Each rank
    reads its own (no sharing between the ranks of a machine: they need different bytes)."""

    def __init__(self, snap: Snapshot, indices: list[int], targets: list[Target]):
        self.targets = targets
        self._scratch: dict[int, torch.Tensor] = {}   # each helper thread's, for this read only
        super().__init__(snap, indices)

    def _pieces(self) -> dict[int, list[PieceRead]]:
        by_file: dict[int, list] = {}
        self.buffers = []
        for k, (rec, target) in enumerate(zip(self.records, self.targets)):
            local = target.buffer if target.buffer is not None else \
                torch.empty(target.local_shape, dtype=TORCH_DTYPES[rec.dtype])
            self.buffers.append(local)
            for piece, view in plan_reads(rec.as_chunks(), target, local):
                by_file.setdefault(piece.file, []).append(PieceRead(piece.offset, piece, view, k))
        return by_file

    def _read_batch(self, source: DataSource, direct: DataSource | None, batch: list[PieceRead]) -> None:
        """The edge and strided pieces of the batch get scratch for this job only; their parts go into
        place once the whole batch is verified."""
        spilled = [k for k, item in enumerate(batch) if type(item.view) in _SPILLED]
        if not spilled:
            return super()._read_batch(source, direct, batch)
        at, pos = [], 0
        for k in spilled:
            at.append(pos)
            pos += _scratch_bytes(batch[k].piece.length)
        scratch = self._scratch_for(pos)
        batch, parts = list(batch), []
        for k, start in zip(spilled, at):
            spill, length = batch[k].view, batch[k].piece.length
            data = scratch[start: start + length]
            batch[k] = batch[k]._replace(view=byte_view(data))
            parts.append((spill, data))
        super()._read_batch(source, direct, batch)
        for spill, data in parts:
            spill.put(data)

    def _scratch_for(self, size: int) -> torch.Tensor:
        """`size` bytes of this thread's scratch. One buffer per thread, reused by its jobs: a new one
        per job made glibc raise its mmap threshold after the first was freed, and the later ones,
        taken from the threads' arenas, stayed there (a first 1 -> 4 restore of the 20,000-tensor state
        kept 330-410 MiB per rank; 110 MiB with one buffer per thread)."""
        thread = threading.get_ident()
        buffer = self._scratch.get(thread)
        if buffer is None or buffer.numel() < size:
            buffer = self._scratch[thread] = torch.empty(max(size, SPILL_JOB), dtype=torch.uint8)
        return buffer[:size]

    def close(self) -> None:
        super().close()
        self._scratch = {}

    @property
    def bytes_read(self) -> int:
        """Bytes of the pieces this read reads (each piece whole: checksums cover whole pieces)."""
        return sum(self.job_sizes())

    def values(self) -> list[Any]:
        return [target.build(buf) for target, buf in zip(self.targets, self.buffers)]


class TreeRead(TensorRead):
    """A TensorRead of the tensors a state tree references; .tree() rebuilds the tree with them. The
    tensors with a Target (sharded ones, or any read into a live DTensor) are read by `own`, a ShardRead
    that run() runs too; peers on one machine share only the others (they are the same on every rank)."""

    def __init__(self, snap: Snapshot, tree: Any, indices: list[int], out: list[Any] | None):
        records = snap.manifest.tensors
        targets = [_target(records[i], out[k] if out else None) if 0 <= i < len(records) else None
                   for k, i in enumerate(indices)]
        plain = [k for k, target in enumerate(targets) if target is None]
        super().__init__(snap, [indices[k] for k in plain], [out[k] for k in plain] if out else None)
        try:
            sharded = [k for k, target in enumerate(targets) if target is not None]
            self.own = ShardRead(snap, [indices[k] for k in sharded], [targets[k] for k in sharded])
        except BaseException:
            self.close()
            raise
        self._tree = tree
        self.requested = indices

    def close(self) -> None:
        super().close()
        own = getattr(self, "own", None)
        if own is not None:
            own.close()

    def run(self, jobs: list[int] | None = None, *, direct: bool = True) -> None:
        super().run(jobs, direct=direct)
        if jobs is None:
            self.own.run(direct=direct)

    def run_plain(self, *, direct: bool = True) -> None:
        """Read the tensors without a Target (not `own`'s)."""
        super().run(direct=direct)

    def _by_index(self) -> dict[int, Any]:
        return {index: value for read in (self, self.own) for index, value in zip(read.indices, read.values())}

    def requested_values(self) -> list[Any]:
        """The values of the tensors asked for, in the order asked."""
        values = self._by_index()
        return [values[index] for index in self.requested]

    def tree(self) -> Any:
        tensors: list[Any] = [None] * len(self.snap.manifest.tensors)
        for index, value in self._by_index().items():
            tensors[index] = value
        return unflatten(self._tree, tensors, self.snap.manifest_where)


def _target(record: TensorRecord, given: Any) -> Target | None:
    """How a tensor is read: into a Target when it is sharded, goes into a live DTensor, or was given
    one (a fresh optimizer's state); None for a whole tensor read as before."""
    if isinstance(given, Target):
        return given
    if is_dtensor(given):
        return dtensor_target(given, TORCH_DTYPES[record.dtype])
    if record.chunks is not None:
        return whole_target(tuple(record.shape), given)
    return None


DONE, FAILED = 1, 2


class Running:
    """Read jobs under way on the helper threads."""

    def __init__(self, futures: list, direct_sources: dict[int, DataSource]):
        self.futures, self.direct_sources = futures, direct_sources

    def done(self) -> bool:
        return all(future.done() for future in self.futures)

    def wait(self) -> None:
        """Until every job is done (they use the direct sources, closed here); the first error is raised."""
        try:
            wait(self.futures)
            for future in self.futures:
                future.result()
        finally:
            _close_all(self.direct_sources.values())

    def settle(self) -> None:
        """Until every job is done, raising nothing: before the read's files close after a failure
        elsewhere (its own errors, if any, were raised by wait() or do not matter any more)."""
        try:
            self.wait()
        except Exception:
            pass


def _intact(piece, view: memoryview) -> bool:
    return checksum(view) == piece.xxh3


_OPEN_TRIES = 5


def _pick(path: str, record, version: str | None) -> VersionRef:
    """The record's current version, or the committed one named `version`."""
    if version is None:
        return record.current
    matches = [v for v in record.versions if v.name == version]
    if not matches:
        names = ", ".join(v.name for v in record.versions)
        raise IntegrityError(f"{path}: no version {version!r}; committed versions: {names}", file=path)
    return matches[0]


def _superseded(store: Store, ref: VersionRef) -> bool:
    """Whether the record now names another current version than `ref` (it was replaced meanwhile)."""
    try:
        return store.read_commit().current.name != ref.name
    except (PyckptError, OSError):
        return False


def _copies(snap: Snapshot) -> dict[int, DataSource]:
    """Handles on the snapshot's data files for one read: copies of those Snapshot.open opened."""
    sources: dict[int, DataSource] = {}
    try:
        for index, source in snap.files.items():
            sources[index] = source.copy()
    except BaseException:
        _close_all(sources.values())
        raise
    return sources


def _close_all(sources: Iterable[DataSource]) -> None:
    for source in sources:
        source.close()


_DIRECT_WINDOW = 4 << 20     # one O_DIRECT read: a common max request size of block devices
_DIRECT_ALIGN = 4096          # file offsets of direct reads (any logical block size up to 4 KiB)
_bounce = threading.local()   # each helper thread's window buffer, kept for its life


def _open_direct(sources: dict[int, DataSource]) -> dict[int, DataSource]:
    """A direct (uncached) source per data file; none at all where one of them has no direct reads."""
    out: dict[int, DataSource] = {}
    for file, source in sources.items():
        direct = source.direct()
        if direct is None:
            _close_all(out.values())
            return {}
        out[file] = direct
    return out


def _read_direct(source: DataSource, batch: list, start: int, end: int) -> bool:
    """Read [start, end) in aligned windows into this thread's buffer and copy each piece's bytes out.
    False (the caller reads buffered) where the filesystem turns the direct read down."""
    window = getattr(_bounce, "buffer", None)
    if window is None:
        window = _bounce.buffer = aligned_buffers(1, _DIRECT_WINDOW)[0]
    arrays = [np.frombuffer(item.view, dtype=np.uint8) if len(item.view) else None for item in batch]
    pos = start - start % _DIRECT_ALIGN
    todo = 0                                   # first piece not yet copied in full
    while pos < end:
        want = min(_DIRECT_WINDOW, end - pos + -(end - pos) % _DIRECT_ALIGN)   # not past the run's last block
        try:
            got = source.read_into(pos, [window[:want]])
        except OSError as exc:
            if exc.errno == errno.EINVAL and todo == 0:
                return False
            raise
        if got <= 0:
            return False                       # ends early: the buffered read names the tensor
        stop = pos + got
        data = np.frombuffer(window, dtype=np.uint8, count=got)
        k = todo
        while k < len(batch) and batch[k].offset < stop:
            offset, piece, _, _ = batch[k]
            lo, hi = max(offset, pos), min(offset + piece.length, stop)
            if hi > lo:
                arrays[k][lo - offset: hi - offset] = data[lo - pos: hi - pos]
            if offset + piece.length <= stop:   # pieces do not overlap: all before it are done too
                todo = k + 1
            k += 1
        if got % _DIRECT_ALIGN and stop < end:
            return False
        pos = stop
    return True


_BATCH_IOV = 512              # iovecs per preadv (Linux allows 1024)
_MAX_GAP = 4096               # bytes of other data between two pieces that one read may skip over
_SCRATCH = memoryview(bytearray(_MAX_GAP))  # shared by every read: gap bytes are discarded


def _batches(pieces: list[PieceRead], job_bytes: int) -> list[list[PieceRead]]:
    """Cut file-ordered pieces into read jobs: contiguous runs of at most job_bytes, _BATCH_IOV // 2
    pieces and SPILL_JOB bytes of pieces read into scratch (or one larger piece)."""
    out, current, size, spilled, end = [], [], 0, 0, None
    for item in pieces:
        offset, piece = item.offset, item.piece
        spill = _scratch_bytes(piece.length) if type(item.view) in _SPILLED else 0
        joins = current and 0 <= offset - end <= _MAX_GAP and size + piece.length <= job_bytes \
            and len(current) < _BATCH_IOV // 2 and spilled + spill <= SPILL_JOB
        if not joins and current:
            out.append(current)
            current, size, spilled = [], 0, 0
        current.append(item)
        size += piece.length
        spilled += spill
        end = offset + piece.length
    if current:
        out.append(current)
    return out


def _advance(iov: list[memoryview], count: int) -> list[memoryview]:
    """Drop `count` bytes from the front of an iovec list (after a short read)."""
    i = 0
    while i < len(iov) and count >= len(iov[i]):
        count -= len(iov[i])
        i += 1
    iov = iov[i:]
    if iov and count:
        iov[0] = iov[0][count:]
    return iov


class _LazyNames:
    """Tensor names for error messages, computed only when an error needs one."""

    def __init__(self, manifest: Manifest, indices: list[int]):
        self.manifest, self.indices, self._names = manifest, indices, None

    def __getitem__(self, k: int) -> str:
        if self._names is None:
            self._names = self.manifest.tensor_names()
        index = self.indices[k]
        return self._names.get(index, f"#{index}")


def _piece_starts(record: TensorRecord):
    start = 0
    for piece in record.pieces:
        yield piece, start
        start += piece.length


def _as_value(record: TensorRecord, buf: torch.Tensor):
    if record.is_numpy:
        return buf.numpy().view(np.dtype(record.dtype[len("numpy:"):])).reshape(record.shape)
    dtype = TORCH_DTYPES[record.dtype]
    if record.nbytes == 0:
        return torch.empty(record.shape, dtype=dtype)
    return buf.view(dtype).reshape(record.shape)


def load(path: str | os.PathLike, *, version: str | None = None) -> dict:
    """Load a snapshot's state in a plain process (no process group): for evaluation or export.

    Returns {"progress": {...}, "kinds": {...}, "objects": {name: state_dict},
             "per_rank": [{"loss": ..., "rng": {...}} for each rank that saved it]}.
    """
    try:
        with gc_paused():   # tens of thousands of objects per step, no cycles: a 20k-tensor open took 2x with GC
            snap = Snapshot.open(path, version)
            state = snap.replicated()
            state["per_rank"] = [snap.private(rank) for rank in range(snap.manifest.world_size)]
    except Exception as exc:
        raise as_read_error(exc, os.fspath(path)) from exc
    return state
