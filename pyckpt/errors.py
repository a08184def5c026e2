"""Every error pyckpt raises on purpose. Messages say what is wrong and what to do next."""
from __future__ import annotations


class PyckptError(Exception):
    """Base class: catch this to handle any expected pyckpt failure."""


class ConfigError(PyckptError, ValueError):
    """The cluster configuration (file or environment) is invalid."""


class DistributedInitError(PyckptError, RuntimeError):
    """Joining the torch.distributed process group failed."""


class SnapshotNotFoundError(PyckptError, FileNotFoundError):
    """No committed snapshot at the given path."""


class SnapshotError(PyckptError, RuntimeError):
    """Writing a snapshot failed; the previous snapshot is untouched."""


class SnapshotLockedError(SnapshotError):
    """Another process is writing a snapshot to the same path."""


class IntegrityError(PyckptError):
    """Snapshot data is corrupted, truncated, tampered with or inconsistent."""

    def __init__(self, message: str, *, file: str | None = None, tensor: str | None = None):
        super().__init__(message)
        self.file = file
        self.tensor = tensor


class SnapshotPathError(PyckptError, ValueError):
    """The path given cannot name a snapshot (empty, the root, ending in a separator)."""


class SnapshotAccessError(PyckptError, PermissionError):
    """This user may not read or write a snapshot's files (permissions or owner)."""


class StateMismatchError(PyckptError, ValueError):
    """The snapshot does not fit the registered model/optimizer/objects."""


class SnapshotReadError(PyckptError, OSError):
    """Reading a snapshot failed on a rank (an I/O error, a stale NFS handle, a permission)."""
