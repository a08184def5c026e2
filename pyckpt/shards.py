"""Sharded tensors (DTensor: FSDP2, HSDP, tensor parallel) on this rank: the parts of their boxes it
writes in a snapshot, and where a saved tensor's boxes go when it is restored (a Target).

A box held by several ranks (Replicate placements, HSDP replicas) is written once: its holders split
its bytes between them, or one of them writes it whole when it is small. Every holder computes the same
split from the mesh alone, so no rank has to ask the others.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Callable, NamedTuple, Sequence

import torch

from .boxes import Box, Layout, SavedIndex, byte_span, intersect, layout, range_boxes
from .manifest import ChunkRows
from .sysio import byte_view

if TYPE_CHECKING:   # imported where a DTensor exists: torch.distributed.tensor costs 1.4 s to import
    from torch.distributed.tensor import DTensor

# A box held by several ranks smaller than this is written whole by one of them (chosen by its
# position, so the small ones spread over the holders) rather than cut into tiny parts.
SPLIT_MIN = 1 << 20

# The checksummed pieces of a sharded tensor's boxes: smaller than a replicated tensor's (MAX_PIECE,
# 16 MiB) because a restore on another layout reads whole pieces at the edges of what it needs. With
# 16 MiB pieces a 1 -> 4 rank restore of 64 MiB weights read 2x its bytes; with 2 MiB pieces at most
# 4 MiB more per tensor (a 1.5 GiB state has 768 pieces: their per-piece cost is negligible).
SHARD_PIECE = 2 << 20


class ShardPart(NamedTuple):
    """Bytes of one box of a sharded tensor that this rank writes."""

    tensor: int                 # index in the snapshot's tensor list
    offsets: tuple[int, ...]    # the box
    sizes: tuple[int, ...]
    start: int                  # where the part begins in the box's row-major bytes
    length: int
    ranks: tuple[int, ...]      # the ranks holding the box
    view: memoryview            # the part's bytes


def local_tensor(tensor: DTensor) -> torch.Tensor:
    """The DTensor's local tensor, outside autograd: pyckpt only reads and writes its bytes. That is
    `_local_tensor`, which to_local() returns itself under no_grad; for a parameter (every FSDP2 one)
    to_local() returns a new view of it instead (~1.2 us a call on torch 2.13: 18 ms of each snapshot
    and restore of a 20,000-tensor state), and with grad mode on it goes through an autograd Function
    (~50 us). A torch without the attribute gets to_local() under no_grad (the same storage)."""
    local = getattr(tensor, "_local_tensor", None)
    if isinstance(local, torch.Tensor):
        return local
    if not torch.is_grad_enabled():
        return tensor.to_local()
    with torch.no_grad():
        return tensor.to_local()


def parts_to_write(index: int, tensor: DTensor, found: Layout) -> list[ShardPart]:
    """The parts of a DTensor's boxes this rank writes (none when it is outside the tensor's mesh),
    given its layout(tensor)."""
    coordinate, boxes, ranks, me = found.coordinate, found.boxes, found.holders, found.me
    if coordinate is None:
        return []
    local, itemsize = local_tensor(tensor), tensor.dtype.itemsize
    local_shape, count = tuple(local.shape), len(ranks)
    out = []
    for k, (box, inside) in enumerate(boxes):
        view = byte_view(local[_slices(inside)] if inside.sizes != local_shape else local)
        for start, length in _my_share(len(view), itemsize, me, count, index + k):
            out.append(ShardPart(index, box.offsets, box.sizes, start, length, ranks, view))
    return out


def _my_share(nbytes: int, itemsize: int, me: int, count: int, salt: int) -> list[tuple[int, int]]:
    """(start, length) of the bytes of a box that holder `me` of `count` writes: an equal cut on
    element boundaries, or all of a small box for one of them."""
    if count == 1:
        return [(0, nbytes)] if nbytes else []
    if nbytes < SPLIT_MIN:
        return [(0, nbytes)] if salt % count == me and nbytes else []
    elements = nbytes // itemsize
    start, stop = elements * me // count * itemsize, elements * (me + 1) // count * itemsize
    return [(start, stop - start)] if stop > start else []


def _slices(box: Box) -> tuple[slice, ...]:
    return tuple(slice(o, o + s) for o, s in zip(box.offsets, box.sizes))


def pieces_of(length: int) -> list[tuple[int, int]]:
    """A part of `length` bytes cut into checksummed pieces: (start in the part, length)."""
    return [(off, min(SHARD_PIECE, length - off)) for off in range(0, length, SHARD_PIECE)]


# ---------------------------------------------------------------------------------------------
# Restore: where a saved tensor's boxes go on this rank
# ---------------------------------------------------------------------------------------------

@dataclass
class Target:
    """Where a saved tensor is read to on this rank: the global boxes it needs, each at a box of the
    local tensor (local_shape, the saved dtype); into `buffer` when the live one can take the bytes in
    place, else a new tensor. build(local) gives the value to load (a DTensor, or the tensor)."""

    boxes: list[tuple[Box, Box]]
    local_shape: tuple[int, ...]
    buffer: torch.Tensor | None
    build: Callable[[torch.Tensor], Any]


def whole_target(shape: tuple[int, ...], buffer: torch.Tensor | None = None) -> Target:
    """The whole tensor (a plain process, a DDP model restoring a sharded snapshot)."""
    box = Box((0,) * len(shape), tuple(shape))
    return Target([(box, box)] if all(shape) else [], tuple(shape), buffer, _same)


def dtensor_target(live: DTensor, dtype: torch.dtype, in_place: bool = True) -> Target:
    """The boxes a live DTensor holds on this rank; read into its own local tensor when `in_place`
    and it is a contiguous CPU tensor of the saved dtype (a parameter restored in place), else into a
    new tensor that becomes a DTensor of the same layout (a fresh optimizer's state)."""
    boxes = layout(live).boxes
    local = local_tensor(live)
    fits = in_place and local.is_cpu and local.is_contiguous() and local.dtype == dtype
    buffer = (local.detach() if local.requires_grad else local) if fits else None

    def build(value: torch.Tensor) -> DTensor:
        if value is buffer:
            return live
        from torch.distributed.tensor import DTensor

        return DTensor.from_local(value.to(local.device), live.device_mesh, live.placements, run_check=False,
                                  shape=live.shape, stride=live.stride())
    return Target(boxes, tuple(local.shape), buffer, build)


def _same(value: torch.Tensor) -> torch.Tensor:
    return value


class Edge(NamedTuple):
    """A piece read whole for part of its bytes: [start, start + dest.numel()) of it go to `dest` (uint8)
    once it is verified. The reader reads it into its helper thread's scratch buffer (one per thread,
    reused job after job), so a restore's scratch is bounded by the threads, not by the count of edge
    pieces (a 20,000-tensor state restored 1 -> 4 has one at every tensor: 1.3 GiB of scratch when it
    was allocated up front)."""

    start: int
    dest: torch.Tensor

    def put(self, data: torch.Tensor) -> None:
        """Copy its part out of the verified piece (`data`: its bytes, uint8)."""
        self.dest.copy_(data[self.start: self.start + self.dest.numel()])


class Strided(NamedTuple):
    """A piece under a strided overlap (a column block of a row-major chunk: a tensor-parallel reshard),
    read like an Edge into its job's scratch. Once it is verified, the elements of it inside the
    region go to their views of the destination: `parts` are (sizes, strides, first element in the
    piece, dest), at most 2 x dims - 1 per piece (a piece is a row-major range of its chunk). Planned
    with scratch up front, a fresh optimizer's column reshard held twice its local state."""

    dtype: torch.dtype
    parts: list[tuple[tuple[int, ...], tuple[int, ...], int, torch.Tensor]]

    def put(self, data: torch.Tensor) -> None:
        elements = data.view(self.dtype)
        base = elements.storage_offset()
        for sizes, strides, first, dest in self.parts:
            dest.copy_(elements.as_strided(sizes, strides, base + first))


def plan_reads(chunks: list, target: Target, local: torch.Tensor) -> list[tuple[Any, Any]]:
    """How to fill `local` (the target's tensor, of the saved dtype) from the saved chunks: the pieces to
    read, each with where its bytes go. A piece wholly inside a range that is contiguous in both the
    chunk and `local` is read straight into place (a memoryview); one at an edge of such a range is an
    Edge; one under a strided overlap is a Strided. Edges and Strideds hold no memory: the reader
    gives them scratch while their read job runs (every piece is checksummed whole)."""
    local_bytes = byte_view(local) if local.numel() else memoryview(b"")
    same = _saved_as_is(chunks, target, local.shape)
    if same is not None:
        return _contiguous_all(same, local_bytes)
    itemsize = local.element_size()
    whole_local = Box((0,) * local.dim(), tuple(local.shape))
    index = SavedIndex([c.box for c in chunks])
    reads: list[tuple[Any, Any]] = []
    for box, inside in target.boxes:
        for c, region in index.plan(box):
            chunk = chunks[c]
            start, stop, exact = byte_span(chunk.box, region, itemsize)
            spot = Box(tuple(i + r - b for i, r, b in zip(inside.offsets, region.offsets, box.offsets)), region.sizes)
            at, _, dest_exact = byte_span(whole_local, spot, itemsize)
            if exact and dest_exact:
                _contiguous(chunk.pieces, start, stop, local_bytes[at: at + stop - start], reads)
            else:
                _strided(chunk, region, start, stop, itemsize, local[_slices(spot)], reads)
    return reads


def _saved_as_is(chunks: Sequence, target: Target, local_shape: tuple[int, ...]) -> list | None:
    """The pieces of the saved chunk that is exactly the local tensor (a restore on the layout it was
    saved from), or None. The common case, and the per-tensor cost of a 20,000-tensor state: then no
    index, byte spans or Chunk objects are needed."""
    if len(target.boxes) != 1:
        return None
    box, inside = target.boxes[0]
    if inside.sizes != local_shape or any(inside.offsets):
        return None
    if isinstance(chunks, ChunkRows):   # a read manifest's rows: only this one's pieces are made
        return chunks.pieces_at(box.offsets, box.sizes)
    offsets, sizes = list(box.offsets), list(box.sizes)
    for chunk in chunks:
        if chunk.offsets == offsets and chunk.sizes == sizes:
            return chunk.pieces
    return None


def _contiguous_all(pieces: list, dest: memoryview) -> list[tuple[Any, memoryview]]:
    """Every piece of a chunk straight into its place in dest (the chunk's bytes, in order)."""
    reads, pos = [], 0
    for piece in pieces:
        reads.append((piece, dest[pos: pos + piece.length]))
        pos += piece.length
    return reads


def _contiguous(pieces: list, start: int, stop: int, dest: memoryview, reads: list) -> None:
    """Bytes [start, stop) of a chunk into dest: whole pieces straight in, the edge ones as Edges."""
    pos = 0
    for piece in pieces:
        lo, hi = pos, pos + piece.length
        pos = hi
        if hi <= start or lo >= stop:
            continue
        if start <= lo and hi <= stop:
            reads.append((piece, dest[lo - start: hi - start]))
            continue
        a, b = max(lo, start), min(hi, stop)
        reads.append((piece, Edge(a - lo, torch.frombuffer(dest[a - start: b - start], dtype=torch.uint8))))


def _strided(chunk: Any, region: Box, start: int, stop: int, itemsize: int, dest: torch.Tensor,
             reads: list) -> None:
    """A region that is not one byte range (a column block): each piece of the chunk holding some of
    its elements is a Strided, with the boxes of the region it holds. Pieces within [start, stop)
    holding none of it (a row longer than a piece, outside the block) are not read."""
    strides, step = [], 1
    for size in reversed(chunk.sizes):
        strides.append(step)
        step *= size
    strides = tuple(reversed(strides))
    inside = Box(tuple(o - c for o, c in zip(region.offsets, chunk.offsets)), region.sizes)   # chunk coordinates
    pos = 0
    for piece in chunk.pieces:
        lo, hi = pos, pos + piece.length
        pos = hi
        if hi <= start or lo >= stop:
            continue
        parts = []
        for held in range_boxes(chunk.sizes, lo // itemsize, hi // itemsize):
            part = intersect(held, inside)
            if part is not None:
                first = sum(o * s for o, s in zip(part.offsets, strides)) - lo // itemsize
                spot = tuple(slice(o - i, o - i + n) for o, i, n in zip(part.offsets, inside.offsets, part.sizes))
                parts.append((part.sizes, strides, first, dest[spot]))
        if parts:
            reads.append((piece, Strided(dest.dtype, parts)))
