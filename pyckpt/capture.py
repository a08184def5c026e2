"""Capture: a runtime's state -> the bytes this rank writes (byte views of the live tensors, cut by
the plan), and the staging copy that lets a background snapshot run while training goes on."""
from __future__ import annotations

import math
import operator
import os
import socket
import time
import weakref
from dataclasses import dataclass, field
from typing import Any, NamedTuple

import numpy as np
import torch
from xxhash import xxh3_64_intdigest

from .boxes import Layout, layout
from .manifest import TensorRecord, align
from .planner import RankPlan, Slice, plan_private, plan_replicated
from .runtime import TrainingRuntime
from .shards import ShardPart, local_tensor, parts_to_write, pieces_of
from .sysio import address, byte_view, helper_pool
from .tree import DTYPE_NAMES, flatten, is_dtensor, subscripts, tensor_chains

SAMPLE_BYTES = 512   # bytes hashed in the middle of each replicated tensor (divergence check)


@dataclass
class Captured:
    """What one rank contributes to one snapshot: its plan and the bytes to write (or why it has none)."""

    replicated_tree: Any
    private_tree: Any
    records: list[TensorRecord]          # replicated tensors, pieces filled in by the leader
    private_records: list[TensorRecord]
    segments: list[tuple[Slice, memoryview]]
    share: RankPlan
    private_plan: RankPlan
    meta: dict
    samples: bytes = b""                 # divergence fingerprints of the replicated tensors
    error: Exception | None = None
    # the sharded parts it writes, as its report gives them: (tensor, offsets, sizes, start in the box,
    # length, holding ranks, file offset)
    shards: list[tuple] = field(default_factory=list)
    shard_size: int = 0
    serial: str = ""     # of the derived work (CaptureCache): the same serial, the same parts and records

    @classmethod
    def failed(cls, error: Exception) -> "Captured":
        empty = RankPlan([], 0)
        return cls(None, None, [], [], [], empty, empty, {}, error=error)

    @property
    def size(self) -> int:
        """Bytes of this rank's data file: its share of the replicated bytes, its parts of the sharded
        tensors, then its private state."""
        return self.share.size + self.shard_size + self.private_plan.size


class PlanCache:
    """plan_replicated, cached while the tensor sizes stay the same (every snapshot of a run)."""

    def __init__(self) -> None:
        self._key: tuple | None = None
        self._plans: list[RankPlan] = []

    def __call__(self, sizes: list[int], world_size: int) -> list[RankPlan]:
        key = (world_size, tuple(sizes))
        if key != self._key:
            self._key, self._plans = key, plan_replicated(sizes, world_size)
        return self._plans


class _Derived(NamedTuple):
    """What a capture derives from the replicated tensors alone (the same while they are)."""

    views: list[memoryview]
    records: list[TensorRecord]
    share: RankPlan
    parts: list[ShardPart]
    shards: list[tuple]                        # the parts as the rank's report gives them
    shard_size: int
    segments: list[tuple[Slice, memoryview]]   # this rank's share, then its sharded parts
    serial: str                                # names this derivation: the leader keeps its table by it


class CaptureCache:
    """The last capture's derived work, kept for the next snapshot of the same runtime while its
    replicated state holds the same tensor objects over the same memory: a training run snapshots the
    same tensors every time, and deriving the byte views, records and sharded parts again was most of
    a 20,000-tensor capture (docs/PERFORMANCE.md). A tensor replaced, or whose storage was swapped or
    resized (`.data = ...`, `resize_`), makes the capture derive everything afresh; so does a byte view
    that was a copy (a GPU tensor, a non-contiguous one): it would hold old bytes. Kept per runtime
    (weakly): the views keep their tensors alive, so a dropped runtime must drop them too."""

    def __init__(self) -> None:
        self._kept: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()

    def derived(self, runtime: TrainingRuntime, tensors: list, tree: Any, rank: int, world_size: int,
                plans: PlanCache) -> _Derived:
        memory = [_memory(t) for t in tensors]
        kept = self._kept.get(runtime)
        if (kept is not None and kept[0] == (rank, world_size) and len(kept[1]) == len(tensors)
                and all(map(operator.is_, kept[1], tensors)) and kept[2] == memory):
            return kept[3]
        self._kept.pop(runtime, None)
        derived = _derive(tensors, tree, rank, world_size, plans)
        if _all_in_place(tensors, derived):
            self._kept[runtime] = ((rank, world_size), list(tensors), memory, derived)
        return derived


def _memory(tensor: Any) -> tuple:
    """What must stay the same for a kept byte view of the tensor to still be its bytes."""
    if is_dtensor(tensor):
        local = local_tensor(tensor)
        return (local.data_ptr(), local.shape, local.stride(), local.dtype, local.device,
                tensor.shape, tensor.device_mesh, tensor.placements)
    if isinstance(tensor, torch.Tensor):
        return (tensor.data_ptr(), tensor.shape, tensor.stride(), tensor.dtype, tensor.device)
    return (tensor.ctypes.data, tensor.shape, tensor.strides, tensor.dtype)


def _all_in_place(tensors: list, derived: _Derived) -> bool:
    """Whether every byte view lies in its tensor's memory (byte_view made no copy)."""
    for view, tensor in zip(derived.views, tensors):
        if len(view) and not is_dtensor(tensor) and address(view) != _address(tensor):
            return False
    for part in derived.parts:
        local = local_tensor(tensors[part.tensor])
        start = address(part.view)
        if not local.data_ptr() <= start <= local.data_ptr() + local.nbytes - len(part.view):
            return False
    return True


def _address(tensor: Any) -> int:
    return tensor.data_ptr() if isinstance(tensor, torch.Tensor) else tensor.ctypes.data


def capture(runtime: TrainingRuntime, rank: int, world_size: int, plans: PlanCache,
            cache: CaptureCache | None = None) -> Captured:
    """This rank's share of the replicated state, its parts of the sharded tensors and all of its
    private state, as views of the live tensors (no copy)."""
    rep_tensors: list = []
    rep_tree = flatten(runtime.replicated_state(), rep_tensors, "replicated")
    priv_tensors: list = []
    priv_tree = flatten(runtime.private_state(), priv_tensors, "private")
    if any(is_dtensor(t) for t in priv_tensors):
        raise TypeError("a sharded tensor (DTensor) is registered with per_rank=True: register it without "
                        "per_rank, pyckpt stores each rank's shards and restores them on any world size")
    derived = cache.derived(runtime, rep_tensors, rep_tree, rank, world_size, plans) if cache is not None \
        else _derive(rep_tensors, rep_tree, rank, world_size, plans)
    priv_views = [byte_view(t) for t in priv_tensors]
    private_plan = plan_private([len(v) for v in priv_views], derived.share.size + derived.shard_size)
    segments = derived.segments + [(s, priv_views[s.tensor]) for s in private_plan.slices]
    meta = {"step": runtime.step, "epoch": runtime.epoch, "loss": runtime.loss, "created": time.time(),
            "world_size": world_size, "torch": torch.__version__, "host": socket.gethostname()}
    samples = divergence_samples(derived.views) if world_size > 1 else b""
    return Captured(rep_tree, priv_tree, derived.records, [_record(t) for t in priv_tensors],
                    segments, derived.share, private_plan, meta, samples, shards=derived.shards,
                    shard_size=derived.shard_size, serial=derived.serial)


def _derive(tensors: list, tree: Any, rank: int, world_size: int, plans: PlanCache) -> _Derived:
    views = [memoryview(b"") if is_dtensor(t) else byte_view(t) for t in tensors]
    share = plans([len(v) for v in views], world_size)[rank]
    parts, layouts = _shard_parts(tensors, tree)
    shard_offsets, pos = [], share.size
    for part in parts:
        pos = align(pos)
        shard_offsets.append(pos)
        pos += part.length
    segments = [(s, views[s.tensor]) for s in share.slices]
    for part, offset in zip(parts, shard_offsets):
        segments += [(Slice(part.tensor, part.start + start, offset + start, length), part.view)
                     for start, length in pieces_of(part.length)]
    shards = [(p.tensor, p.offsets, p.sizes, p.start, p.length, p.ranks, offset)
              for p, offset in zip(parts, shard_offsets)]
    return _Derived(views, [_record(t, layouts.get(i)) for i, t in enumerate(tensors)], share, parts,
                    shards, pos - share.size, segments, os.urandom(8).hex())


def _shard_parts(tensors: list, tree: Any) -> tuple[list[ShardPart], dict[int, Layout]]:
    """The parts of the sharded tensors this rank writes, and the layout of each (by index: its record
    needs it too); TypeError naming the key of one that cannot be saved."""
    parts: list[ShardPart] = []
    layouts: dict[int, Layout] = {}
    for index, tensor in enumerate(tensors):
        if is_dtensor(tensor):
            try:
                found = layouts[index] = layout(tensor)
                parts += parts_to_write(index, tensor, found)
            except ValueError as exc:
                chain = tensor_chains(tree).get(index, ())
                raise TypeError(f"cannot snapshot replicated{subscripts(chain)}: {exc}") from None
    return parts, layouts


class CopyJob(NamedTuple):
    """Copy `length` bytes of `view` from `src` into the staging buffer at `dst`."""

    dst: int
    view: memoryview
    src: int
    length: int


def stage(captured: Captured, staging: torch.Tensor) -> torch.Tensor:
    """Copy this rank's bytes into the reused staging buffer (grown if needed, and returned): the only
    part of a background snapshot that blocks training. The segments then point into the buffer.

    The copy is split into equal byte ranges copied in parallel by this thread and the helper
    threads (one per usable CPU, at most 4): the copy is bound by memory bandwidth, which one
    core does not saturate, and the training loop is blocked for this copy anyway."""
    if staging.numel() < captured.size:
        staging = torch.empty(captured.size, dtype=torch.uint8)
    buffer = staging.numpy()
    jobs = [CopyJob(piece.file_offset, view, piece.src_offset, piece.length) for piece, view in captured.segments]
    parts = _split(jobs, _copy_workers())
    futures = [helper_pool().submit(_copy_into, buffer, part) for part in parts[1:]]
    try:
        _copy_into(buffer, parts[0] if parts else [])
    finally:
        for future in futures:
            future.result()
    whole = memoryview(buffer)
    captured.segments = [(Slice(p.tensor, p.file_offset, p.file_offset, p.length), whole)
                         for p, _ in captured.segments]
    return staging


def _copy_workers() -> int:
    try:
        cpus = len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        cpus = os.cpu_count() or 1
    return max(1, min(4, cpus))


def _split(jobs: list[CopyJob], parts: int) -> list[list[CopyJob]]:
    """Cut copy jobs into `parts` lists of ~equal bytes."""
    total = sum(job.length for job in jobs)
    target = -(-total // parts) if total else 1
    out: list[list[CopyJob]] = [[]]
    room = target
    for dst, view, src, length in jobs:
        while length > room and len(out) < parts:
            if room:
                out[-1].append(CopyJob(dst, view, src, room))
                dst, src, length = dst + room, src + room, length - room
            out.append([])
            room = target
        out[-1].append(CopyJob(dst, view, src, length))
        room -= length
    return out


def _copy_into(staging: np.ndarray, jobs: list[CopyJob]) -> None:
    """numpy copies of plain bytes release the GIL (above a few hundred bytes), so parts run in parallel."""
    for dst, view, src, length in jobs:
        staging[dst: dst + length] = np.frombuffer(view, dtype=np.uint8, count=length, offset=src)


def divergence_samples(views: list[memoryview]) -> bytes:
    """One xxh3-64 per replicated tensor over the SAMPLE_BYTES at its middle (all of it when smaller).
    Ranks compare these at commit: state that differs between ranks (a per-rank generator, pipeline
    stages, ranks that diverged) is caught by name. One call per tensor, whatever its size: 0.1 ms for
    64 tensors, 25-50 ms for 20,000 (docs/PERFORMANCE.md). Bytes differing only outside the sample
    are not seen."""
    digests = [0] * len(views)
    for i, view in enumerate(views):
        start = (len(view) - SAMPLE_BYTES) // 2 if len(view) > SAMPLE_BYTES else 0
        digests[i] = xxh3_64_intdigest(view[start: start + SAMPLE_BYTES])
    return np.array(digests, dtype=np.uint64).tobytes()


def _record(tensor, found: Layout | None = None) -> TensorRecord:
    """A tensor's record; a DTensor's from its layout (its global shape: the local tensor is a shard)."""
    if found is not None:
        return TensorRecord(DTYPE_NAMES[tensor.dtype], list(found.shape), math.prod(found.shape) * tensor.dtype.itemsize,
                            chunks=[], placements=found.text)
    if isinstance(tensor, torch.Tensor):
        return TensorRecord(DTYPE_NAMES[tensor.dtype], list(tensor.shape), tensor.nbytes)
    return TensorRecord(f"numpy:{tensor.dtype.str}", list(tensor.shape), tensor.nbytes)
