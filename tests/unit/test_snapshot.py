"""Single-process snapshot/restore: round trip, retention, atomicity, integrity, mismatches, RNG."""
from __future__ import annotations

import os
import random
import threading

import numpy as np
import pytest
import torch

import pyckpt
from pyckpt import (
    DistributedCoordinator,
    IntegrityError,
    SnapshotNotFoundError,
    StateMismatchError,
    TrainingRuntime,
    load_config,
)
from pyckpt.planner import plan_replicated
from pyckpt.posix_store import PosixStore


def make(seed: int = 0, hidden: int = 16):
    torch.manual_seed(seed)
    model = torch.nn.Sequential(torch.nn.Linear(8, hidden), torch.nn.ReLU(), torch.nn.Linear(hidden, 2))
    optimizer = torch.optim.Adam(model.parameters(), lr=0.01)
    model(torch.randn(4, 8)).sum().backward()
    optimizer.step()
    scheduler = torch.optim.lr_scheduler.StepLR(optimizer, step_size=3)
    optimizer.step()
    scheduler.step()
    runtime = TrainingRuntime()
    runtime.register_model(model)
    runtime.register_optimizer(optimizer)
    runtime.register("lr_scheduler", scheduler)
    return model, optimizer, scheduler, runtime


@pytest.fixture
def coordinator():
    with DistributedCoordinator(load_config(environ={})) as c:
        yield c


def assert_same_state(a, b):
    if isinstance(a, torch.Tensor):
        assert isinstance(b, torch.Tensor) and a.dtype == b.dtype and torch.equal(a, b)
    elif isinstance(a, dict):
        assert a.keys() == b.keys()
        for key in a:
            assert_same_state(a[key], b[key])
    elif isinstance(a, (list, tuple)):
        assert type(a) is type(b) and len(a) == len(b)
        for x, y in zip(a, b):
            assert_same_state(x, y)
    else:
        assert a == b


def test_round_trip_restores_everything_exactly(coordinator, snap_path):
    model, optimizer, scheduler, runtime = make(0)
    runtime.set_epoch(3)
    runtime.set_step(42)
    runtime.set_loss(0.25)
    info = coordinator.snapshot(snap_path, runtime)
    assert info.version == "v00000001" and info.step == 42

    model2, optimizer2, scheduler2, runtime2 = make(1)
    assert coordinator.restore(snap_path, runtime2)
    assert (runtime2._epoch, runtime2._step, runtime2.loss) == (3, 42, 0.25)
    assert_same_state(model.state_dict(), model2.state_dict())
    assert_same_state(optimizer.state_dict(), optimizer2.state_dict())
    assert scheduler.state_dict() == scheduler2.state_dict()


def test_rng_state_is_restored(coordinator, snap_path):
    *_, runtime = make()
    random.seed(7)
    np.random.seed(7)
    torch.manual_seed(7)
    coordinator.snapshot(snap_path, runtime)
    expected = (random.random(), np.random.rand(), torch.rand(1).item())
    random.seed(99)
    np.random.seed(99)
    torch.manual_seed(99)
    coordinator.restore(snap_path, runtime)
    assert (random.random(), np.random.rand(), torch.rand(1).item()) == expected


def test_dropped_version_is_deleted_behind_the_returned_snapshot(snap_path, monkeypatch):
    """snapshot() returns once the new version is committed; deleting the version it dropped runs
    on a helper thread (held back here), and wait() / the next snapshot wait for it."""
    *_, runtime = make()
    release = threading.Event()
    gc = PosixStore.gc
    monkeypatch.setattr(PosixStore, "gc", lambda self, keep: release.wait(30) and gc(self, keep))
    dropped = os.path.join(snap_path + ".pyckpt", "v00000001")
    with DistributedCoordinator(load_config(environ={}), keep_last=1) as c:
        runtime.set_step(1)
        c.snapshot(snap_path, runtime)
        runtime.set_step(2)
        release.set()
        c.wait()
        release.clear()
        c.snapshot(snap_path, runtime)
        assert os.path.isdir(dropped)                          # the deletion is held back...
        assert pyckpt.load(snap_path)["progress"]["step"] == 2  # ...and the new version is committed
        release.set()
        c.wait()
        assert not os.path.exists(dropped)


def test_same_path_keeps_last_n_versions_and_always_one_complete(snap_path):
    *_, runtime = make()
    with DistributedCoordinator(load_config(environ={}), keep_last=3) as c:
        for step in range(1, 8):
            runtime.set_step(step)
            c.snapshot(snap_path, runtime)
            assert pyckpt.load(snap_path)["progress"]["step"] == step
    versions = sorted(e for e in os.listdir(snap_path + ".pyckpt") if e.startswith("v"))
    assert versions == ["v00000005", "v00000006", "v00000007"]
    assert pyckpt.Snapshot.open(snap_path, "v00000005").replicated()["progress"]["step"] == 5


def test_async_snapshot_captures_state_at_call_time(coordinator, snap_path):
    model, _, _, runtime = make()
    runtime.set_step(1)
    future = coordinator.snapshot(snap_path, runtime, blocking=False)
    expected = {k: v.clone() for k, v in model.state_dict().items()}
    with torch.no_grad():
        for p in model.parameters():
            p.add_(1.0)  # training goes on while the snapshot is written
    assert future.result().step == 1
    assert_same_state(pyckpt.load(snap_path)["objects"]["model"], expected)


def test_missing_snapshot(coordinator, tmp_path):
    *_, runtime = make()
    with pytest.raises(SnapshotNotFoundError, match="no snapshot at .*missing_ok"):
        coordinator.restore(tmp_path / "nothing.bin", runtime)
    assert coordinator.restore(tmp_path / "nothing.bin", runtime, missing_ok=True) is False


def test_stage_left_by_a_crash_is_ignored_and_cleaned(coordinator, snap_path):
    *_, runtime = make()
    runtime.set_step(1)
    coordinator.snapshot(snap_path, runtime)
    coordinator.wait()  # its background clean-up is over: the stage below is left for the next begin()
    stale = snap_path + ".pyckpt/v00000002.stage-deadbeef0000"
    os.makedirs(stale)
    with open(os.path.join(stale, "data-0.bin"), "wb") as f:
        f.write(b"half")
    assert pyckpt.load(snap_path)["progress"]["step"] == 1  # reader ignores the stage
    runtime.set_step(2)
    assert coordinator.snapshot(snap_path, runtime).version == "v00000003"
    assert not os.path.exists(stale)


def test_flipped_byte_raises_integrity_error_naming_file_and_tensor(coordinator, snap_path):
    *_, runtime = make()
    coordinator.snapshot(snap_path, runtime)
    snap = pyckpt.Snapshot.open(snap_path)
    record = snap.manifest.tensors[0]  # first tensor of the replicated tree: model weight
    data = snap.file_path(0)
    with open(data, "r+b") as f:
        f.seek(record.pieces[0].offset + 3)
        byte = f.read(1)
        f.seek(-1, os.SEEK_CUR)
        f.write(bytes([byte[0] ^ 0x40]))
    with pytest.raises(IntegrityError, match="checksum mismatch in tensor objects.model.0.weight") as err:
        coordinator.restore(snap_path, runtime)
    assert err.value.file == data and err.value.tensor == "objects.model.0.weight"


def test_truncated_file_raises_integrity_error(coordinator, snap_path):
    *_, runtime = make()
    coordinator.snapshot(snap_path, runtime)
    data = pyckpt.Snapshot.open(snap_path).file_path(0)
    os.truncate(data, os.path.getsize(data) - 10)
    with pytest.raises(IntegrityError, match="truncated"):
        coordinator.restore(snap_path, runtime)


def test_foreign_file_at_path_is_refused(coordinator, tmp_path):
    *_, runtime = make()
    path = tmp_path / "checkpoint.bin"
    torch.save({"x": 1}, path)
    with pytest.raises(IntegrityError, match="not a pyckpt snapshot"):
        coordinator.restore(path, runtime)


def test_model_mismatch_lists_keys_and_shapes(coordinator, snap_path):
    *_, runtime = make(hidden=16)
    coordinator.snapshot(snap_path, runtime)
    other = torch.nn.Sequential(torch.nn.Linear(8, 32), torch.nn.ReLU(), torch.nn.Linear(32, 2), torch.nn.Linear(2, 2))
    rt = TrainingRuntime()
    rt.register_model(other)
    with pytest.raises(StateMismatchError) as err:
        coordinator.restore(snap_path, rt)
    text = str(err.value)
    assert "missing keys: 3.weight, 3.bias" in text
    assert "0.weight: snapshot (16, 8) vs model (32, 8)" in text
    assert "in the snapshot but not registered: optimizer, lr_scheduler" in text


def test_non_strict_restore_loads_what_fits(coordinator, snap_path):
    model, *_ = make(hidden=16)
    runtime = TrainingRuntime()
    runtime.register_model(model)
    coordinator.snapshot(snap_path, runtime)
    bigger = torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.ReLU(), torch.nn.Linear(16, 2), torch.nn.Linear(2, 2))
    rt = TrainingRuntime()
    rt.register_model(bigger)
    with pytest.warns(UserWarning, match="missing keys"):
        coordinator.restore(snap_path, rt, strict=False)
    assert torch.equal(bigger[0].weight, model[0].weight)


def test_optimizer_mismatch_is_a_state_mismatch(coordinator, snap_path):
    *_, runtime = make()
    coordinator.snapshot(snap_path, runtime)
    model = torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.ReLU(), torch.nn.Linear(16, 2))
    opt = torch.optim.Adam([{"params": model[0].parameters()}, {"params": model[2].parameters()}])
    rt = TrainingRuntime()
    rt.register_model(model)
    rt.register_optimizer(opt)
    rt.register("lr_scheduler", torch.optim.lr_scheduler.StepLR(opt, 3))
    with pytest.raises(StateMismatchError, match="optimizer 'optimizer'"):
        coordinator.restore(snap_path, rt)


def test_plain_process_load_without_coordinator(snap_path):
    model, *_, runtime = make()
    with DistributedCoordinator(load_config(environ={})) as c:
        c.snapshot(snap_path, runtime)
    state = pyckpt.load(snap_path)
    assert_same_state(state["objects"]["model"], model.state_dict())
    assert len(state["per_rank"]) == 1 and "rng" in state["per_rank"][0]


def test_many_dtypes_and_plain_values_survive(coordinator, snap_path):
    class Holder:
        def __init__(self, state):
            self.state = state

        def state_dict(self):
            return self.state

        def load_state_dict(self, state):
            self.state = state

    tensors = {name: (torch.arange(6) % 2).to(dtype).reshape(2, 3)
               for name, dtype in [("f16", torch.float16), ("bf16", torch.bfloat16), ("i8", torch.int8),
                                   ("bool", torch.bool), ("c64", torch.complex64), ("f64", torch.float64)]}
    state = {"t": tensors, "empty": torch.empty(0, 5), "scalar": torch.tensor(3.5), "nested": [1, (2.5, "x"), None],
             "np": np.arange(5, dtype=np.uint32), 7: "int key", "dtype": torch.float16,
             "strided": torch.arange(12.0).reshape(3, 4).t()}
    runtime = TrainingRuntime()
    runtime.register("holder", Holder(state))
    coordinator.snapshot(snap_path, runtime)
    loaded = pyckpt.load(snap_path)["objects"]["holder"]
    assert_same_state({k: v for k, v in state.items() if k != "np"}, {k: v for k, v in loaded.items() if k != "np"})
    assert np.array_equal(loaded["np"], state["np"]) and loaded["np"].dtype == np.uint32


def test_unsupported_value_is_named(coordinator, snap_path):
    class Holder:
        def state_dict(self):
            return {"fine": 1, "bad": object()}

        def load_state_dict(self, state):
            pass

    runtime = TrainingRuntime()
    runtime.register("holder", Holder())
    with pytest.raises(TypeError, match=r"replicated\['objects'\]\['holder'\]\['bad'\]: a object is not supported"):
        coordinator.snapshot(snap_path, runtime)
    assert not os.path.exists(snap_path)


def test_register_rejects_objects_without_state_dict():
    with pytest.raises(TypeError, match="no state_dict"):
        TrainingRuntime().register("x", object())


@pytest.mark.parametrize("world", [1, 2, 3, 4, 7])
def test_plan_covers_every_byte_once_and_balances(world):
    rng = random.Random(world)
    sizes = [rng.choice([0, 1, 7, 64, 1000, 70 << 20]) for _ in range(40)]
    plans = plan_replicated(sizes, world)
    covered = [0] * len(sizes)
    for plan in plans:
        offsets = [s.file_offset for s in plan.slices]
        assert offsets == sorted(offsets)
        for s in plan.slices:
            assert s.file_offset + s.length <= plan.size
            covered[s.tensor] += s.length
    assert covered == sizes
    share = [p.size for p in plans]
    assert max(share) - min(share) <= 2 * 64 + 64 * world


def test_corruption_during_in_place_restore_says_the_objects_are_unusable(coordinator, snap_path):
    *_, runtime = make()
    coordinator.snapshot(snap_path, runtime)
    snap = pyckpt.Snapshot.open(snap_path)
    with open(snap.file_path(0), "r+b") as f:
        f.seek(snap.manifest.tensors[0].pieces[0].offset)
        f.write(b"\xff\xff\xff\xff")
    with pytest.raises(IntegrityError, match="partly overwritten: restore another version"):
        coordinator.restore(snap_path, runtime)


def _fail(monkeypatch, where: str) -> None:
    """An I/O error in the restore's step `where`: "fitting" (live_destinations), "plan" (planning the
    read) or "read" (reading the bytes); the plan and read fail only after the rank's private state
    (read before fitting) is in."""
    def failing(*args):
        raise OSError(5, "Input/output error")
    if where == "fitting":
        monkeypatch.setattr(pyckpt.fitting, "live_destinations", failing)
        return
    found = pyckpt.fitting.live_destinations

    def destinations(*args):
        monkeypatch.setattr(pyckpt.reader.TensorRead, "_read_batch" if where == "read" else "_pieces", failing)
        return found(*args)
    monkeypatch.setattr(pyckpt.fitting, "live_destinations", destinations)


def test_an_io_error_during_in_place_restore_says_the_objects_are_unusable(coordinator, snap_path, monkeypatch):
    """Not only a checksum: an I/O error in the middle of reading in place leaves them partly overwritten too."""
    *_, runtime = make()
    coordinator.snapshot(snap_path, runtime)
    _fail(monkeypatch, "read")
    with pytest.raises(pyckpt.SnapshotReadError, match="(?s)Input/output error.*partly overwritten: restore another"):
        coordinator.restore(snap_path, runtime)


@pytest.mark.parametrize("where", ["fitting", "plan"])
def test_a_failure_before_reading_leaves_the_objects_untouched(coordinator, snap_path, monkeypatch, where):
    model, *_, runtime = make()
    coordinator.snapshot(snap_path, runtime)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(1.0)
    trained = {k: v.clone() for k, v in model.state_dict().items()}
    _fail(monkeypatch, where)
    with pytest.raises(pyckpt.SnapshotReadError, match="Input/output error") as caught:
        coordinator.restore(snap_path, runtime)
    assert "overwritten" not in str(caught.value)
    assert_same_state(model.state_dict(), trained)
