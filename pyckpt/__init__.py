"""pyckpt: crash-safe, checksummed snapshots of torch.distributed training state on a shared filesystem.

    from pyckpt import DistributedCoordinator, TrainingRuntime, load_config
    coordinator = DistributedCoordinator(load_config()).initialize()
    runtime = TrainingRuntime(); runtime.register_model(model.module); runtime.register_optimizer(opt)
    coordinator.restore(path, runtime, missing_ok=True)
    ... coordinator.snapshot(path, runtime) ...
"""
from importlib import import_module
from typing import TYPE_CHECKING

from .config import Config, load_config
from .errors import (
    ConfigError,
    DistributedInitError,
    IntegrityError,
    PyckptError,
    SnapshotAccessError,
    SnapshotError,
    SnapshotLockedError,
    SnapshotNotFoundError,
    SnapshotPathError,
    SnapshotReadError,
    StateMismatchError,
)

if TYPE_CHECKING:   # for type checkers and IDEs; at run time these load on first use (below)
    from .coordinator import DistributedCoordinator, SnapshotInfo
    from .reader import Snapshot, load
    from .runtime import TrainingRuntime
    from .sampler import ElasticSampler

__version__ = "0.1.0"
__all__ = [
    "Config", "ConfigError", "DistributedCoordinator", "DistributedInitError", "ElasticSampler", "IntegrityError",
    "PyckptError",
    "Snapshot", "SnapshotAccessError", "SnapshotError", "SnapshotInfo", "SnapshotLockedError", "SnapshotNotFoundError",
    "SnapshotPathError", "SnapshotReadError", "StateMismatchError", "TrainingRuntime", "load", "load_config",
]

# These import torch (over a second): loaded on first use, so that `pyckpt config validate`, which
# Ansible runs on every node, starts without it.
_FROM_MODULE = {"DistributedCoordinator": "coordinator", "SnapshotInfo": "coordinator", "Snapshot": "reader",
                "load": "reader", "TrainingRuntime": "runtime", "ElasticSampler": "sampler"}


def __getattr__(name: str):
    if name not in _FROM_MODULE:
        raise AttributeError(f"module 'pyckpt' has no attribute {name!r}")
    value = getattr(import_module(f".{_FROM_MODULE[name]}", __name__), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))
