"""What ranks tell each other during a snapshot or a restore, and how one rank's error reaches all.

Every message is a small dataclass (pickled by torch.distributed's object collectives). An error is
carried as its pyckpt class name and its message, so that every rank raises the same kind of error
naming the rank where it happened, instead of one rank raising and the others waiting at the next
collective until the process group times out.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from . import errors
from .errors import PyckptError, SnapshotError, SnapshotReadError


@dataclass(frozen=True)
class RankError:
    """A failure on one rank: the pyckpt error class to raise everywhere, and its message."""

    rank: int
    kind: str
    message: str

    @classmethod
    def of(cls, rank: int, exc: BaseException, default: type[PyckptError] = SnapshotError) -> "RankError":
        kind = type(exc).__name__ if isinstance(exc, PyckptError) else default.__name__
        return cls(rank, kind, f"rank {rank}: {describe(exc)}")

    def error(self, what: str, base: type[PyckptError] = PyckptError) -> PyckptError:
        """The exception to raise for it: its own pyckpt class where that is a `base`, else `base`
        (a snapshot fails with a SnapshotError, whatever the cause)."""
        kind = getattr(errors, self.kind, None)
        if not (isinstance(kind, type) and issubclass(kind, base)):
            kind = base
        return kind(f"{what}: {self.message}")


def describe(exc: BaseException) -> str:
    """One line for any exception: its own message for pyckpt errors, the OS's words for I/O errors."""
    if isinstance(exc, PyckptError):
        return str(exc)
    if isinstance(exc, OSError) and exc.strerror:
        return f"{exc.filename + ': ' if exc.filename else ''}{exc.strerror} ({type(exc).__name__})"
    text = str(exc).strip().splitlines()
    return f"{type(exc).__name__}: {text[0] if text else ''}".rstrip(": ")


def as_read_error(exc: Exception, path: str, rank: int | None = None) -> PyckptError:
    """A pyckpt error for anything reading a snapshot raised (pyckpt errors pass unchanged)."""
    if isinstance(exc, PyckptError):
        return exc
    where = f"restore of {path} failed on rank {rank}" if rank is not None else f"reading {path} failed"
    if isinstance(exc, OSError):
        return SnapshotReadError(
            f"{where}: {describe(exc)}; check the shared filesystem on this node (mounted, readable by this "
            "user, not a stale NFS handle: remount it), then try again")
    return SnapshotReadError(
        f"{where} with an unexpected {describe(exc)}; the snapshot may be damaged (`pyckpt verify` checks "
        "it) or this is a pyckpt bug: please report it")


@dataclass(frozen=True)
class Begun:
    """The leader's answer to "may we write?": a version name and its stage dir, or why not."""

    name: str | None = None
    stage: str | None = None
    error: RankError | None = None


@dataclass
class RankReport:
    """What one rank did in a snapshot: the checksums of the pieces it wrote (plan order), the
    fingerprint of the replicated state it holds, and its private state's layout; or its error."""

    rank: int
    error: RankError | None = None
    size: int = 0
    digests: list[str] = field(default_factory=list)
    structure: str = ""
    samples: bytes = b""                  # one xxh3-64 per replicated tensor, of sampled bytes
    private_tree: Any = None
    private_records: list[tuple[str, list[int], int]] = field(default_factory=list)
    # the parts of sharded tensors it wrote: (tensor, offsets, sizes, start in the box, length, holding
    # ranks, file offset); their pieces' digests follow the replicated ones in `digests`
    shards: list[tuple] = field(default_factory=list)
    private_base: int = 0                 # where its private state starts in its file
    serial: str = ""                      # its capture's derivation: unchanged, so are `shards` and its records


@dataclass(frozen=True)
class RestoreOutcome:
    """One rank's result of reading a snapshot: the version it read, none found, or its error."""

    version: str | None = None
    missing: bool = False
    error: RankError | None = None
