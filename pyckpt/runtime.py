"""TrainingRuntime: what a training script registers to be snapshotted, and how it is put back."""
from __future__ import annotations

import random
import warnings
from typing import Any, Protocol

import torch

from .errors import StateMismatchError

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
    rank of a DDP job and is stored once. The RNG states are per rank and stored per rank.
    """

    def __init__(self, *, capture_rng: bool = True):
        self._objects: dict[str, Stateful] = {}
        self._kinds: dict[str, str] = {}
        self._epoch = 0
        self._step = 0
        self._loss: float | None = None
        self.capture_rng = capture_rng

    # -- registration ----------------------------------------------------------------------
    def register_model(self, model: torch.nn.Module, name: str = "model") -> None:
        """Register a model (pass a DDP model's `.module`)."""
        if isinstance(model, torch.nn.parallel.DistributedDataParallel):
            model = model.module  # its state_dict keys would carry a "module." prefix otherwise
        self._add(name, model, "model")

    def register_optimizer(self, optimizer: torch.optim.Optimizer, name: str | None = None) -> None:
        """Register an optimizer; several are allowed (named optimizer, optimizer_1, ... by default)."""
        if name is None:
            count = sum(1 for kind in self._kinds.values() if kind == "optimizer")
            name = "optimizer" if count == 0 else f"optimizer_{count}"
        self._add(name, optimizer, "optimizer")

    def register(self, name: str, obj: Stateful) -> None:
        """Register anything with state_dict()/load_state_dict(): LR schedulers, grad scalers, samplers..."""
        if not (callable(getattr(obj, "state_dict", None)) and callable(getattr(obj, "load_state_dict", None))):
            raise TypeError(f"cannot register {name!r}: a {type(obj).__name__} has no state_dict/load_state_dict")
        self._add(name, obj, "object")

    def _add(self, name: str, obj: Stateful, kind: str) -> None:
        if not isinstance(name, str) or not name:
            raise ValueError(f"register: name must be a non-empty string, got {name!r}")
        if name in self._objects and self._objects[name] is not obj:
            raise ValueError(f"register: name {name!r} is already taken by a {self._kinds[name]}; pick another")
        self._objects[name] = obj
        self._kinds[name] = kind

    @property
    def objects(self) -> dict[str, Stateful]:
        return dict(self._objects)

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
            "kinds": dict(self._kinds),
            "objects": {name: obj.state_dict() for name, obj in self._objects.items()},
        }

    def private_state(self) -> dict:
        # The loss differs per rank (each sees its own batch), so it is private state.
        state: dict[str, Any] = {"loss": self._loss}
        if self.capture_rng:
            state["rng"] = rng_state()
        return state

    def load_state(self, replicated: dict, private: dict | None, *, strict: bool = True) -> None:
        """Put a snapshot's state back into the registered objects (checks everything first)."""
        saved = replicated.get("objects", {})
        missing = [n for n in self._objects if n not in saved]
        unexpected = [n for n in saved if n not in self._objects]
        problems = []
        if missing:
            problems.append(f"registered but not in the snapshot: {', '.join(missing)}")
        if unexpected:
            problems.append(f"in the snapshot but not registered: {', '.join(unexpected)}")
        for name, obj in self._objects.items():
            if name in saved and self._kinds[name] == "model":
                problems.extend(_model_mismatch(name, obj, saved[name], strict))
        if problems and strict:
            raise StateMismatchError(
                "snapshot does not fit this runtime:\n  - " + "\n  - ".join(problems)
                + "\nfix the model/optimizer definition, or restore with strict=False to load what fits"
            )
        for problem in problems:
            warnings.warn(f"restore (strict=False): {problem}", stacklevel=3)
        for name, obj in self._objects.items():
            if name not in saved:
                continue
            state = saved[name]
            try:
                if self._kinds[name] == "model":
                    obj.load_state_dict(_fitting(obj, state), strict=strict)
                elif isinstance(obj, torch.optim.Optimizer):
                    obj.load_state_dict(_fast_membership(state))
                else:
                    obj.load_state_dict(state)
            except (ValueError, KeyError, RuntimeError) as exc:
                raise StateMismatchError(f"restoring {self._kinds[name]} {name!r} failed: {exc}") from exc
        progress = replicated.get("progress", {})
        self._epoch = int(progress.get("epoch") or 0)
        self._step = int(progress.get("step") or 0)
        self._loss = (private or {}).get("loss")
        if private and "rng" in private and self.capture_rng:
            set_rng_state(private["rng"])


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


def _model_mismatch(name: str, model: torch.nn.Module, saved: dict, strict: bool) -> list[str]:
    current = model.state_dict()
    problems = []
    missing = [k for k in current if k not in saved]
    unexpected = [k for k in saved if k not in current]
    shapes = [f"{k}: snapshot {tuple(saved[k].shape)} vs model {tuple(v.shape)}"
              for k, v in current.items()
              if k in saved and isinstance(saved[k], torch.Tensor) and saved[k].shape != v.shape]
    if missing:
        problems.append(f"model {name!r} missing keys: {', '.join(missing[:20])}")
    if unexpected:
        problems.append(f"model {name!r} unexpected keys: {', '.join(unexpected[:20])}")
    if shapes:
        problems.append(f"model {name!r} shape mismatches: {'; '.join(shapes[:20])}")
    return problems


def _fitting(model: torch.nn.Module, saved: dict) -> dict:
    current = model.state_dict()
    return {k: v for k, v in saved.items()
            if k not in current or not isinstance(v, torch.Tensor) or v.shape == current[k].shape}


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
