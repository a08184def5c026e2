"""The commit protocol of one snapshot, on every rank (rank 0 leads):
  1. the leader takes the path's lock, cleans leftovers of crashed writers and begins a stage;
  2. every rank writes its share of the replicated bytes plus its private state to its data file
     in the stage and makes it durable;
  3. the leader gathers every rank's report; only if every rank succeeded and all ranks hold the
     same replicated state does it write the manifest and publish the version atomically;
  4. the outcome is broadcast, so every rank returns or raises together.
Every rank reaches every collective whatever fails where, so a failure on one rank is raised on all
of them, naming that rank, instead of a hang until the process group times out.
"""
from __future__ import annotations

import dataclasses
import logging
import math
from contextlib import ExitStack
from itertools import islice
from typing import Any

import numpy as np

from . import messages
from .capture import Captured, PlanCache
from .collectives import Comm
from .errors import SnapshotError
from .boxes import Box, check_tiling, dim0_slabs_in_order
from .manifest import (ChunkRows, ChunkTable, FileRecord, Manifest, Piece, RecordsText, TensorRecord, checksum,
                       data_file_name)
from .tree import TORCH_DTYPES, shift, tensor_paths
from .planner import plan_private
from .shards import SHARD_PIECE, pieces_of
from .storage import Stage, Store
from .sysio import gc_paused

log = logging.getLogger("pyckpt")


def commit_snapshot(comm: Comm, store: Store, cap: Captured, keep_last: int, reuse_files: bool,
                    plans: PlanCache, kept: KeptTable) -> tuple[str, int]:
    """Run the protocol; returns the committed version's name and the bytes this rank wrote."""
    with ExitStack() as held:
        begun = comm.broadcast(_begin(store, cap, held) if comm.rank == 0 else None)
        if begun.error is not None:
            raise _failure(comm, begun.error, f"snapshot to {store.path} could not start", cap)
        stage = Stage(begun.name, begun.stage)
        report = _write_share(comm, store, stage, cap, reuse_files)
        reports = comm.gather(report)
        failure: messages.RankError | None = None
        if comm.rank == 0:
            try:
                with gc_paused():   # (a background snapshot's leader: 0.07 s for 20k tensors, 0.3 s with GC)
                    manifest = _manifest(cap, reports, plans, kept)
                    data = manifest.to_json(kept.records)
                store.keep_spares(keep_last if reuse_files else None)
                store.publish(stage, data, cap.meta, keep_last)
            except Exception as exc:  # nothing half-made stays behind, whatever went wrong
                failure = next((r.error for r in reports if r.error is not None), None) \
                    or messages.RankError.of(0, exc)
                _abort(store, stage)
        failure = comm.broadcast(failure)
        if failure is not None:
            raise _failure(comm, failure, f"snapshot to {store.path} failed, the previous snapshot is intact", cap)
    return begun.name, report.size


def _abort(store: Store, stage: Stage) -> None:
    """Leader: remove the stage of a failed snapshot. A failure to remove it is logged, never raised:
    the outcome must still reach every rank (raised here, it skipped the broadcast and the other
    ranks waited out the process group's timeout); the next writer or `pyckpt gc` removes what stays."""
    try:
        store.abort(stage)
    except Exception as exc:
        log.warning("pyckpt: could not remove the stage of the failed snapshot %s (the next writer or "
                    "`pyckpt gc` will): %s", store.where(stage.name), exc)


def _begin(store: Store, cap: Captured, held: ExitStack) -> messages.Begun:
    """Leader: take the path's lock (held until `held` closes) and begin the stage."""
    if cap.error is not None:
        return messages.Begun(error=messages.RankError.of(0, cap.error))
    try:
        held.enter_context(store.locked())
        stage = store.begin()
    except Exception as exc:
        held.close()
        return messages.Begun(error=messages.RankError.of(0, exc))
    return messages.Begun(stage.name, stage.handle)


def _write_share(comm: Comm, store: Store, stage: Stage, cap: Captured, reuse_files: bool) -> messages.RankReport:
    """Write this rank's data file into the stage; the report says what the leader needs to commit."""
    rank = comm.rank
    if cap.error is not None:
        return messages.RankReport(rank, messages.RankError.of(rank, cap.error))
    try:
        digests = store.write_data(stage, rank, cap.segments, cap.size, reuse=reuse_files)
        # Only several ranks need to compare their replicated structure (and it costs ~50 ms at 20k tensors).
        structure = checksum(repr(cap.replicated_tree).encode() +
                             repr([(r.dtype, r.shape) for r in cap.records]).encode()) \
            if comm.world_size > 1 else ""
    except Exception as exc:
        return messages.RankReport(rank, messages.RankError.of(rank, exc))
    return messages.RankReport(rank, None, cap.size, digests, structure, cap.samples, cap.private_tree,
                               [(r.dtype, r.shape, r.nbytes) for r in cap.private_records], cap.shards,
                               cap.share.size + cap.shard_size, cap.serial)


def _failure(comm: Comm, error: messages.RankError, what: str, cap: Captured) -> Exception:
    """The exception this rank raises for a failed snapshot: the original one on the rank where it
    happened (single process: exactly what the script caused), the same pyckpt error elsewhere."""
    if cap.error is not None and (comm.world_size == 1 or error.rank == comm.rank):
        if comm.world_size == 1:
            return cap.error
        exc = error.error(what, SnapshotError)
        exc.__cause__ = cap.error
        return exc
    return error.error(what, SnapshotError)


class KeptTable:
    """Leader: the last snapshot's chunk table (all but its checksums), kept while every rank reports
    the capture it derived then (capture.CaptureCache; its serial): the same parts in the same places.
    Building it again from the ranks' reports was ~0.1 s of a 20,000-tensor snapshot on the leader,
    which every other rank waits for (docs/PERFORMANCE.md)."""

    def __init__(self) -> None:
        self.serials: tuple[str, ...] = ()
        self.table = ChunkTable()
        self.rows: list[tuple[int, int, int, int, int]] = []   # each sharded record's ChunkRows
        self.counts: list[int] = []      # each rank's sharded pieces (its digests after its share's)
        self.order = np.zeros(0, dtype=np.int64)   # the table's pieces in the ranks' digests, concatenated
        self.records: RecordsText | None = None    # the replicated records' JSON (made at the first reuse)

    def matches(self, reports: list[messages.RankReport]) -> bool:
        return all(r.serial for r in reports) and tuple(r.serial for r in reports) == self.serials

    def fill(self, tensors: list[TensorRecord], shard_digests: list[str]) -> None:
        """Give the sharded records their rows of a copy of the table with these checksums (the
        ranks' sharded pieces', rank after rank, each rank's in its report's order)."""
        table = dataclasses.replace(self.table, _starts=None,
                                    xxh3=np.array(shard_digests, dtype="S16")[self.order].tobytes().decode())
        for index, first, count, cell, dims in self.rows:
            tensors[index].chunks = ChunkRows(table, first, count, cell, dims)


def _manifest(cap: Captured, reports: list[messages.RankReport], plans: PlanCache, kept: KeptTable) -> Manifest:
    """Leader: the manifest of the snapshot, once every rank reported success with the same state."""
    failed = [r.error for r in reports if r.error is not None]
    if failed:
        raise SnapshotError("; ".join(f.message for f in failed))
    if len({r.structure for r in reports}) != 1:
        raise SnapshotError("ranks hold different replicated state (different models/optimizers per rank); "
                            "pyckpt stores replicated (DDP) state once and needs it identical on every rank; "
                            "register state that differs per rank with per_rank=True")
    _check_same_bytes(reports, cap.replicated_tree)
    # Replicated pieces: every rank planned the same layout, so the leader recomputes it and
    # fills in each rank's checksums in plan order.
    tensors = [TensorRecord(r.dtype, r.shape, r.nbytes, [], None if r.chunks is None else [], r.placements)
               for r in cap.records]
    reuse = kept.matches(reports)
    parts: list[tuple] = []   # sharded: (tensor, offsets, sizes, start, length, ranks, rank, file offset, digests, at)
    shard_digests: list[str] = []   # every rank's sharded pieces' checksums, rank after rank
    per_rank_trees, counts = [], []
    sizes = [0 if r.chunks is not None else r.nbytes for r in cap.records]
    for rank, (plan, report) in enumerate(zip(plans(sizes, len(reports)), reports)):
        digests = iter(report.digests)
        for s in plan.slices:
            tensors[s.tensor].pieces.append(Piece(rank, s.file_offset, s.length, next(digests)))
        first = len(shard_digests)
        if reuse:
            shard_digests += islice(digests, kept.counts[rank])
        for index, offsets, box_sizes, start, length, ranks, file_offset in ([] if reuse else report.shards):
            count = 1 if 0 < length <= SHARD_PIECE else len(pieces_of(length))   # one: most parts of 20k tensors
            part_digests = list(islice(digests, count))
            parts.append((index, offsets, box_sizes, start, length, ranks, rank, file_offset, part_digests,
                          len(shard_digests)))
            shard_digests += part_digests
        counts.append(len(shard_digests) - first)
        base = len(tensors)
        tensors.extend(TensorRecord(d, list(shape), n, []) for d, shape, n in report.private_records)
        private_sizes = [n for _, _, n in report.private_records]
        for s in plan_private(private_sizes, report.private_base).slices:
            tensors[base + s.tensor].pieces.append(Piece(rank, s.file_offset, s.length, next(digests)))
        per_rank_trees.append(shift(report.private_tree, base))
    if not reuse:
        kept.serials, kept.records = (), None
        _chunk_rows(tensors, parts, cap.replicated_tree, kept)
        kept.serials, kept.counts = tuple(r.serial for r in reports), counts
    kept.fill(tensors, shard_digests)
    if reuse and kept.records is None:   # the same records as the last manifest's: their text is kept
        kept.records = RecordsText(tensors[:len(cap.records)])
    files = [FileRecord(data_file_name(rank), report.size) for rank, report in enumerate(reports)]
    return Manifest(len(reports), files, tensors, cap.replicated_tree, per_rank_trees, cap.meta)


def _chunk_rows(tensors: list[TensorRecord], parts: list[tuple], tree: Any, kept: KeptTable) -> None:
    """Leader: the chunk table (manifest format 3) straight from the parts every rank wrote, into
    `kept`: the tensors in order, each one's boxes in order, each box's parts by their place in it,
    and where each piece's checksum is among the ranks' (kept.order). SnapshotError naming the tensor
    when the parts do not cover every box or the boxes do not tile the tensor (ranks that laid it out
    differently)."""
    table, order, rows = ChunkTable(), [], []
    parts.sort()
    k, n = 0, len(parts)
    for index, record in enumerate(tensors):
        if record.chunks is None:
            continue
        itemsize, dims = TORCH_DTYPES[record.dtype].itemsize, len(record.shape)
        first, cell, problem = len(table.holders), len(table.offsets), None
        while k < n and parts[k][0] < index:    # (parts of no sharded tensor: none are made)
            k += 1
        while k < n and parts[k][0] == index:
            box = parts[k][1:3]
            pos, npieces, ranks = 0, 0, parts[k][5]
            while k < n and parts[k][0] == index and parts[k][1:3] == box:   # a box split between its holders
                _, _, _, start, length, _, rank, file_offset, part_digests, at = parts[k]
                if start != pos:
                    problem = problem or f"bytes {pos}-{start} of the box at {list(box[0])} were written by no rank"
                if len(part_digests) == 1:
                    table.file.append(rank)
                    table.offset.append(file_offset)
                    table.length.append(length)
                    order.append(at)
                else:
                    for off, size in pieces_of(length):
                        table.file.append(rank)
                        table.offset.append(file_offset + off)
                        table.length.append(size)
                    order += range(at, at + len(part_digests))
                npieces += len(part_digests)
                pos = start + length
                k += 1
            expected = math.prod(box[1]) * itemsize
            if pos != expected:
                problem = problem or f"the box at {list(box[0])} has {pos} bytes written, not {expected}"
            table.offsets += box[0]
            table.sizes += box[1]
            table.holders.append(len(ranks))
            table.ranks += ranks
            table.pieces.append(npieces)
        count, end = len(table.holders) - first, len(table.offsets)
        if problem is None and not dim0_slabs_in_order(table.offsets, table.sizes, cell, end, dims, record.shape):
            boxes = [Box(tuple(table.offsets[c: c + dims]), tuple(table.sizes[c: c + dims]))
                     for c in range(cell, end, dims)] if dims else [Box((), ())] * count
            problem = check_tiling(tuple(record.shape), boxes)
        if problem:
            raise SnapshotError(f"sharded tensor {tensor_paths(tree).get(index, index)!r} of shape {record.shape}: "
                                f"{problem}; the ranks do not hold a consistent layout of it (different meshes or "
                                "placements)")
        rows.append((index, first, count, cell, dims))
    kept.table, kept.order, kept.rows = table, np.array(order, dtype=np.int64), rows


def _check_same_bytes(reports: list[messages.RankReport], tree: Any) -> None:
    """Refuse "replicated" tensors whose sampled bytes differ between ranks, naming the first one."""
    first = np.frombuffer(reports[0].samples, dtype=np.uint64)
    for report in reports[1:]:
        differ = np.flatnonzero(np.frombuffer(report.samples, dtype=np.uint64) != first)
        if len(differ):
            names = tensor_paths(tree)
            keys = ", ".join(repr(names.get(int(i), f"tensor {i}")) for i in differ[:5])
            raise SnapshotError(
                f"replicated state differs between rank 0 and rank {report.rank} in {len(differ)} tensor(s): {keys}. "
                "pyckpt writes replicated state once, from the ranks' shares, so it must be identical on every "
                "rank. If this state is meant to differ per rank (a per-rank generator, a pipeline stage), "
                "register it with per_rank=True; if it should be identical (DDP), the ranks have diverged")
