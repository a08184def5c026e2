"""pyckpt: crash-safe, checksummed snapshots of torch.distributed training state on a shared filesystem.

    from pyckpt import DistributedCoordinator, TrainingRuntime, load_config
    coordinator = DistributedCoordinator(load_config()).initialize()
    runtime = TrainingRuntime(); runtime.register_model(model.module); runtime.register_optimizer(opt)
    coordinator.restore(path, runtime, missing_ok=True)
    ... coordinator.snapshot(path, runtime) ...
"""
from .config import Config, load_config
from .coordinator import DistributedCoordinator, SnapshotInfo
from .errors import (
    ConfigError,
    DistributedInitError,
    IntegrityError,
    PyckptError,
    SnapshotError,
    SnapshotLockedError,
    SnapshotNotFoundError,
    StateMismatchError,
)
from .reader import Snapshot, load
from .runtime import TrainingRuntime

__version__ = "0.1.0"
__all__ = [
    "Config", "ConfigError", "DistributedCoordinator", "DistributedInitError", "IntegrityError", "PyckptError",
    "Snapshot", "SnapshotError", "SnapshotInfo", "SnapshotLockedError", "SnapshotNotFoundError",
    "StateMismatchError", "TrainingRuntime", "load", "load_config",
]
