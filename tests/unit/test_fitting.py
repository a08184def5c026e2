"""A restore checks everything before it changes anything (pyckpt/fitting.py), in a plain process.

A strict restore that does not fit (an extra registered object, other parameter groups, a changed
model, junk progress or RNG state in a correctly checksummed snapshot) raises StateMismatchError and
leaves the model, the optimizer and the global RNGs byte-identical; strict=False leaves out what does
not fit, never loads it wrong-shaped. Tied weights never make two saved tensors read into one memory.
Objects registered with per_rank=True are stored and restored per rank.
"""
from __future__ import annotations

import os
import random

import numpy as np
import pytest
import torch

import pyckpt
from pyckpt import DistributedCoordinator, StateMismatchError, TrainingRuntime, load_config
from pyckpt.fitting import _skeleton_except, check_fits, live_destinations
from tests.conftest import StateHolder


@pytest.fixture
def coordinator():
    with DistributedCoordinator(load_config(environ={})) as c:
        yield c


@pytest.fixture(autouse=True)
def global_rng_kept():
    """Junk RNG states are loaded by the code before this work: the next tests get the RNGs back."""
    states = random.getstate(), torch.get_rng_state(), np.random.get_state()
    yield
    random.setstate(states[0])
    torch.set_rng_state(states[1])
    np.random.set_state(states[2])


def mlp(hidden: int = 16, seed: int = 0) -> torch.nn.Sequential:
    torch.manual_seed(seed)
    return torch.nn.Sequential(torch.nn.Linear(8, hidden), torch.nn.ReLU(), torch.nn.Linear(hidden, 2))


def train(model: torch.nn.Module, optimizer: torch.optim.Optimizer, steps: int = 2) -> None:
    for _ in range(steps):
        optimizer.zero_grad()
        loss = model(torch.randn(4, 8)).square().sum()
        loss.backward()
        optimizer.step(lambda: loss) if isinstance(optimizer, torch.optim.LBFGS) else optimizer.step()


def trained(hidden: int = 16, seed: int = 0):
    model = mlp(hidden, seed)
    optimizer = torch.optim.Adam(model.parameters(), lr=0.01)
    train(model, optimizer)
    runtime = TrainingRuntime()
    runtime.register_model(model)
    runtime.register_optimizer(optimizer)
    return model, optimizer, runtime


def frozen(value):
    """Every tensor's bytes (with dtype and shape) and every plain value of a state dict."""
    if isinstance(value, torch.Tensor):
        t = value.detach().cpu().contiguous()
        return ("tensor", str(t.dtype), tuple(t.shape), t.view(-1).view(torch.uint8).numpy().tobytes())
    if isinstance(value, np.ndarray):
        return ("array", value.dtype.str, value.shape, value.tobytes())
    if isinstance(value, dict):
        return {k: frozen(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [frozen(v) for v in value]
    return value


def rngs():
    return random.getstate(), frozen(torch.get_rng_state()), frozen(list(np.random.get_state()))


def untouched(*objects):
    """A check that the objects' state and the global RNGs are what they are now."""
    before = [frozen(o.state_dict()) for o in objects], rngs()
    return lambda: ([frozen(o.state_dict()) for o in objects], rngs()) == before



def restore_by(path: str, coordinator, snap_path: str, runtime: TrainingRuntime) -> None:
    """Restore through the coordinator, or through pyckpt.load + load_state (what a plain process does)."""
    if path == "restore":
        coordinator.restore(snap_path, runtime)
    else:
        state = pyckpt.load(snap_path)
        runtime.load_state(state, state["per_rank"][0])


def test_extra_registered_object_fails_before_the_model_is_overwritten(coordinator, snap_path):
    _, _, runtime = trained()
    coordinator.snapshot(snap_path, runtime)
    model, optimizer, runtime = trained(seed=1)  # same architecture, other values
    runtime.register("ema", torch.optim.swa_utils.AveragedModel(model))
    same = untouched(model, optimizer)
    with pytest.raises(StateMismatchError, match="registered but not in the snapshot: ema") as err:
        coordinator.restore(snap_path, runtime)
    assert "nothing was changed" in str(err.value)
    assert same()


@pytest.mark.parametrize("path", ["restore", "load_state"])
def test_other_parameter_groups_fail_before_anything_is_changed(coordinator, snap_path, path):
    _, _, runtime = trained()
    coordinator.snapshot(snap_path, runtime)
    model = mlp(seed=1)
    optimizer = torch.optim.Adam([{"params": model[0].parameters()}, {"params": model[2].parameters()}])
    train(model, optimizer)
    runtime = TrainingRuntime()
    runtime.register_model(model)
    runtime.register_optimizer(optimizer)
    same = untouched(model, optimizer)
    with pytest.raises(StateMismatchError, match=r"optimizer 'optimizer': parameter groups of sizes \[4\] in the "
                                                 r"snapshot, \[2, 2\] in the optimizer"):
        restore_by(path, coordinator, snap_path, runtime)
    assert same()


def test_check_fits_decides_from_the_manifest_alone(coordinator, snap_path):
    _, _, runtime = trained()
    coordinator.snapshot(snap_path, runtime)
    snap = pyckpt.Snapshot.open(snap_path)
    for index in range(snap.manifest.world_size):
        os.remove(snap.file_path(index))  # no data to read: the check cannot have read any
    assert check_fits(snap.manifest, trained(seed=1)[2], 0, strict=True) == []
    bigger = TrainingRuntime()
    bigger.register_model(mlp(hidden=32))
    bigger.register("sampler", StateHolder({"epoch": 0}))
    with pytest.raises(StateMismatchError) as err:
        check_fits(snap.manifest, bigger, 0, strict=True)
    text = str(err.value)
    assert "model 'model' shape mismatches: 0.weight: snapshot (16, 8) vs model (32, 8)" in text
    assert "registered but not in the snapshot: sampler" in text
    assert "in the snapshot but not registered: optimizer" in text
    problems = check_fits(snap.manifest, bigger, 0, strict=False)
    assert len(problems) == 3


def test_check_fits_takes_the_objects_read_in_place_as_they_are(coordinator, snap_path):
    """A restore first finds the objects it reads in place (live_destinations: their saved state has
    the live state's form); its check then does not decode their saved state again, and reports the
    same problems as a full check for everything else."""
    _, _, runtime = trained()
    runtime.register("sampler", StateHolder({"epoch": 3}))
    coordinator.snapshot(snap_path, runtime)
    snap = pyckpt.Snapshot.open(snap_path)
    _, _, live = trained(seed=1)
    live.register("ema", StateHolder({"decay": 0.9}))
    matched = live_destinations(snap.manifest, live).objects
    assert matched == {"model", "optimizer"}
    assert _skeleton_except(snap.manifest, matched)["objects"] == {"model": None, "optimizer": None,
                                                                    "sampler": {"epoch": 3}}
    problems = check_fits(snap.manifest, live, 0, strict=False, matched=matched)
    assert problems == check_fits(snap.manifest, live, 0, strict=False) == [
        "registered but not in the snapshot: ema", "in the snapshot but not registered: sampler"]


def test_untied_snapshot_restores_into_a_tied_model(coordinator, snap_path):
    """Both saved weights used to be read into the tied memory at once: a false "checksum mismatch"."""
    class LM(torch.nn.Module):
        def __init__(self, tied: bool):
            super().__init__()
            self.embed = torch.nn.Embedding(10, 4)
            self.head = torch.nn.Linear(4, 10, bias=False)
            if tied:
                self.head.weight = self.embed.weight

    saved = TrainingRuntime()
    saved.register_model(LM(tied=False))
    coordinator.snapshot(snap_path, saved)
    model = LM(tied=True)
    runtime = TrainingRuntime()
    runtime.register_model(model)
    coordinator.restore(snap_path, runtime)
    expected = LM(tied=True)
    expected.load_state_dict(pyckpt.load(snap_path)["objects"]["model"])  # what torch makes of it
    assert model.head.weight is model.embed.weight
    assert torch.equal(model.embed.weight, expected.embed.weight)


def test_overlapping_views_are_never_both_read_in_place(coordinator, snap_path):
    """Two saved tensors restored into views that share half their memory: each gets its own bytes."""
    saved = TrainingRuntime(capture_rng=False)
    saved.register("holder", StateHolder({"a": torch.arange(4.0), "b": torch.arange(10.0, 14.0)}))
    coordinator.snapshot(snap_path, saved)
    base = torch.zeros(6)
    state = {"a": base[0:4], "b": base[2:6]}
    runtime = TrainingRuntime(capture_rng=False)
    runtime.register("holder", StateHolder(state))
    coordinator.restore(snap_path, runtime)
    assert torch.equal(state["a"], torch.arange(4.0)) and torch.equal(state["b"], torch.arange(10.0, 14.0))


def test_strict_false_leaves_out_optimizer_state_of_changed_parameters(coordinator, snap_path):
    model, optimizer, runtime = trained(hidden=16)
    coordinator.snapshot(snap_path, runtime)
    saved_last_bias = optimizer.state[model[2].bias]["exp_avg"].clone()
    bigger, bigger_optimizer, bigger_runtime = trained(hidden=32, seed=1)
    same = untouched(bigger, bigger_optimizer)
    with pytest.raises(StateMismatchError, match=r"optimizer 'optimizer': state of parameters that changed shape: "
                                                 r"model\.0\.weight: \(16, 8\) in the snapshot, now \(32, 8\)"):
        coordinator.restore(snap_path, bigger_runtime)
    assert same()
    with pytest.warns(UserWarning, match=r"state of parameters that changed shape: .*model\.2\.weight"):
        coordinator.restore(snap_path, bigger_runtime, strict=False)
    state = bigger_optimizer.state
    assert all(tuple(v.shape) == tuple(p.shape) for p in bigger.parameters() for v in state[p].values() if v.dim())
    assert torch.equal(state[bigger[2].bias]["exp_avg"], saved_last_bias)  # the unchanged parameter's state
    train(bigger, bigger_optimizer, steps=1)  # used to fail: wrong-shaped exp_avg


OPTIMIZERS = {
    "sgd": lambda params: torch.optim.SGD(params, lr=0.1, momentum=0.9),
    "adam": lambda params: torch.optim.Adam(params, lr=0.01),
    "adafactor": lambda params: torch.optim.Adafactor(params, lr=0.01),
    "lbfgs": lambda params: torch.optim.LBFGS(params, lr=0.1, max_iter=2),
}


@pytest.mark.parametrize("kind", sorted(OPTIMIZERS))
def test_optimizer_registered_without_its_model(coordinator, snap_path, kind):
    """Without the model in the snapshot the parameters' old shapes are unknown: each state tensor is
    checked against the forms torch's optimizers keep (the same shapes restore strictly)."""
    def runtime_of(hidden, seed):
        model = mlp(hidden, seed)
        optimizer = OPTIMIZERS[kind](model.parameters())
        train(model, optimizer)
        runtime = TrainingRuntime()
        runtime.register_optimizer(optimizer)
        return model, optimizer, runtime

    coordinator.snapshot(snap_path, runtime_of(16, 0)[2])
    _, optimizer, same_shapes = runtime_of(16, 1)
    coordinator.restore(snap_path, same_shapes)
    assert frozen(optimizer.state_dict()) == frozen(pyckpt.load(snap_path)["objects"]["optimizer"])
    model, optimizer, changed = runtime_of(32, 1)
    same = untouched(optimizer)
    with pytest.raises(StateMismatchError, match="state of parameters that changed shape"):
        coordinator.restore(snap_path, changed)
    assert same()
    with pytest.warns(UserWarning, match="state of parameters that changed shape"):
        coordinator.restore(snap_path, changed, strict=False)
    train(model, optimizer, steps=1)


def _junk_rng_snapshot(coordinator, snap_path, monkeypatch, part, junk):
    _, _, runtime = trained()
    real = pyckpt.runtime.rng_state
    monkeypatch.setattr(pyckpt.runtime, "rng_state", lambda: {**real(), part: junk})
    coordinator.snapshot(snap_path, runtime)
    monkeypatch.setattr(pyckpt.runtime, "rng_state", real)


JUNK_RNG = {
    "python-short": ("python", (3, (1, 2, 3), None), "RNG state 'python'"),
    "python-kind": ("python", "seed", "RNG state 'python'"),
    "torch-size": ("torch", torch.zeros(16, dtype=torch.uint8), r"RNG state 'torch' is uint8 \(16,\)"),
    "torch-dtype": ("torch", torch.zeros(5056, dtype=torch.float32), "RNG state 'torch' is float32"),
    "numpy-position": ("numpy", ("MT19937", np.zeros(624, np.uint32), 10**6, 0, 0.0),
                       r"position '1000000' is not an integer in \[0, 624\]"),
    "numpy-key": ("numpy", ("MT19937", np.zeros(5, np.uint32), 0, 0, 0.0), "key is numpy:uint32 \\(5,\\)"),
    "numpy-name": ("numpy", ("PCG64", np.zeros(624, np.uint32), 0, 0, 0.0), "refused by numpy"),
    "cuda-kind": ("cuda", "junk", "RNG state 'cuda' is not a list of tensors"),
}


@pytest.mark.parametrize("case", sorted(JUNK_RNG))
def test_junk_rng_state_is_refused_before_anything_is_changed(coordinator, snap_path, monkeypatch, case):
    part, junk, message = JUNK_RNG[case]
    _junk_rng_snapshot(coordinator, snap_path, monkeypatch, part, junk)
    model, optimizer, runtime = trained(seed=1)
    same = untouched(model, optimizer)
    with pytest.raises(StateMismatchError, match=message):
        coordinator.restore(snap_path, runtime)
    assert same()
    with pytest.warns(UserWarning, match=message):
        coordinator.restore(snap_path, runtime, strict=False)  # the rest, and the other RNG parts, load
    assert frozen(model.state_dict()) == frozen(pyckpt.load(snap_path)["objects"]["model"])
    if part != "torch":
        assert frozen(torch.get_rng_state()) == frozen(pyckpt.load(snap_path)["per_rank"][0]["rng"]["torch"])


@pytest.mark.parametrize("path", ["restore", "load_state"])
def test_torch_rng_bytes_torch_refuses_are_found_before_loading(coordinator, snap_path, monkeypatch, path):
    """The right size but not a valid Mersenne Twister state: only the bytes tell (restore reads this
    rank's private state before the check)."""
    junk = torch.full((5056,), 7, dtype=torch.uint8)
    _junk_rng_snapshot(coordinator, snap_path, monkeypatch, "torch", junk)
    model, optimizer, runtime = trained(seed=1)
    same = untouched(model, optimizer)
    with pytest.raises(StateMismatchError, match="RNG state 'torch' is refused by torch"):
        restore_by(path, coordinator, snap_path, runtime)
    assert same()


def test_junk_progress_is_refused_before_anything_is_changed(coordinator, snap_path, monkeypatch):
    _, _, runtime = trained()
    real = runtime.replicated_state  # what a hostile (correctly checksummed) snapshot may hold:
    monkeypatch.setattr(runtime, "replicated_state", lambda: {**real(), "progress": {"epoch": 1, "step": "12 steps"}})
    coordinator.snapshot(snap_path, runtime)
    model, optimizer, runtime = trained(seed=1)
    runtime.set_step(5)
    same = untouched(model, optimizer)
    with pytest.raises(StateMismatchError, match="progress step '12 steps' is not an integer"):
        coordinator.restore(snap_path, runtime)
    assert same() and runtime.step == 5


class Counter:
    """Per-rank state: a tensor holding this rank's number, a generator seeded by rank."""

    def __init__(self, rank: int):
        self.value = torch.full((3,), float(rank))
        self.generator = torch.Generator().manual_seed(rank)

    def state_dict(self) -> dict:
        return {"value": self.value, "generator": self.generator.get_state()}

    def load_state_dict(self, state: dict) -> None:
        self.value.copy_(state["value"])
        self.generator.set_state(state["generator"])


def test_per_rank_objects_are_stored_in_the_private_state(coordinator, snap_path):
    counter = Counter(rank=7)
    stage = mlp(seed=3)
    stage_optimizer = torch.optim.SGD(stage.parameters(), lr=0.1, momentum=0.9)
    train(stage, stage_optimizer)
    runtime = TrainingRuntime()
    runtime.register("counter", counter, per_rank=True)
    runtime.register_model(stage, "stage", per_rank=True)
    runtime.register_optimizer(stage_optimizer, "stage_optimizer", per_rank=True)
    runtime.register("shared", StateHolder({"x": torch.ones(2)}))
    coordinator.snapshot(snap_path, runtime)
    loaded = pyckpt.load(snap_path)
    assert sorted(loaded["objects"]) == ["shared"]
    assert sorted(loaded["per_rank"][0]["objects"]) == ["counter", "stage", "stage_optimizer"]

    fresh_counter, fresh_stage = Counter(rank=0), mlp(seed=4)
    fresh_optimizer = torch.optim.SGD(fresh_stage.parameters(), lr=0.1, momentum=0.9)
    fresh = TrainingRuntime()
    fresh.register("counter", fresh_counter, per_rank=True)
    fresh.register_model(fresh_stage, "stage", per_rank=True)
    fresh.register_optimizer(fresh_optimizer, "stage_optimizer", per_rank=True)
    fresh.register("shared", StateHolder({"x": torch.zeros(2)}))
    coordinator.restore(snap_path, fresh)
    assert torch.equal(fresh_counter.value, torch.full((3,), 7.0))
    assert torch.equal(fresh_counter.generator.get_state(), counter.generator.get_state())
    assert frozen(fresh_stage.state_dict()) == frozen(stage.state_dict())
    assert frozen(fresh_optimizer.state_dict()) == frozen(stage_optimizer.state_dict())


def test_per_rank_and_replicated_registrations_must_match_the_snapshot(coordinator, snap_path):
    saved = TrainingRuntime()
    saved.register("counter", Counter(rank=1), per_rank=True)
    coordinator.snapshot(snap_path, saved)
    replicated = TrainingRuntime()
    replicated.register("counter", Counter(rank=0))
    with pytest.raises(StateMismatchError, match="object 'counter' is saved per rank: register it with per_rank=True"):
        coordinator.restore(snap_path, replicated)

    coordinator.snapshot(snap_path, replicated)  # as an older pyckpt or a plain register() stored it
    assert "objects" not in pyckpt.load(snap_path)["per_rank"][0]  # the private tree keeps its earlier form
    counter = Counter(rank=2)
    per_rank = TrainingRuntime()
    per_rank.register("counter", counter, per_rank=True)
    with pytest.raises(StateMismatchError, match="registered with per_rank=True but the snapshot holds it as "
                                                 "replicated state"):
        coordinator.restore(snap_path, per_rank)
    with pytest.warns(UserWarning, match="replicated state"):
        coordinator.restore(snap_path, per_rank, strict=False)
    assert torch.equal(counter.value, torch.full((3,), 2.0))  # left out, not loaded from the replicated copy


def test_a_rank_without_saved_state_keeps_its_per_rank_objects(coordinator, snap_path):
    """A rank the snapshot has no private state for (it was taken on fewer ranks) is warned, by name."""
    saved = TrainingRuntime()
    saved.register("counter", Counter(rank=1), per_rank=True)
    saved.register("shared", StateHolder({"x": torch.ones(2)}))
    coordinator.snapshot(snap_path, saved)
    counter, shared = Counter(rank=3), StateHolder({"x": torch.zeros(2)})
    runtime = TrainingRuntime()
    runtime.register("counter", counter, per_rank=True)
    runtime.register("shared", shared)
    state = pyckpt.load(snap_path)
    with pytest.warns(UserWarning, match="no per-rank state for this rank .*: counter keep their current state"):
        runtime.load_state(state, None)
    assert torch.equal(counter.value, torch.full((3,), 3.0)) and torch.equal(shared.state["x"], torch.ones(2))
