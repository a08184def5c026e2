"""The geometry of sharded tensors: boxes (offsets, sizes) in a global tensor's index space.

A sharded tensor (FSDP2, TP, HSDP: a DTensor) is described by the boxes of the global tensor that
each mesh coordinate holds; one overlap planner then serves every restore (same world size, another
one, a plain process). Everything here is a pure function of shapes and placements, so every rank
computes the same answer without talking to the others; torch is touched only to read a DTensor's
layout.

Placements in pure form, one per mesh dim (what `layout` maps torch's objects to):
    ("R",)                     Replicate
    ("S", dim)                 Shard(dim): torch.chunk rules
    ("SS", dim, split_factor)  _StridedShard(dim, split_factor): what FSDP2 over a TP-sharded dim makes
    ("P",)                     Partial: not a layout of the data at all, refused
"""
from __future__ import annotations

import bisect
import itertools
import math
from typing import Any, NamedTuple, Sequence

import numpy as np

MAX_CHECK_CELLS = 1 << 22     # check_tiling refuses a compressed grid larger than this (hostile input)
MAX_CHECK_CORNERS = 1 << 23   # ... and more box corners than this to scatter into it


class Box(NamedTuple):
    offsets: tuple[int, ...]
    sizes: tuple[int, ...]     # every size >= 1: empty boxes are never produced or kept


def volume(box: Box) -> int:
    return math.prod(box[1])


def intersect(a: Box, b: Box) -> Box | None:
    """The common part of two boxes of the same rank, or None when they do not overlap."""
    if len(a[0]) != len(b[0]):
        raise ValueError(f"boxes of {len(a[0])} and {len(b[0])} dims cannot intersect")
    offsets, sizes = [], []
    for ao, asz, bo, bsz in zip(a[0], a[1], b[0], b[1]):
        lo, hi = max(ao, bo), min(ao + asz, bo + bsz)
        if hi <= lo:
            return None
        offsets.append(lo)
        sizes.append(hi - lo)
    return Box(tuple(offsets), tuple(sizes))


# -- layouts: which boxes a mesh coordinate holds --------------------------------------------------

def _chunk(index: np.ndarray, k: int) -> list[np.ndarray]:
    """torch.chunk's split into k pieces (the last ones possibly empty): c = ceil(n/k)."""
    n = len(index)
    c = -(-n // k)
    return [index[min(i * c, n):min((i + 1) * c, n)] for i in range(k)]


def _check_layout_args(shape, mesh_shape, placements, coordinate) -> None:
    if not (len(mesh_shape) == len(placements) == len(coordinate)):
        raise ValueError(f"mesh {tuple(mesh_shape)}, placements {list(placements)} and coordinate "
                         f"{tuple(coordinate)} must have one entry per mesh dim")
    for size, c in zip(mesh_shape, coordinate):
        if size < 1 or not 0 <= c < size:
            raise ValueError(f"coordinate {tuple(coordinate)} is outside mesh {tuple(mesh_shape)}")
    if any(n < 0 for n in shape):
        raise ValueError(f"negative size in shape {tuple(shape)}")


def _shard_dim(placement: tuple, ndim: int) -> int:
    dim = placement[1]
    if not -ndim <= dim < ndim:
        raise ValueError(f"placement {placement} names dim {dim} of a {ndim}-d tensor")
    return dim % ndim


def _local_indices(shape, mesh_shape, placements, coordinate) -> list[np.ndarray]:
    """Per tensor dim, the global indices this coordinate holds, in local order: each placement,
    in mesh-dim order, splits what the mesh dims before it left (as distribute_tensor does)."""
    index = [np.arange(n) for n in shape]
    for placement, k, c in zip(placements, mesh_shape, coordinate):
        kind = placement[0]
        if kind == "R":
            continue
        if kind == "P":
            raise ValueError("it has a Partial placement (a pending reduction, not a layout of the data): "
                             "call .redistribute() or .full_tensor() on it first")
        if kind not in ("S", "SS"):
            raise ValueError(f"unknown placement {placement!r}")
        dim = _shard_dim(placement, len(shape))
        if kind == "S":
            index[dim] = _chunk(index[dim], k)[c]
        else:   # _StridedShard: split into split_factor pieces, take piece c of each, in order
            split_factor = placement[2]
            if split_factor < 1:
                raise ValueError(f"placement {placement} needs split_factor >= 1")
            index[dim] = np.concatenate([_chunk(piece, k)[c] for piece in _chunk(index[dim], split_factor)])
    return index


def _runs(index: np.ndarray) -> list[tuple[int, int, int]]:
    """Maximal runs of consecutive values: (global start, local start, length)."""
    if len(index) == 0:
        return []
    breaks = np.flatnonzero(np.diff(index) != 1) + 1
    starts = np.concatenate(([0], breaks))
    stops = np.concatenate((breaks, [len(index)]))
    return [(int(index[a]), int(a), int(b - a)) for a, b in zip(starts, stops)]


def local_layout(shape: Sequence[int], mesh_shape: Sequence[int], placements: Sequence[tuple],
                 coordinate: Sequence[int]) -> tuple[tuple[Box, Box], ...]:
    """The global boxes this mesh coordinate holds, each with the box it occupies inside the local
    tensor (to_local()), in local row-major order. A coordinate holding nothing gets (); a 0-d
    tensor is one box of no dims. (layout() keeps the answer for each DTensor layout.)"""
    shape, mesh_shape, placements, coordinate = (tuple(shape), tuple(mesh_shape),
                                                 tuple(tuple(p) for p in placements), tuple(coordinate))
    _check_layout_args(shape, mesh_shape, placements, coordinate)
    runs = [_runs(index) for index in _local_indices(shape, mesh_shape, placements, coordinate)]
    out = []
    for combo in itertools.product(*runs):   # row-major over the runs of each dim, in local order
        sizes = tuple(r[2] for r in combo)
        out.append((Box(tuple(r[0] for r in combo), sizes), Box(tuple(r[1] for r in combo), sizes)))
    return tuple(out)


def holders(mesh_shape: Sequence[int], placements: Sequence[tuple],
            coordinate: Sequence[int]) -> list[tuple[int, ...]]:
    """The mesh coordinates holding exactly the same data as `coordinate` (itself included): those
    equal to it on every mesh dim that is not Replicate. Sorted."""
    if not len(mesh_shape) == len(placements) == len(coordinate):
        raise ValueError("mesh, placements and coordinate must have one entry per mesh dim")
    choices = [range(k) if p[0] == "R" else (c,) for k, p, c in zip(mesh_shape, placements, coordinate)]
    return [tuple(c) for c in itertools.product(*choices)]


# -- validating a set of chunks -------------------------------------------------------------------

def _box_arrays(shape: tuple, boxes: Sequence[Box]) -> tuple[np.ndarray, np.ndarray] | str:
    """Offsets and sizes as (n, ndim) int64 arrays, or the first problem with a single box."""
    ndim = len(shape)
    try:   # one conversion for the common case; the loop below only runs to name a bad chunk
        offsets = np.array([b[0] for b in boxes], dtype=np.int64).reshape(len(boxes), ndim)
        sizes = np.array([b[1] for b in boxes], dtype=np.int64).reshape(len(boxes), ndim)
    except (OverflowError, TypeError, ValueError, IndexError):
        for i, box in enumerate(boxes):
            if len(box) != 2 or len(box[0]) != ndim or len(box[1]) != ndim:
                return f"chunk {i} does not have {ndim} dims like the tensor"
        return "chunk offsets or sizes are not small integers"
    bad = np.flatnonzero((sizes < 1).any(axis=1))
    if len(bad):
        return f"chunk {bad[0]} is empty (a size below 1)"
    # offsets + sizes cannot overflow: both are below 2**63 and we compare sizes to room left
    bad = np.flatnonzero(((offsets < 0) | (sizes > np.array(shape, dtype=np.int64) - offsets)).any(axis=1))
    if len(bad):
        return f"chunk {bad[0]} out of bounds"
    return offsets, sizes


def _check_dim0_slabs(shape, offsets: np.ndarray, sizes: np.ndarray) -> str | None:
    order = np.argsort(offsets[:, 0], kind="stable")
    starts, ends = offsets[order, 0], offsets[order, 0] + sizes[order, 0]
    clash = np.flatnonzero(starts[1:] < ends[:-1])
    if len(clash):
        return f"chunks {min(order[clash[0]], order[clash[0] + 1])} and " \
               f"{max(order[clash[0]], order[clash[0] + 1])} overlap"
    return _hole(shape, sizes)


def _hole(shape, sizes: np.ndarray) -> str | None:
    """With no overlap and everything in bounds, the chunks tile iff their volumes add up."""
    numel = math.prod(shape)
    if numel < 1 << 62:   # each in-bounds chunk then has a volume int64 holds; add them as Python ints
        covered = sum(np.prod(sizes, axis=1).tolist())
    else:
        covered = sum(math.prod(row) for row in sizes.tolist())
    return None if covered == numel else f"hole: {numel - covered} of {numel} elements not covered"


def _distinct(values: np.ndarray) -> np.ndarray:
    """np.unique, sorted, by sorting (numpy 2's hash-based unique took 0.3 s for 200k edges)."""
    values = np.sort(values)
    return values[np.concatenate(([True], values[1:] != values[:-1]))]


def _check_grid(shape, offsets: np.ndarray, sizes: np.ndarray) -> str | None:
    """Coordinate compression: count how many chunks cover each cell between breakpoints (a
    difference array: +-1 at every box corner, then a running sum along each dim)."""
    ends = offsets + sizes
    points = [_distinct(np.concatenate(([0, n], offsets[:, d], ends[:, d]))) for d, n in enumerate(shape)]
    live = [d for d in range(len(shape)) if len(points[d]) > 2]   # dims every chunk spans fully drop out
    grid = tuple(len(points[d]) - 1 for d in live)
    if math.prod(grid) > MAX_CHECK_CELLS:
        return f"too many distinct chunk edges to check ({math.prod(grid)} cells)"
    if len(offsets) << len(live) > MAX_CHECK_CORNERS:
        return f"too many chunks to check ({len(offsets)} chunks cut {len(live)} dims)"
    lo = [np.searchsorted(points[d], offsets[:, d]) for d in live]
    hi = [np.searchsorted(points[d], ends[:, d]) for d in live]
    flat, weight = [], []
    for corner in itertools.product((0, 1), repeat=len(live)):
        idx = [hi[j] if bit else lo[j] for j, bit in enumerate(corner)]
        keep = np.all([i < g for i, g in zip(idx, grid)], axis=0) if idx else np.ones(len(offsets), bool)
        flat.append(np.ravel_multi_index([i[keep] for i in idx], grid) if idx else np.zeros(keep.sum(), np.int64))
        weight.append(np.full(int(keep.sum()), -1.0 if sum(corner) % 2 else 1.0))
    counts = np.bincount(np.concatenate(flat), np.concatenate(weight), math.prod(grid)).reshape(grid)
    for axis in range(len(grid)):
        counts = np.cumsum(counts, axis=axis)
    if counts.size and counts.max() > 1.5:
        cell = np.unravel_index(int(np.argmax(counts > 1.5)), grid)
        inside = np.all([(lo[j] <= cell[j]) & (cell[j] < hi[j]) for j in range(len(live))], axis=0)
        a, b = np.flatnonzero(inside)[:2]
        return f"chunks {a} and {b} overlap"
    return _hole(shape, sizes)


_FEW = 64   # chunks checked in plain Python first: numpy's per-call cost is most of the check for a few


def _few_dim0_slabs_tile(shape: tuple, boxes: Sequence[Box]) -> bool:
    """True when the boxes are dim-0 slabs (FSDP2's shards) that tile the shape: the common case, in
    plain Python (~10x faster than the arrays for a handful of chunks: it runs once per sharded tensor
    of every manifest read). False means "not shown here": the general check then names the problem."""
    rest, zeros = shape[1:], (0,) * (len(shape) - 1)
    spans = []
    for box in boxes:
        if len(box) != 2 or len(box[0]) != len(shape) or len(box[1]) != len(shape):
            return False
        offsets, sizes = box
        start, size = offsets[0], sizes[0]
        if type(start) is not int or type(size) is not int or start < 0 or size < 1 \
                or tuple(offsets[1:]) != zeros or tuple(sizes[1:]) != rest:
            return False
        spans.append((start, size))
    spans.sort()
    end = 0
    for start, size in spans:
        if start != end:
            return False
        end = start + size
    return end == shape[0]


def dim0_slabs_in_order(offsets: list[int], sizes: list[int], cell: int, end: int, dims: int,
                        shape: Sequence[int]) -> bool:
    """Whether the boxes whose offsets and sizes are [cell, end) of two flat int columns (dims entries
    per box, box after box: a manifest's chunk table) are FSDP2's dim-0 slabs in order, tiling the
    shape: each at least a row, each where the one before ends, the last at the end of dim 0, every
    other dim whole. Whole columns at a time, in C: a 20k-tensor state has 60k chunks. False means
    "not shown here": check_tiling then decides, and names the problem."""
    if not dims or end == cell:
        return False
    rows = sizes[cell: end: dims]
    starts = list(itertools.accumulate(rows, initial=0))
    if starts.pop() != shape[0] or offsets[cell: end: dims] != starts or min(rows) < 1:
        return False
    count = len(rows)
    return all(sizes[d: end: dims].count(shape[d - cell]) == count and not any(offsets[d: end: dims])
               for d in range(cell + 1, cell + dims))


def check_tiling(shape: Sequence[int], boxes: Sequence[Box]) -> str | None:
    """None if the boxes tile the tensor exactly (each in bounds, no size below 1, no overlap, no
    hole), else a short text naming the problem. Bounded for hostile input: it refuses (returns a
    problem) rather than build a compressed grid over MAX_CHECK_CELLS cells."""
    shape = tuple(shape)
    if any(not isinstance(n, (int, np.integer)) or n < 0 or n >= 1 << 62 for n in shape):
        return f"bad tensor shape {shape}"
    if not shape:
        return None if len(boxes) == 1 and tuple(boxes[0][0]) == () and tuple(boxes[0][1]) == () \
            else f"a 0-d tensor is one chunk of no dims, not {len(boxes)} chunks"
    if len(boxes) <= _FEW and _few_dim0_slabs_tile(shape, boxes):
        return None
    arrays = _box_arrays(shape, boxes)
    if isinstance(arrays, str):
        return arrays
    offsets, sizes = arrays
    if not len(boxes):
        return None if math.prod(shape) == 0 else f"hole: no chunks for {math.prod(shape)} elements"
    full = np.array(shape[1:], dtype=np.int64)
    if (offsets[:, 1:] == 0).all() and (sizes[:, 1:] == full).all():   # FSDP2's dim-0 slabs: the common case
        return _check_dim0_slabs(shape, offsets, sizes)
    return _check_grid(shape, offsets, sizes)


# -- reading: which saved chunks a target needs, and where their bytes lie ------------------------

def byte_span(chunk: Box, region: Box, itemsize: int) -> tuple[int, int, bool]:
    """For a region (global coordinates) inside a chunk: the (start, stop) bytes of the smallest
    range of the chunk's row-major bytes holding it, and whether the region is exactly that range
    (a dim-0 slab or a single row run: read it straight into place)."""
    if len(chunk[0]) != len(region[0]) or intersect(chunk, region) != tuple(map(tuple, region)):
        raise ValueError(f"region {region} is not inside chunk {chunk}")
    stride, first, last = 1, 0, 0
    for off, size, c_off, c_size in reversed(list(zip(region[0], region[1], chunk[0], chunk[1]))):
        first += (off - c_off) * stride
        last += (off - c_off + size - 1) * stride
        stride *= c_size
    start, stop = first * itemsize, (last + 1) * itemsize
    return start, stop, stop - start == volume(region) * itemsize


def range_boxes(sizes: Sequence[int], first: int, stop: int) -> list[Box]:
    """The elements [first, stop) of a box of `sizes` in row-major order, as boxes of it (offsets from
    its corner): at most 2 x dims - 1 of them (a partial run at each end of each dim, whole slabs
    between)."""
    if first >= stop:
        return []
    if len(sizes) <= 1:
        return [Box((first,), (stop - first,))] if sizes else [Box((), ())]
    inner = math.prod(sizes[1:])
    (row, at), (last, end) = divmod(first, inner), divmod(stop, inner)
    if row == last:
        return [Box((row, *b.offsets), (1, *b.sizes)) for b in range_boxes(sizes[1:], at, end)]
    out = []
    if at:
        out += [Box((row, *b.offsets), (1, *b.sizes)) for b in range_boxes(sizes[1:], at, inner)]
        row += 1
    if last > row:
        out.append(Box((row,) + (0,) * (len(sizes) - 1), (last - row, *sizes[1:])))
    if end:
        out += [Box((last, *b.offsets), (1, *b.sizes)) for b in range_boxes(sizes[1:], 0, end)]
    return out


class SavedIndex:
    """Saved chunks sorted on dim 0, built once per tensor so that planning many targets is not
    quadratic: a target only looks at chunks whose dim-0 start lies within reach of its own rows."""

    def __init__(self, saved: Sequence[Box]):
        self.saved = list(saved)
        order = sorted(range(len(self.saved)), key=lambda i: self.saved[i][0][0] if self.saved[i][0] else 0)
        self.order = order
        self.starts = [self.saved[i][0][0] if self.saved[i][0] else 0 for i in order]
        self.reach = max((b[1][0] for b in self.saved if b[1]), default=0)   # the longest chunk on dim 0

    def plan(self, target: Box) -> list[tuple[int, Box]]:
        if not target[0]:   # 0-d: every saved chunk (there should be one) holds it all
            return [(i, Box((), ())) for i in range(len(self.saved))]
        lo = bisect.bisect_right(self.starts, target[0][0] - self.reach)
        hi = bisect.bisect_left(self.starts, target[0][0] + target[1][0])
        out = []
        for i in self.order[lo:hi]:
            region = intersect(self.saved[i], target)
            if region is not None:
                out.append((i, region))
        out.sort()
        return out


def read_plan(saved: Sequence[Box] | SavedIndex, target: Box) -> list[tuple[int, Box]]:
    """(saved chunk index, overlap in global coordinates) for every saved chunk overlapping target,
    sorted by chunk index. Pass a SavedIndex when planning many targets against the same chunks."""
    index = saved if isinstance(saved, SavedIndex) else SavedIndex(saved)
    return index.plan(target)


# -- torch: reading a DTensor's layout --------------------------------------------------------------

def _pure_placement(placement: Any) -> tuple:
    from torch.distributed.tensor import Partial, Replicate, Shard
    from torch.distributed.tensor.placement_types import _StridedShard

    if isinstance(placement, _StridedShard):   # before Shard: what it is a kind of may change
        return ("SS", placement.dim, int(placement.split_factor))
    if isinstance(placement, Shard):
        return ("S", placement.dim)
    if isinstance(placement, Replicate):
        return ("R",)
    if isinstance(placement, Partial):
        return ("P",)
    raise ValueError(f"unknown DTensor placement {placement!r}")


def _coordinate(mesh: Any) -> tuple[int, ...] | None:
    """This rank's place in the mesh, found from its global rank rather than get_coordinate(): a
    mesh object caches the rank it was built on, and torch shares equal meshes between DTensors
    (one process playing several ranks, as tests do with the fake backend, got another rank's)."""
    import torch.distributed as dist

    if not dist.is_initialized():
        coordinate = mesh.get_coordinate()
        return None if coordinate is None else tuple(coordinate)
    rank = dist.get_rank()
    key = (id(mesh), rank)
    hit = _COORDINATES.get(key)
    if hit is not None and hit[0] is mesh:
        return hit[1]
    where = np.argwhere(_ranks(mesh) == rank)
    coordinate = tuple(int(c) for c in where[0]) if len(where) else None
    if len(_COORDINATES) >= 64:
        _COORDINATES.clear()
    _COORDINATES[key] = (mesh, coordinate)
    return coordinate


class Layout(NamedTuple):
    """A DTensor's layout as this rank sees it, with what follows from it (placements in pure form)."""

    shape: tuple[int, ...]
    mesh_shape: tuple[int, ...]
    placements: tuple[tuple, ...]
    coordinate: tuple[int, ...] | None      # this rank's place in the mesh; None outside it
    boxes: tuple[tuple[Box, Box], ...]      # local_layout: the global boxes held here, each with its local box
    holders: tuple[int, ...]                # the global ranks holding the same data (this one included)
    me: int                                 # this rank's position among them
    text: str                               # mesh shape and torch's placements, for inspect


def layout(tensor: Any) -> Layout:
    """A DTensor's Layout, computed once per distinct (mesh, placements, shape, coordinate): a model's
    tensors share few, and each snapshot and restore asks for every one of them (the separate
    queries were ~7 us a tensor, 0.1 s of a 20,000-tensor capture)."""
    mesh = tensor.device_mesh
    coordinate = _coordinate(mesh)
    key = (id(mesh), tensor.placements, tensor.shape, coordinate)
    hit = _LAYOUTS.get(key)
    if hit is not None and hit[0] is mesh:
        return hit[1]
    shape, ranks = tuple(tensor.shape), _ranks(mesh)
    placements = tuple(_pure_placement(p) for p in tensor.placements)
    text = f"mesh {ranks.shape} {tuple(tensor.placements)}"
    if coordinate is None:
        found = Layout(shape, ranks.shape, placements, None, (), (), 0, text)
    else:
        mates = holders(ranks.shape, placements, coordinate)
        found = Layout(shape, ranks.shape, placements, coordinate,
                       local_layout(shape, ranks.shape, placements, coordinate),
                       tuple(int(ranks[c]) for c in mates), mates.index(coordinate), text)
    if len(_LAYOUTS) >= 4096:
        _LAYOUTS.clear()
    _LAYOUTS[key] = (mesh, found)
    return found


# (id(mesh), placements, shape, coordinate) -> (mesh, Layout): the mesh is kept alive, so its id is not reused
_LAYOUTS: dict[tuple, tuple[Any, Layout]] = {}
_MESH_RANKS: dict[int, tuple[Any, np.ndarray]] = {}   # id(mesh) -> (mesh, its ranks): the mesh is kept alive
# (id(mesh), global rank) -> (mesh, that rank's coordinate): the rank is in the key for one process
# playing several ranks (tests with the fake backend)
_COORDINATES: dict[tuple[int, int], tuple[Any, tuple[int, ...] | None]] = {}


def _ranks(mesh: Any) -> np.ndarray:
    """The global ranks of a mesh, shaped like it, computed once per mesh object: DeviceMesh.mesh
    rebuilds the tensor from the mesh's layout on every access (~0.4 ms on torch 2.13), which for a
    20,000-tensor FSDP2 state was most of a snapshot's capture and so of its async stall. Its shape is
    the mesh's: DeviceMesh.shape is recomputed from the layout on every access too (~4 us)."""
    hit = _MESH_RANKS.get(id(mesh))
    if hit is not None and hit[0] is mesh:
        return hit[1]
    ranks = mesh.mesh.cpu().numpy()
    ranks.flags.writeable = False
    if len(_MESH_RANKS) >= 64:
        _MESH_RANKS.clear()
    _MESH_RANKS[id(mesh)] = (mesh, ranks)
    return ranks
