"""pyckpt.boxes: the layouts against torch's own sharding (fake process group: one process plays any
rank of any mesh), and the read planner and tiling check against brute force over numpy indices."""
from __future__ import annotations

import contextlib
import itertools
import math
import time

import numpy as np
import pytest
import torch
import torch.distributed as dist
from hypothesis import example, given, settings
from hypothesis import strategies as st
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.tensor import Replicate, Shard, distribute_tensor
from torch.distributed.tensor.placement_types import _StridedShard
from torch.testing._internal.distributed.fake_pg import FakeStore

from pyckpt.boxes import (Box, SavedIndex, byte_span, check_tiling, holders, intersect, layout,
                          local_layout, range_boxes, read_plan, volume, _ranks)
from pyckpt.manifest import Chunk, Piece
from pyckpt.shards import Target, local_tensor, plan_reads

MESHES = [(1,), (2,), (3,), (4,), (2, 2), (2, 3), (3, 2)]


@contextlib.contextmanager
def fake_rank(mesh_shape, rank, names=None):
    """Be `rank` of a world the size of the mesh. The fake backend does no communication, so a new
    group per example (world sizes differ) costs milliseconds; destroy it before the next."""
    dist.init_process_group("fake", store=FakeStore(), rank=rank, world_size=math.prod(mesh_shape))
    try:
        yield init_device_mesh("cpu", mesh_shape, mesh_dim_names=names)
    finally:
        dist.destroy_process_group()


def to_torch(placement):
    if placement[0] == "R":
        return Replicate()
    if placement[0] == "S":
        return Shard(placement[1])
    return _StridedShard(placement[1], split_factor=placement[2])


def expected_local(shape, layout, local_shape):
    """What the local tensor must hold per the layout: global flat indices at each local box (-1 where
    no box says anything, which must not remain)."""
    ids = np.arange(math.prod(shape)).reshape(shape)
    out = np.full(local_shape, -1, dtype=np.int64)
    for g, loc in layout:
        dst = out[slices(loc) + (...,)]     # the ellipsis keeps a 0-d box a view, not a scalar
        assert (dst == -1).all(), "local boxes overlap"
        dst[...] = ids[slices(g)]
    return out


def placements_for(ndim):
    if ndim == 0:
        return st.just(("R",))
    return st.one_of(st.just(("R",)), st.tuples(st.just("S"), st.integers(0, ndim - 1)),
                     st.tuples(st.just("SS"), st.integers(0, ndim - 1), st.integers(1, 4)))


@st.composite
def layouts(draw, max_size=9):
    mesh_shape = draw(st.sampled_from(MESHES))
    shape = tuple(draw(st.lists(st.integers(0, max_size) | st.integers(1, max_size), min_size=0, max_size=3)))
    placements = [draw(placements_for(len(shape))) for _ in mesh_shape]
    return shape, mesh_shape, placements


@settings(deadline=None, max_examples=200)
@given(layouts(), st.integers(0, 5))
@example(((7, 3), (4,), [("S", 0)]), 3)                        # 7 rows over 4: the last shard holds 1
@example(((1, 5), (4,), [("S", 0)]), 2)                        # 1 row over 4: empty shards
@example(((), (2, 2), [("R",), ("R",)]), 3)                    # 0-d
@example(((7, 3), (2, 2), [("SS", 0, 2), ("S", 0)]), 1)        # FSDP2 over TP 2 (dp, tp)
@example(((7, 4), (2, 3), [("SS", 0, 3), ("S", 0)]), 3)        # FSDP2 over TP 3, uneven
@example(((5, 7), (2, 3), [("S", 0), ("S", 1)]), 5)            # FSDP2 over rowwise TP
@example(((6, 2, 5), (2, 2), [("R",), ("S", 2)]), 2)           # HSDP-like, 3-D
def test_local_layout_is_what_distribute_tensor_gives_each_rank(case, rank_seed):
    shape, mesh_shape, placements = case
    rank = rank_seed % math.prod(mesh_shape)
    with fake_rank(mesh_shape, rank) as mesh:
        coordinate = mesh.get_coordinate()
        local = distribute_tensor(torch.arange(math.prod(shape)).reshape(shape), mesh,
                                  [to_torch(p) for p in placements], src_data_rank=None).to_local()
    boxes = local_layout(shape, mesh_shape, placements, coordinate)
    assert sum(volume(g) for g, _ in boxes) == local.numel()
    for g, loc in boxes:
        assert g.sizes == loc.sizes and all(s >= 1 for s in g.sizes)
    np.testing.assert_array_equal(expected_local(shape, boxes, tuple(local.shape)), local.numpy())
    assert [loc.offsets for _, loc in boxes] == sorted(loc.offsets for _, loc in boxes)


@pytest.mark.parametrize("rank", [3, 5])
def test_fsdp2_over_tp_gives_strided_shard_and_layout_reads_it(rank):
    """What fully_shard over dp does to a model parallelize_module'd over tp, in torch itself: a
    colwise weight's dim 0 is split by tp first, so dp's placement is _StridedShard(0, tp)."""
    from torch.distributed.fsdp import fully_shard
    from torch.distributed.tensor.parallel import ColwiseParallel, RowwiseParallel, parallelize_module

    with fake_rank((2, 3), rank, names=("dp", "tp")) as mesh:
        model = torch.nn.Sequential(torch.nn.Linear(5, 7, bias=False), torch.nn.Linear(7, 5, bias=False))
        with torch.no_grad():
            model[0].weight.copy_(torch.arange(35.0).reshape(7, 5))
            model[1].weight.copy_(torch.arange(35.0).reshape(5, 7))
        parallelize_module(model, mesh["tp"], {"0": ColwiseParallel(), "1": RowwiseParallel()},
                           src_data_rank=None)
        fully_shard(model, mesh=mesh["dp"])
        got = {name: (layout(p), p.to_local().detach().numpy()) for name, p in model.named_parameters()}
        ranks = _ranks(model[0].weight.device_mesh)
        coordinate = mesh.get_coordinate()
    np.testing.assert_array_equal(ranks, np.arange(6).reshape(2, 3))
    assert got["0.weight"][0][:4] == ((7, 5), (2, 3), (("SS", 0, 3), ("S", 0)), coordinate)
    assert got["1.weight"][0][:4] == ((5, 7), (2, 3), (("S", 0), ("S", 1)), coordinate)
    for found, local in got.values():
        assert found.boxes == local_layout(*found[:4])
        assert found.holders == (int(ranks[coordinate]),) and found.me == 0   # no Replicate dim: held alone
        np.testing.assert_array_equal(expected_local(found.shape, found.boxes, local.shape), local)


def test_strided_shard_interleaves_like_torchs_docstring_example():
    # 9 elements, _StridedShard(0, split_factor=2) over 4: [0,1,5] [2,3,6] [4,7] [8] (placement_types.py)
    held = [[(b.offsets[0], b.sizes[0]) for b, _ in local_layout((9,), (4,), [("SS", 0, 2)], (c,))]
            for c in range(4)]
    assert held == [[(0, 2), (5, 1)], [(2, 2), (6, 1)], [(4, 1), (7, 1)], [(8, 1)]]


def test_layout_refuses_partial_and_bad_arguments():
    with pytest.raises(ValueError, match="Partial"):
        local_layout((4,), (2,), [("P",)], (0,))
    with pytest.raises(ValueError):
        local_layout((4,), (2,), [("S", 1)], (0,))
    with pytest.raises(ValueError):
        local_layout((4,), (2,), [("S", 0)], (2,))
    assert local_layout((4, 6), (2,), [("S", -1)], (1,)) == ((Box((0, 3), (4, 3)), Box((0, 0), (4, 3))),)


@pytest.mark.parametrize("grad", [True, False])
def test_local_tensor_is_the_storage_to_local_gives_without_a_new_view_or_a_graph(grad):
    with fake_rank((2,), 1) as mesh:
        full = torch.arange(10, dtype=torch.float32)
        plain = distribute_tensor(full, mesh, [Shard(0)])
        param = torch.nn.Parameter(distribute_tensor(full, mesh, [Shard(0)]))
        with torch.set_grad_enabled(grad):
            for dt in (plain, param):
                local = local_tensor(dt)
                with torch.no_grad():
                    expected = dt.to_local()
                assert local.data_ptr() == expected.data_ptr() and local.shape == expected.shape == (5,)
                assert not local.requires_grad and local.grad_fn is None
                assert local is local_tensor(dt)   # the same tensor every call: no new view made
                local[0] = -1.0                    # writes reach the DTensor (a restore reads in place)
                with torch.no_grad():
                    assert dt.to_local()[0].item() == -1.0

        class Older:   # a torch whose DTensor has no _local_tensor: to_local() outside autograd
            def to_local(self):
                assert not torch.is_grad_enabled()
                return full
        with torch.set_grad_enabled(grad):
            assert local_tensor(Older()) is full


def test_holders_are_the_coordinates_that_differ_only_on_replicate_dims():
    hsdp = [("R",), ("S", 0)]
    assert holders((2, 2), hsdp, (0, 1)) == [(0, 1), (1, 1)]
    assert holders((2, 2), hsdp, (1, 0)) == [(0, 0), (1, 0)]
    assert holders((2, 3), [("R",), ("R",)], (1, 2)) == list(itertools.product(range(2), range(3)))
    assert holders((2, 2), [("S", 0), ("SS", 0, 2)], (1, 0)) == [(1, 0)]


# -- tiling, read plans, byte spans ------------------------------------------------------------

def all_chunks(shape, mesh_shape, placements):
    """The saved chunks of a tensor: every coordinate's global boxes, replicas once."""
    seen = {}
    for coordinate in itertools.product(*map(range, mesh_shape)):
        for g, _ in local_layout(shape, mesh_shape, placements, coordinate):
            seen.setdefault(g, None)
    return list(seen)


def slices(box):
    return tuple(slice(o, o + s) for o, s in zip(box.offsets, box.sizes))


@st.composite
def boxes_in(draw, shape):
    offsets = [draw(st.integers(0, n - 1)) for n in shape]
    return Box(tuple(offsets), tuple(draw(st.integers(1, n - o)) for n, o in zip(shape, offsets)))


@settings(deadline=None, max_examples=100)
@given(st.data())
def test_read_plan_and_byte_spans_give_exactly_the_targets_elements(data):
    mesh_shape = data.draw(st.sampled_from(MESHES))
    shape = tuple(data.draw(st.lists(st.integers(1, 8), min_size=1, max_size=3)))
    placements = [data.draw(placements_for(len(shape))) for _ in mesh_shape]
    saved = all_chunks(shape, mesh_shape, placements)
    assert check_tiling(shape, saved) is None
    dtype = np.dtype(data.draw(st.sampled_from(["u1", "<i2", "<f4", "<i8"])))
    ids = np.arange(math.prod(shape)).reshape(shape)
    blobs = [ids[slices(c)].astype(dtype).tobytes() for c in saved]
    index = SavedIndex(saved)
    for target in data.draw(st.lists(boxes_in(shape), min_size=1, max_size=4)):
        plan = read_plan(index, target)
        assert plan == read_plan(saved, target)
        want = np.zeros(shape, bool)
        want[slices(target)] = True
        brute = [i for i, c in enumerate(saved) if want[slices(c)].any()]
        assert [i for i, _ in plan] == brute
        covered = np.zeros(shape, np.int64)
        for i, region in plan:
            mine = np.zeros(shape, bool)
            mine[slices(region)] = True
            inside_chunk = np.zeros(shape, bool)
            inside_chunk[slices(saved[i])] = True
            np.testing.assert_array_equal(mine, want & inside_chunk)
            covered += mine
            start, stop, exact = byte_span(saved[i], region, dtype.itemsize)
            span = np.frombuffer(blobs[i][start:stop], dtype)
            region_ids = ids[slices(region)].ravel().astype(dtype)
            assert span[0] == region_ids[0] and span[-1] == region_ids[-1]
            assert np.isin(region_ids, span).all()
            assert exact == (len(span) == len(region_ids))
            if exact:
                np.testing.assert_array_equal(span, region_ids)
        np.testing.assert_array_equal(covered, want.astype(np.int64))


@settings(deadline=None, max_examples=200)
@given(st.data())
def test_range_boxes_cover_exactly_the_range(data):
    shape = tuple(data.draw(st.lists(st.integers(1, 6), min_size=0, max_size=4)))
    count = math.prod(shape)
    first = data.draw(st.integers(0, count))
    stop = data.draw(st.integers(first, count))
    boxes = range_boxes(shape, first, stop)
    assert len(boxes) <= max(1, 2 * len(shape) - 1)
    covered = np.zeros(shape, np.int64)
    for box in boxes:
        covered[slices(box)] += 1
    want = np.zeros(count, np.int64)
    want[first:stop] = 1
    np.testing.assert_array_equal(covered.reshape(-1), want)


@settings(deadline=None, max_examples=100)
@given(st.data())
def test_planned_reads_fill_any_target_box_from_pieces_of_any_size(data):
    """plan_reads against brute force: one saved chunk of random shape and dtype cut into pieces of a
    random size; any box of it (row slabs, edges, column blocks) comes out bit-exact once every
    planned read is done (memoryviews filled, Edges and Strideds put from the piece's bytes)."""
    shape = tuple(data.draw(st.lists(st.integers(1, 7), min_size=1, max_size=3)))
    dtype = data.draw(st.sampled_from([torch.uint8, torch.bfloat16, torch.float32, torch.float64]))
    itemsize = dtype.itemsize
    saved = torch.arange(math.prod(shape), dtype=torch.float64).reshape(shape).to(dtype)
    blob = saved.view(torch.uint8).reshape(-1).numpy().tobytes() if saved.dim() else b""
    piece_elements = data.draw(st.integers(1, math.prod(shape)))
    pieces = [Piece(0, off, min(piece_elements * itemsize, len(blob) - off), "")
              for off in range(0, len(blob), piece_elements * itemsize)]
    box = data.draw(boxes_in(shape))
    local = torch.zeros(box.sizes, dtype=dtype)
    target = Target([(box, Box((0,) * len(shape), box.sizes))], box.sizes, None, lambda v: v)
    for piece, where in plan_reads([Chunk([0] * len(shape), list(shape), pieces)], target, local):
        data_bytes = blob[piece.offset: piece.offset + piece.length]
        if isinstance(where, memoryview):
            where[:] = data_bytes
        else:
            where.put(torch.frombuffer(bytearray(data_bytes), dtype=torch.uint8))
    assert torch.equal(local, saved[slices(box)])


def test_byte_span_contiguity():
    chunk = Box((4, 0, 0), (3, 5, 6))
    assert byte_span(chunk, Box((5, 0, 0), (2, 5, 6)), 4) == (120, 360, True)     # dim-0 slab
    assert byte_span(chunk, Box((5, 2, 1), (1, 1, 4)), 2) == (86, 94, True)       # one row run
    assert byte_span(chunk, Box((5, 1, 0), (1, 2, 6)), 1) == (36, 48, True)       # rows of one slab
    assert byte_span(chunk, Box((4, 0, 1), (1, 2, 2)), 1) == (1, 9, False)        # a column block
    assert byte_span(Box((), ()), Box((), ()), 8) == (0, 8, True)
    with pytest.raises(ValueError):
        byte_span(chunk, Box((3, 0, 0), (1, 5, 6)), 4)


def test_intersect_and_volume():
    assert intersect(Box((0, 2), (4, 4)), Box((3, 0), (5, 3))) == Box((3, 2), (1, 1))
    assert intersect(Box((0, 2), (4, 4)), Box((4, 0), (5, 3))) is None
    assert intersect(Box((), ()), Box((), ())) == Box((), ())
    assert volume(Box((1, 1), (3, 4))) == 12 and volume(Box((), ())) == 1


def test_read_plan_is_not_quadratic_on_dim0_chunks():
    saved = [Box((i * 3, 0), (3, 4)) for i in range(10_000)]       # 10k FSDP2 slabs...
    targets = [Box((i * 3 + 1, 0), (3, 4)) for i in range(10_000)]  # ... read by 10k shifted ones
    began = time.process_time()     # CPU time: other work on the machine does not count
    index = SavedIndex(saved)
    plans = [read_plan(index, t) for t in targets]
    assert time.process_time() - began < 2.0
    assert plans[5] == [(5, Box((16, 0), (2, 4))), (6, Box((18, 0), (1, 4)))]
    assert plans[-1] == [(9999, Box((29998, 0), (2, 4)))]


@pytest.mark.parametrize("case", [((7, 3), (4,), [("S", 0)]), ((5, 7), (2, 3), [("S", 0), ("S", 1)]),
                                  ((7, 4), (2, 3), [("SS", 0, 3), ("S", 0)]), ((6, 4, 5), (2, 2), [("S", 2), ("S", 1)]),
                                  ((), (2,), [("R",)]), ((3, 0), (2,), [("S", 0)])])
def test_check_tiling_accepts_every_layout(case):
    assert check_tiling(case[0], all_chunks(*case)) is None


@pytest.mark.parametrize("shape, boxes, problem", [
    ((8, 5), [Box((0, 0), (4, 5)), Box((3, 0), (5, 5))], "chunks 0 and 1 overlap"),
    ((8, 5), [Box((0, 0), (8, 3)), Box((2, 2), (2, 3)), Box((0, 3), (8, 2))], "chunks 0 and 1 overlap"),
    ((8, 5), [Box((0, 0), (4, 5)), Box((6, 0), (2, 5))], "hole: 10 of 40 elements not covered"),
    ((8, 5), [Box((0, 0), (8, 3)), Box((0, 3), (5, 2))], "hole: 6 of 40 elements not covered"),
    ((8, 5), [Box((0, 0), (4, 5)), Box((4, 0), (4, 6))], "chunk 1 out of bounds"),
    ((8, 5), [Box((0, 0), (8, 5)), Box((-1, 0), (1, 5))], "chunk 1 out of bounds"),
    ((8, 5), [Box((0, 0), (8, 5)), Box((2, 0), (0, 5))], "chunk 1 is empty"),
    ((8, 5), [Box((0,), (8,))], "chunk 0 does not have 2 dims"),
    ((8, 5), [], "hole: no chunks for 40 elements"),
    ((), [], "a 0-d tensor is one chunk"),
    ((), [Box((), ()), Box((), ())], "a 0-d tensor is one chunk"),
    ((8, 5), [Box((0, 0), (2**70, 5))], "not small integers"),
])
def test_check_tiling_names_the_problem(shape, boxes, problem):
    assert problem in (check_tiling(shape, boxes) or "tiles")


@pytest.mark.parametrize("hostile", ["edges", "same", "grid", "slabs"])
def test_check_tiling_is_bounded_on_100k_chunks(hostile):
    rng = np.random.default_rng(0)
    n = 100_000
    if hostile == "edges":     # every chunk has its own edges: a 200k x 200k compressed grid
        shape = (1 << 20, 1 << 20)
        boxes = [((a, b), (1, 1)) for a, b in rng.integers(0, 1 << 20, (n, 2)).tolist()]   # as a manifest gives them
    elif hostile == "same":    # one box 100k times: not the dim-0 fast path
        shape, boxes = (100, 100), [Box((0, 0), (100, 50))] * n
    elif hostile == "grid":    # a true tiling of 1x1 boxes that needs the full grid check
        shape = (250, 400)
        boxes = [((i, j), (1, 1)) for i in range(250) for j in range(400)]
    else:                      # 100k dim-0 slabs, one pair overlapping at the end
        shape = (n, 3)
        boxes = [((i, 0), (1, 3)) for i in range(n)] + [((n - 2, 0), (2, 3))]
    began = time.process_time()
    problem = check_tiling(shape, boxes)
    assert time.process_time() - began < 1.0
    expected = {"edges": "too many distinct chunk edges", "same": "chunks 0 and 1 overlap", "grid": None,
                "slabs": f"chunks {n - 2} and {n} overlap"}[hostile]
    assert problem == expected if expected is None else expected in problem
