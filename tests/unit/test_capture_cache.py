"""capture.CaptureCache: a runtime's next snapshot reuses what the last one derived from its tensors
(byte views, records, a DTensor's parts) only while every tensor is the same object over the same
memory; whatever changed is saved as it is now, never the bytes the kept views saw."""
from __future__ import annotations

import gc
import weakref

import pytest
import torch
import torch.distributed as dist

import pyckpt
import pyckpt.capture as capture
import pyckpt.commit as commit
from pyckpt import DistributedCoordinator, TrainingRuntime, load_config
from pyckpt.manifest import Manifest
from tests.conftest import StateHolder, free_port
from tests.reliability.helpers import current_dir


@pytest.fixture
def derives(monkeypatch):
    """How many captures derived their work afresh."""
    calls = []
    real = capture._derive
    monkeypatch.setattr(capture, "_derive", lambda *a: calls.append(1) or real(*a))
    return calls


def snapshot_and_load(coordinator, runtime, path) -> dict:
    coordinator.snapshot(path, runtime)
    return pyckpt.load(path)["objects"]["held"]


def test_kept_while_the_same_tensors_and_the_new_bytes_saved(snap_path, derives):
    model = torch.nn.Linear(64, 32)
    runtime = TrainingRuntime()
    runtime.register_model(model)
    with DistributedCoordinator(load_config(environ={})) as coordinator:
        coordinator.snapshot(snap_path, runtime)
        with torch.no_grad():
            model.weight.add_(1.0)          # in place: the kept views see it
        expected = model.weight.clone()
        coordinator.snapshot(snap_path, runtime)
        assert len(derives) == 1
        assert torch.equal(pyckpt.load(snap_path)["objects"]["model"]["weight"], expected)


def test_a_swapped_storage_is_derived_again(snap_path, derives):
    weight = torch.arange(96, dtype=torch.float32)
    runtime = TrainingRuntime()
    runtime.register("held", StateHolder({"w": weight}))
    with DistributedCoordinator(load_config(environ={})) as coordinator:
        snapshot_and_load(coordinator, runtime, snap_path)
        weight.data = torch.full((96,), 7.0)             # same object, new memory
        assert torch.equal(snapshot_and_load(coordinator, runtime, snap_path)["w"], torch.full((96,), 7.0))
        weight.set_(torch.zeros(2, 3))                   # same object, resized
        assert torch.equal(snapshot_and_load(coordinator, runtime, snap_path)["w"], torch.zeros(2, 3))
        assert len(derives) == 3


def test_a_view_that_was_a_copy_is_not_kept(snap_path, derives):
    base = torch.arange(12, dtype=torch.float32).reshape(3, 4)
    runtime = TrainingRuntime()
    runtime.register("held", StateHolder({"t": base.t()}))         # not contiguous: byte_view copies it
    with DistributedCoordinator(load_config(environ={})) as coordinator:
        snapshot_and_load(coordinator, runtime, snap_path)
        base.add_(100.0)
        assert torch.equal(snapshot_and_load(coordinator, runtime, snap_path)["t"], base.t())
        assert len(derives) == 2


def test_a_new_tensor_object_is_derived_again(snap_path, derives):
    holder = StateHolder({"w": torch.ones(8)})
    runtime = TrainingRuntime()
    runtime.register("held", holder)
    with DistributedCoordinator(load_config(environ={})) as coordinator:
        snapshot_and_load(coordinator, runtime, snap_path)
        holder.state["w"] = torch.full((8,), 3.0)
        assert torch.equal(snapshot_and_load(coordinator, runtime, snap_path)["w"], torch.full((8,), 3.0))
        assert len(derives) == 2


def test_the_leaders_kept_records_text_gets_each_snapshots_checksums(snap_path, monkeypatch):
    """commit.KeptTable keeps the JSON of the replicated records from the first snapshot that reuses
    the derivation; each later manifest gets its own checksums written into it: byte for byte what
    encoding the whole manifest gives, and it loads with every piece checked."""
    made = []
    real = commit.RecordsText
    monkeypatch.setattr(commit, "RecordsText", lambda records: made.append(len(records)) or real(records))
    tensors = {f"t{i}": torch.full((i + 1,), float(i)) for i in range(40)}
    runtime = TrainingRuntime()          # with its RNG state: per-rank records after the replicated ones
    runtime.register("held", StateHolder(tensors))
    with DistributedCoordinator(load_config(environ={})) as coordinator:
        for _ in range(4):
            for tensor in tensors.values():
                tensor.add_(1.0)         # new bytes, new checksums
            loaded = snapshot_and_load(coordinator, runtime, snap_path)
            assert all(torch.equal(loaded[k], v) for k, v in tensors.items())
            with open(f"{current_dir(snap_path)}/manifest.json", "rb") as f:
                data = f.read()
            assert data == Manifest.from_json(data, "manifest.json").to_json()
    assert made == [40]
    manifest = Manifest.from_json(data, "manifest.json")
    assert manifest.to_json(real(manifest.tensors[:39])) == data      # a shorter run: the rest encoded
    assert manifest.to_json(real(manifest.tensors + manifest.tensors[:1])) == data   # more records: all encoded


def test_a_dropped_runtime_frees_its_tensors(snap_path):
    runtime = TrainingRuntime()
    tensor = torch.ones(1 << 16)
    runtime.register("held", StateHolder({"w": tensor}))
    alive = weakref.ref(tensor)
    with DistributedCoordinator(load_config(environ={})) as coordinator:
        coordinator.snapshot(snap_path, runtime)
        del runtime, tensor
        gc.collect()
        assert alive() is None     # the coordinator's kept views do not hold it


@pytest.fixture
def one_rank_group():
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{free_port()}", rank=0, world_size=1)
    try:
        yield
    finally:
        dist.destroy_process_group()


def test_a_dtensor_whose_local_storage_is_swapped_is_derived_again(snap_path, derives, one_rank_group):
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor import Shard, distribute_tensor

    mesh = init_device_mesh("cpu", (1,))
    dt = distribute_tensor(torch.arange(40, dtype=torch.float32).reshape(10, 4), mesh, [Shard(0)])
    runtime = TrainingRuntime(capture_rng=False)
    runtime.register("held", StateHolder({"d": dt}))
    with DistributedCoordinator(load_config(environ={})) as coordinator:
        snapshot_and_load(coordinator, runtime, snap_path)
        with torch.no_grad():
            dt.to_local().mul_(2.0)                            # in place: kept
            assert torch.equal(snapshot_and_load(coordinator, runtime, snap_path)["d"], dt.full_tensor())
            assert len(derives) == 1
            dt.to_local().set_(torch.full((10, 4), -1.0))      # the local tensor's storage swapped
        assert torch.equal(snapshot_and_load(coordinator, runtime, snap_path)["d"], torch.full((10, 4), -1.0))
        assert len(derives) == 2
