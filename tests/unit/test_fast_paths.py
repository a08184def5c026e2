"""The fast paths of pyckpt's save and restore (docs/PERFORMANCE.md) give the same results as the plain ones.

Spare data files (DistributedCoordinator(reuse_files=True)): the data file of a version that falls
out of keep_last is overwritten by the next snapshot instead of being deleted; a file still linked
from a committed version never is.
"""
from __future__ import annotations

import os

import pytest
import torch

import pyckpt
from pyckpt import DistributedCoordinator, IntegrityError, SnapshotError, TrainingRuntime, load_config
from pyckpt.runtime import _fast_membership, _IdList


def _runtime(numel: int, value: float, tensors: int = 3):
    state = {f"t{i}": torch.full((numel,), value + i) for i in range(tensors)}

    class Holder:
        def state_dict(self):
            return state

        def load_state_dict(self, loaded):
            state.update(loaded)

    runtime = TrainingRuntime(capture_rng=False)
    runtime.register("holder", Holder())
    return runtime, state


def _data_file(path: str, version: str) -> str:
    return os.path.join(path + ".pyckpt", version, "data-0.bin")


def _spare(path: str) -> str:
    return os.path.join(path + ".pyckpt", ".spare", "data-0.bin")


def test_data_file_of_a_dropped_version_is_overwritten_by_the_next_snapshot(snap_path):
    runtime, state = _runtime(10_000, 0.0)
    with DistributedCoordinator(load_config(environ={}), keep_last=1, reuse_files=True) as c:
        runtime.set_step(1)
        c.snapshot(snap_path, runtime)
        first = os.stat(_data_file(snap_path, "v00000001")).st_ino
        assert not os.path.exists(_spare(snap_path))
        state["t0"].fill_(2.0)
        runtime.set_step(2)
        c.snapshot(snap_path, runtime)
        c.wait()  # the dropped version is deleted on a helper thread
        # v1 left the record: its file lives on only as the spare (one link), never in a version dir
        assert not os.path.exists(os.path.join(snap_path + ".pyckpt", "v00000001"))
        spare = os.stat(_spare(snap_path))
        assert (spare.st_ino, spare.st_nlink) == (first, 1)
        state["t0"].fill_(3.0)
        runtime.set_step(3)
        c.snapshot(snap_path, runtime)
        assert os.stat(_data_file(snap_path, "v00000003")).st_ino == first
        loaded = pyckpt.load(snap_path)
    assert loaded["progress"]["step"] == 3
    assert torch.equal(loaded["objects"]["holder"]["t0"], torch.full((10_000,), 3.0))
    assert torch.equal(loaded["objects"]["holder"]["t2"], torch.full((10_000,), 2.0))


def test_a_larger_spare_is_cut_to_the_new_size(snap_path):
    big, _ = _runtime(100_000, 1.0)
    small, _ = _runtime(1_000, 5.0, tensors=2)
    with DistributedCoordinator(load_config(environ={}), keep_last=1, reuse_files=True) as c:
        c.snapshot(snap_path, big)
        c.snapshot(snap_path, big)
        assert os.path.getsize(_spare(snap_path)) > 400_000
        info = c.snapshot(snap_path, small)  # takes the spare of the big state
        assert os.path.getsize(_data_file(snap_path, info.version)) == info.bytes_written
    loaded = pyckpt.load(snap_path)["objects"]["holder"]
    assert sorted(loaded) == ["t0", "t1"] and torch.equal(loaded["t1"], torch.full((1_000,), 6.0))


def test_a_spare_still_linked_from_a_committed_version_is_never_written(snap_path):
    """A leader that crashed after linking the spares but before replacing the record leaves spares
    that are still the committed version's data files: the next writer must create a new file."""
    runtime, state = _runtime(10_000, 1.0)
    with DistributedCoordinator(load_config(environ={}), keep_last=2, reuse_files=True) as c:
        c.snapshot(snap_path, runtime)
        committed = _data_file(snap_path, "v00000001")
        os.makedirs(os.path.dirname(_spare(snap_path)), exist_ok=True)
        os.link(committed, _spare(snap_path))
        state["t0"].fill_(9.0)
        info = c.snapshot(snap_path, runtime)
    assert os.stat(_data_file(snap_path, info.version)).st_ino != os.stat(committed).st_ino
    old = pyckpt.Snapshot.open(snap_path, "v00000001").replicated()  # every checksum still holds
    assert torch.equal(old["objects"]["holder"]["t0"], torch.full((10_000,), 1.0))
    assert torch.equal(pyckpt.load(snap_path)["objects"]["holder"]["t0"], torch.full((10_000,), 9.0))


def test_a_spare_that_is_not_a_regular_file_is_refused_and_left_alone(snap_path, tmp_path):
    runtime, _ = _runtime(1_000, 1.0)
    victim = tmp_path / "victim"
    victim.write_bytes(b"keep me")
    with DistributedCoordinator(load_config(environ={}), keep_last=1, reuse_files=True) as c:
        c.snapshot(snap_path, runtime)
        os.makedirs(os.path.dirname(_spare(snap_path)), exist_ok=True)
        os.symlink(victim, _spare(snap_path))
        with pytest.raises(SnapshotError, match="data-0.bin: is a symlink"):
            c.snapshot(snap_path, runtime)
    assert os.path.islink(_spare(snap_path))
    assert victim.read_bytes() == b"keep me"
    assert pyckpt.load(snap_path)["progress"]["step"] == 0


def test_reuse_files_off_keeps_no_spare(snap_path):
    runtime, _ = _runtime(1_000, 1.0)
    with DistributedCoordinator(load_config(environ={}), keep_last=1) as c:  # the default: no spares
        c.snapshot(snap_path, runtime)
        c.snapshot(snap_path, runtime)
    assert not os.path.exists(os.path.dirname(_spare(snap_path)))
    with DistributedCoordinator(load_config(environ={}), keep_last=1, reuse_files=True) as c:
        c.snapshot(snap_path, runtime)
        c.snapshot(snap_path, runtime)
        assert os.path.exists(_spare(snap_path))
    with DistributedCoordinator(load_config(environ={}), keep_last=1, reuse_files=False) as c:
        c.snapshot(snap_path, runtime)  # turned off again: the spare is removed, none is made
        c.snapshot(snap_path, runtime)
    assert os.listdir(os.path.dirname(_spare(snap_path))) == []


def test_corrupted_reused_file_is_still_detected(snap_path):
    runtime, _ = _runtime(10_000, 1.0)
    with DistributedCoordinator(load_config(environ={}), keep_last=1, reuse_files=True) as c:
        for _ in range(3):
            info = c.snapshot(snap_path, runtime)
    with open(_data_file(snap_path, info.version), "r+b") as f:
        f.seek(100)
        f.write(b"\xff")
    with pytest.raises(IntegrityError, match="checksum"):
        pyckpt.load(snap_path)


def test_id_list_membership_is_list_membership():
    ids = _IdList([3, 1, 4, 1, 5])
    assert [i in ids for i in range(7)] == [i in [3, 1, 4, 1, 5] for i in range(7)]
    assert "x" not in ids and [1] not in ids  # other and unhashable types: plain answers
    ids.append(6)
    assert 6 in ids
    state = {"state": {}, "param_groups": [{"params": [0, 1], "lr": 0.1}]}
    fast = _fast_membership(state)
    assert fast == state and type(fast["param_groups"][0]["params"]) is _IdList
    assert type(state["param_groups"][0]["params"]) is list  # the caller's dict is not changed


def test_optimizer_restore_with_many_params_matches_torch(snap_path):
    params = [torch.nn.Parameter(torch.randn(5)) for _ in range(300)]
    opt = torch.optim.Adam(params, lr=0.01)
    for p in params:
        p.grad = torch.randn(5)
    opt.step()
    runtime = TrainingRuntime(capture_rng=False)
    runtime.register_optimizer(opt)
    with DistributedCoordinator(load_config(environ={})) as c:
        c.snapshot(snap_path, runtime)
        expected = {k: v.clone() for k, v in opt.state_dict()["state"][7].items()}
        for p in params:
            p.grad = torch.randn(5)
        opt.step()
        opt.param_groups[0]["lr"] = 0.5
        c.restore(snap_path, runtime)
    assert opt.param_groups[0]["lr"] == 0.01
    got = opt.state_dict()["state"][7]
    assert all(torch.equal(got[k], v) for k, v in expected.items())


@pytest.mark.parametrize("make", [
    lambda: torch.arange(12, dtype=torch.float32).reshape(3, 4),
    lambda: torch.tensor(2.5),                                       # 0-d
    lambda: torch.empty(0, 3), lambda: torch.empty(0),               # empty
    lambda: torch.tensor([True, False, True]),
    lambda: torch.arange(6, dtype=torch.float16), lambda: torch.arange(6, dtype=torch.int16),
    lambda: torch.arange(6).to(torch.bfloat16),                      # not numpy's
    lambda: torch.tensor([1 + 2j, 3 - 4j], dtype=torch.complex64),
    lambda: torch.tensor([1 + 2j, 3 - 4j]).conj(),                   # a lazy conjugate view
    lambda: torch.arange(3.0)._neg_view(),                           # a lazy negative view
    lambda: torch.arange(12.0).reshape(3, 4).t(),                    # not contiguous
    lambda: torch.nn.Parameter(torch.arange(4.0)),                   # requires grad
], ids=["2d", "0d", "empty2d", "empty", "bool", "f16", "i16", "bf16", "c64", "conj", "neg", "strided", "param"])
def test_byte_view_is_the_tensors_row_major_bytes(make):
    from pyckpt.sysio import byte_view

    tensor = make()
    plain = tensor.detach().resolve_conj().resolve_neg().contiguous()
    expected = plain.reshape(-1).view(torch.uint8).numpy().tobytes() if plain.numel() else b""
    view = byte_view(tensor)
    assert (view.format, view.ndim, bytes(view)) == ("B", 1, expected)
