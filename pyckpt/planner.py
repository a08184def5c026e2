"""Which rank writes which bytes, and where they land.

Replicated state (DDP: every rank holds the same tensors) is laid out as one virtual byte stream
(each tensor 64-byte aligned) cut into `world_size` contiguous ranges of equal size: rank r writes
range r to its own file data-r.bin, so every rank writes 1/N of the bytes in parallel. A tensor
that straddles a cut simply has pieces in two files. Each rank's private state (RNG) follows its
share in its own file.
"""
from __future__ import annotations

import bisect
from dataclasses import dataclass

from .manifest import MAX_PIECE, align


@dataclass(frozen=True)
class Slice:
    tensor: int        # index into the tensor list the plan was made for
    src_offset: int    # byte offset inside that tensor
    file_offset: int   # byte offset inside the writing rank's file
    length: int


@dataclass(frozen=True)
class RankPlan:
    slices: list[Slice]   # in file order
    size: int             # bytes of this rank's share (the file's length before private state)


def _cut(tensor: int, start: int, length: int, file_base: int, src_base: int) -> list[Slice]:
    return [
        Slice(tensor, src_base + off, start - file_base + off, min(MAX_PIECE, length - off))
        for off in range(0, length, MAX_PIECE)
    ]


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
    for index, (start, size) in enumerate(zip(starts, sizes)):
        end = start + size
        r = min(bisect.bisect_right(bounds, start) - 1, world_size - 1)
        while start < end:
            stop = min(end, bounds[r + 1])
            if stop > start:
                plans[r].extend(_cut(index, start, stop - start, bounds[r], start - starts[index]))
            start = stop
            r += 1
    return [RankPlan(plans[r], bounds[r + 1] - bounds[r]) for r in range(world_size)]


def plan_private(sizes: list[int], base: int) -> RankPlan:
    """Lay out one rank's private tensors after `base` bytes of its file."""
    slices, pos = [], base
    for index, size in enumerate(sizes):
        pos = align(pos)
        slices.extend(_cut(index, pos, size, 0, 0))
        pos += size
    return RankPlan(slices, pos - base)
