"""Which rank writes which bytes, and where they land.

Replicated state (DDP: every rank holds the same tensors) is laid out as one virtual byte stream
(each tensor 64-byte aligned) cut into `world_size` contiguous ranges of equal size: rank r writes
range r to its own file data-r.bin, so every rank writes 1/N of the bytes in parallel. A tensor
that straddles a cut simply has pieces in two files. Each rank's private state (RNG) follows its
share in its own file.

Slices are named tuples (cheap to build: a plan has one per tensor, 20k+ for real models), and
plans are pure functions of the byte sizes, so callers may cache them while shapes do not change.
"""
from __future__ import annotations

import bisect
from typing import NamedTuple

from .manifest import MAX_PIECE, align


class Slice(NamedTuple):
    tensor: int        # index into the tensor list the plan was made for
    src_offset: int    # byte offset inside that tensor
    file_offset: int   # byte offset inside the writing rank's file
    length: int


class RankPlan(NamedTuple):
    slices: list[Slice]   # in file order
    size: int             # bytes of this rank's share (the file's length before private state)


def _cut(out: list[Slice], tensor: int, start: int, length: int, file_base: int, src_base: int) -> None:
    for off in range(0, length, MAX_PIECE):
        out.append(Slice(tensor, src_base + off, start - file_base + off, min(MAX_PIECE, length - off)))


def plan_replicated(sizes: list[int], world_size: int) -> list[RankPlan]:
    """Split tensors of the given byte sizes across `world_size` files of (nearly) equal size."""
    starts, pos = [], 0
    for size in sizes:
        pos = align(pos)
        starts.append(pos)
        pos += size
    total = pos
    bounds = [min(total, align(total * r // world_size)) for r in range(world_size)] + [total]
    plans: list[list[Slice]] = [[] for _ in range(world_size)]
    r = 0
    for index, (start, size) in enumerate(zip(starts, sizes)):
        end = start + size
        while r < world_size - 1 and start >= bounds[r + 1]:
            r += 1
        if end <= bounds[r + 1] and size <= MAX_PIECE:   # the common case: one slice in one file
            if size:
                plans[r].append(Slice(index, 0, start - bounds[r], size))
            continue
        q = min(bisect.bisect_right(bounds, start) - 1, world_size - 1)
        while start < end:
            stop = min(end, bounds[q + 1])
            if stop > start:
                _cut(plans[q], index, start, stop - start, bounds[q], start - starts[index])
            start = stop
            q += 1
    return [RankPlan(plans[r], bounds[r + 1] - bounds[r]) for r in range(world_size)]


def plan_private(sizes: list[int], base: int) -> RankPlan:
    """Lay out one rank's private tensors after `base` bytes of its file."""
    slices: list[Slice] = []
    pos = base
    for index, size in enumerate(sizes):
        pos = align(pos)
        _cut(slices, index, pos, size, 0, 0)
        pos += size
    return RankPlan(slices, pos - base)
