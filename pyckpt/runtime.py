"""TrainingRuntime: what a training script registers to be snapshotted, and how it is put back."""
from __future__ import annotations

import random
import sys
import warnings
from typing import Any, Protocol

import torch

from .errors import StateMismatchError
from .fitting import fit_state, live_state, mismatch_error

try:  # numpy's global RNG is captured when numpy is installed
    import numpy as np
except ImportError:  # pragma: no cover - numpy is a dependency, but stay usable without it
    np = None


class Stateful(Protocol):
    def state_dict(self) -> dict: ...
    def load_state_dict(self, state: dict) -> Any: ...


class TrainingRuntime:
    """Holds the objects of a training job and its progress (epoch, step, loss).

    Replicated state (models, optimizers, schedulers, anything registered) is the same on every
    rank of a DDP job and is stored once. The RNG states are per rank and stored per rank, and so is
    every object registered with per_rank=True (a per-rank generator, a pipeline stage's model).
    """

    def __init__(self, *, capture_rng: bool = True):
        self._objects: dict[str, Stateful] = {}
        self._kinds: dict[str, str] = {}
        self._per_rank: set[str] = set()
        self._epoch = 0
        self._step = 0
        self._loss: float | None = None
        self.capture_rng = capture_rng
        self.restored_version: str | None = None   # the version the last restore loaded (`pyckpt ls` names it)

    # -- registration ----------------------------------------------------------------------
    # per_rank=True: the object differs between ranks (a generator seeded by rank, a pipeline stage's
    # model): each rank stores and restores its own copy. Otherwise it is replicated (the same on every
    # rank, stored once).
    def register_model(self, model: torch.nn.Module, name: str = "model", *, per_rank: bool = False) -> None:
        """Register a model (pass a DDP model's `.module`)."""
        if isinstance(model, torch.nn.parallel.DistributedDataParallel):
            model = model.module  # its state_dict keys would carry a "module." prefix otherwise
        if _uses_fsdp1(model):
            raise TypeError(f"cannot register model {name!r}: it is wrapped in FSDP1 (FullyShardedDataParallel). "
                            f"{_FSDP1_ADVICE}")
        self._add(name, model, "model", per_rank)

    def register_optimizer(self, optimizer: torch.optim.Optimizer, name: str | None = None, *,
                           per_rank: bool = False) -> None:
        """Register an optimizer; several are allowed (named optimizer, optimizer_1, ... by default)."""
        if name is None:
            count = sum(1 for kind in self._kinds.values() if kind == "optimizer")
            name = "optimizer" if count == 0 else f"optimizer_{count}"
        if any(getattr(p, "_is_flat_param", False) for group in optimizer.param_groups for p in group["params"]):
            raise TypeError(f"cannot register optimizer {name!r}: it updates the flat parameters of an FSDP1 "
                            f"(FullyShardedDataParallel) model. {_FSDP1_ADVICE}")
        self._add(name, optimizer, "optimizer", per_rank)

    def register(self, name: str, obj: Stateful, *, per_rank: bool = False) -> None:
        """Register anything with state_dict()/load_state_dict(): LR schedulers, grad scalers, samplers..."""
        if not (callable(getattr(obj, "state_dict", None)) and callable(getattr(obj, "load_state_dict", None))):
            raise TypeError(f"cannot register {name!r}: a {type(obj).__name__} has no state_dict/load_state_dict")
        self._add(name, obj, "object", per_rank)

    def _add(self, name: str, obj: Stateful, kind: str, per_rank: bool) -> None:
        if not isinstance(name, str) or not name:
            raise ValueError(f"register: name must be a non-empty string, got {name!r}")
        if name in self._objects and self._objects[name] is not obj:
            raise ValueError(f"register: name {name!r} is already taken by a {self._kinds[name]}; pick another")
        self._objects[name] = obj
        self._kinds[name] = kind
        if per_rank:
            self._per_rank.add(name)
        else:
            self._per_rank.discard(name)

    @property
    def objects(self) -> dict[str, Stateful]:
        return dict(self._objects)

    @property
    def per_rank_names(self) -> frozenset[str]:
        """Names of the objects registered with per_rank=True."""
        return frozenset(self._per_rank)

    def kind(self, name: str) -> str:
        """How `name` was registered: "model", "optimizer" or "object"."""
        return self._kinds[name]

    # -- progress --------------------------------------------------------------------------
    def set_epoch(self, epoch: int) -> None:
        self._epoch = int(epoch)

    def set_step(self, step: int) -> None:
        self._step = int(step)

    def set_loss(self, loss: float | None) -> None:
        self._loss = None if loss is None else float(loss)

    @property
    def epoch(self) -> int:
        return self._epoch

    @property
    def step(self) -> int:
        return self._step

    @property
    def loss(self) -> float | None:
        return self._loss

    # -- state -----------------------------------------------------------------------------
    def replicated_state(self) -> dict:
        return {
            "progress": {"epoch": self._epoch, "step": self._step},
            "kinds": {name: kind for name, kind in self._kinds.items() if name not in self._per_rank},
            "objects": {name: live_state(obj) for name, obj in self._objects.items() if name not in self._per_rank},
        }

    def private_state(self) -> dict:
        # The loss differs per rank (each sees its own batch), so it is private state.
        state: dict[str, Any] = {"loss": self._loss}
        if self.capture_rng:
            state["rng"] = rng_state()
        if self._per_rank:  # only then: snapshots without per-rank objects keep their earlier form
            state["objects"] = {name: live_state(obj) for name, obj in self._objects.items()
                                if name in self._per_rank}
        return state

    def load_state(self, replicated: dict, private: dict | None, *, strict: bool = True,
                   matched: frozenset[str] = frozenset()) -> None:
        """Put a snapshot's state back into the registered objects (`private`: this rank's per-rank
        state, None when the snapshot has none for it; `matched`: objects a restore read in place, whose
        saved state it found to have their live state's form: they are loaded without a second check).

        Everything is checked first (fitting.fit_state): with strict=True any mismatch raises
        StateMismatchError before anything is changed; with strict=False what does not fit is left
        out, with a warning naming it, and the rest is loaded."""
        fit = fit_state(self, replicated, private, matched)
        if fit.problems and strict:
            raise mismatch_error(fit.problems)
        for problem in fit.problems:
            warnings.warn(f"restore (strict=False): {problem} (left out)", stacklevel=3)
        if fit.absent:
            warnings.warn(f"the snapshot has no per-rank state for this rank (taken on fewer ranks): "
                          f"{', '.join(fit.absent)} keep their current state", stacklevel=3)
        restored: list[str] = []
        for name, state in fit.objects.items():
            obj = self._objects[name]
            try:
                if isinstance(obj, torch.nn.Module):
                    obj.load_state_dict(state, strict=strict)
                elif isinstance(obj, torch.optim.Optimizer):
                    obj.load_state_dict(_fast_membership(state))
                else:
                    obj.load_state_dict(state)
            except Exception as exc:  # the object's own load_state_dict: nothing could check it beforehand
                done = f"; already restored: {', '.join(restored)}" if restored else "; nothing else was changed"
                raise StateMismatchError(f"restoring {self._kinds[name]} {name!r} failed: {exc}{done}") from exc
            restored.append(name)
        self._epoch = fit.progress.get("epoch", self._epoch)
        self._step = fit.progress.get("step", self._step)
        self._loss = fit.progress.get("loss", self._loss)
        if fit.rng is not None:
            set_rng_state(fit.rng)


_FSDP1_ADVICE = ("Its optimizer state is a different flat shard on every rank, which pyckpt cannot store as "
                 "replicated state nor restore on another layout. Use FSDP2 instead "
                 "(torch.distributed.fsdp.fully_shard: pyckpt snapshots its DTensors sharded and restores them "
                 "on any world size), or wrap the model with DistributedDataParallel.")


def _uses_fsdp1(model: torch.nn.Module) -> bool:
    """Whether the model or one of its submodules is an FSDP1 wrapper."""
    fsdp = _fsdp1_class()
    return fsdp is not None and any(isinstance(m, fsdp) for m in model.modules())


def _fsdp1_class() -> type | None:
    """FSDP1's wrapper class if its module is loaded (no FSDP1 model exists otherwise; importing it
    costs seconds that a DDP job does not need)."""
    module = sys.modules.get("torch.distributed.fsdp")
    return getattr(module, "FullyShardedDataParallel", None)


class _IdList(list):
    """A param group's "params" (saved param ids) with O(1) `in`: torch's Optimizer.load_state_dict
    looks up the group of every state tensor with `param_id in group["params"]`, which is quadratic
    in the number of parameters (0.25 s at 5,000 parameters with Adam). Same list otherwise."""

    def __contains__(self, item) -> bool:
        cached = self.__dict__.get("_ids")
        if cached is None or cached[0] != len(self):
            try:
                cached = (len(self), frozenset(self))
            except TypeError:  # unhashable entries: plain list semantics
                return list.__contains__(self, item)
            self.__dict__["_ids"] = cached
        try:
            return item in cached[1]
        except TypeError:
            return list.__contains__(self, item)


def _fast_membership(state: Any) -> Any:
    """The optimizer state dict with each param group's "params" as an _IdList (values unchanged)."""
    groups = state.get("param_groups") if isinstance(state, dict) else None
    if not isinstance(groups, list):
        return state
    state = dict(state)
    state["param_groups"] = [dict(g, params=_IdList(g["params"]))
                             if isinstance(g, dict) and type(g.get("params")) is list else g for g in groups]
    return state


def rng_state() -> dict:
    state: dict[str, Any] = {"python": random.getstate(), "torch": torch.get_rng_state()}
    if np is not None:
        state["numpy"] = np.random.get_state()
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict) -> None:
    if "python" in state:
        version, internal, gauss = state["python"]
        random.setstate((version, tuple(internal), gauss))
    if "torch" in state:
        torch.set_rng_state(state["torch"])
    if "numpy" in state and np is not None:
        np.random.set_state(tuple(state["numpy"]))
    if "cuda" in state and torch.cuda.is_available():
        cuda_states = state["cuda"]
        if len(cuda_states) == torch.cuda.device_count():
            torch.cuda.set_rng_state_all(cuda_states)
        else:
            warnings.warn(f"snapshot has CUDA RNG state for {len(cuda_states)} devices, this machine has "
                          f"{torch.cuda.device_count()}: CUDA RNG not restored", stacklevel=3)
