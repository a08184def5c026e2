"""A restore on every rank: each rank opens the newest committed version, checks that it fits the
runtime, reads its state (ranks of one machine each read a share and copy the rest from each other:
peers.py), then all ranks agree on the outcome before any of them loads the state into the runtime.
A rank that fails makes every rank raise the same error, naming it."""
from __future__ import annotations

import warnings
from contextlib import ExitStack
from dataclasses import dataclass
from typing import Any

import torch

from . import fitting, messages, peers
from .collectives import Comm
from .errors import IntegrityError, SnapshotNotFoundError, StateMismatchError
from .reader import Running, Snapshot, TreeRead
from .runtime import TrainingRuntime
from .sysio import gc_paused


@dataclass(frozen=True)
class Neighbours:
    """The ranks whose memory this rank can read (same machine, same pid namespace), and whether any
    ranks of the job share a machine at all (then offers are exchanged, a collective)."""

    ranks: list[int]
    any_shared: bool


def restore_snapshot(comm: Comm, neighbours: Neighbours, path: str, runtime: TrainingRuntime, *, strict: bool,
                     missing_ok: bool, version: str | None) -> bool:
    """Load the snapshot at `path` into the runtime on every rank; False if there is none and missing_ok.
    The cyclic GC is paused throughout: a restore builds several objects per tensor in every step, and
    a full collection between steps cost up to 0.5 s of a 20,000-tensor restore (its objects form no
    cycles; the collector resumes after). Autograd is off too: only bytes are moved (load_state_dict
    turns it off itself), and one switch costs less than one per DTensor (shards.local_tensor)."""
    with gc_paused(), torch.no_grad():
        return _restore(comm, neighbours, path, runtime, strict=strict, missing_ok=missing_ok, version=version)


def _restore(comm: Comm, neighbours: Neighbours, path: str, runtime: TrainingRuntime, *, strict: bool,
             missing_ok: bool, version: str | None) -> bool:
    local = neighbours.ranks if comm.rank in neighbours.ranks else [comm.rank]
    job = _Restoring(path, comm.rank)
    with ExitStack() as held:
        if len(local) > 1:
            held.enter_context(peers.readable_by_peers())
        job.attempt(lambda: job.prepare(runtime, version, strict, held))
        offers = _exchange_offers(comm, neighbours.any_shared, job.replicated, job.version, local)
        job.attempt(lambda: job.read(offers, local))
        # Also the point before which no rank returns: peers may be copying from its tensors.
        outcomes = comm.all_gather(job.outcome())
    error = job.error
    if error is not None and job.in_place.tensors and job.replicated is not None:   # planned: it failed reading
        error = _partly_overwritten(error)
    if not _agreed(outcomes, path, error):
        if missing_ok:
            return False
        raise error
    saved_world = job.snap.manifest.world_size
    if comm.world_size != saved_world:
        warnings.warn(f"restoring a {saved_world}-rank snapshot on {comm.world_size} ranks: model and optimizer "
                      "state are restored; per-rank RNG state only for ranks present in both", stacklevel=4)
    _load_everywhere(comm, path, runtime, job.replicated.tree(), job.private, strict, job.in_place.objects)
    runtime.restored_version = job.snap.ref.name
    return True


class _Restoring:
    """One rank's side of a restore: the version opened, its state read (into the live objects where
    they fit exactly), or the error that stopped it, turned into a pyckpt error for the other ranks."""

    def __init__(self, path: str, rank: int):
        self.path, self.rank = path, rank
        self.snap: Snapshot | None = None
        self.private: Any = None
        self.in_place = fitting.InPlace({}, frozenset())   # what is read straight into the live objects
        self.replicated: TreeRead | None = None
        self.own: Running | None = None   # the read of the sharded tensors, under way
        self.error: Exception | None = None

    @property
    def version(self) -> str | None:
        return self.snap.ref.name if self.replicated is not None else None

    def attempt(self, step) -> None:
        if self.error is not None:
            return
        try:
            step()
        except SnapshotNotFoundError as exc:
            self.error = exc
        except Exception as exc:
            self.error = messages.as_read_error(exc, self.path, self.rank)

    def prepare(self, runtime: TrainingRuntime, version: str | None, strict: bool, held: ExitStack) -> None:
        """Open the version and check it fits the runtime before a byte goes into the live objects:
        this rank's private state first (a few KiB: its values are checked too), then the plan."""
        snap = self.snap = Snapshot.open(self.path, version)
        self.private = snap.private(self.rank) if self.rank < snap.manifest.world_size else None
        in_place = self.in_place = fitting.live_destinations(snap.manifest, runtime)
        fitting.check_fits(snap.manifest, runtime, self.rank, strict, private=self.private, matched=in_place.objects)
        into = {**fitting.optimizer_targets(snap.manifest, runtime, done=in_place), **in_place.tensors}
        self.replicated = held.enter_context(snap.reading(snap.manifest.replicated, into=into))
        # The sharded tensors (each rank its own boxes) are read from now on: ranks sharing a machine
        # then read while the others are still planning. Their jobs end before the files close.
        self.own = self.replicated.own.start()
        held.callback(self.own.settle)

    def read(self, offers: list[peers.Offer] | None, local: list[int]) -> None:
        if offers:  # ranks on one machine each read a share of the other tensors and copy the rest
            peers.read_shared(self.replicated, offers, local.index(self.rank))
        else:
            self.replicated.run_plain()
        self.own.wait()

    def outcome(self) -> messages.RestoreOutcome:
        if isinstance(self.error, SnapshotNotFoundError):
            return messages.RestoreOutcome(missing=True)
        if self.error is not None:
            return messages.RestoreOutcome(error=messages.RankError.of(self.rank, self.error))
        return messages.RestoreOutcome(version=self.snap.ref.name)


def _partly_overwritten(error: Exception) -> Exception:
    """The error of a restore that failed after it began reading straight into the live objects,
    whatever failed (a checksum, an I/O error): it says they are now unusable."""
    note = ("\nThe registered model/optimizer were being restored in place and may be partly overwritten: "
            "restore another version (restore(path, version=...); `pyckpt ls` lists them) before training on.")
    if isinstance(error, IntegrityError):
        return IntegrityError(f"{error}{note}", file=error.file, tensor=error.tensor)
    return type(error)(f"{error}{note}")   # a pyckpt error (as_read_error), whose message is its one argument


def _exchange_offers(comm: Comm, any_shared: bool, replicated: TreeRead | None, version: str | None,
                     local: list[int]) -> list[peers.Offer] | None:
    """Where each rank on this machine will read its share into (peers.offer), for every rank of the
    job (a collective, when any ranks share a machine). None when this rank reads alone: no peers,
    or a peer that could not open the same version."""
    if not any_shared:
        return None
    mine = peers.offer(replicated, len(local), local.index(comm.rank)) \
        if replicated is not None and len(local) > 1 else None
    gathered = comm.all_gather((version, mine))
    offers = [gathered[r][1] for r in local]
    if len(local) < 2 or None in offers or len({gathered[r][0] for r in local}) != 1:
        return None
    return offers


def _agreed(outcomes: list[messages.RestoreOutcome], path: str, error: Exception | None) -> bool:
    """After every rank read: True if all read the same version, False if none found a snapshot;
    otherwise raise, on every rank, this rank's error or the first rank's that failed."""
    failures = [o.error for o in outcomes if o.error is not None]
    if failures:
        if error is not None and not isinstance(error, SnapshotNotFoundError):
            raise error
        raise failures[0].error(f"restore of {path} failed")
    if all(o.missing for o in outcomes):
        return False
    if any(o.missing for o in outcomes) or len({o.version for o in outcomes}) != 1:
        seen = "; ".join(f"rank {r}: {o.version or 'no snapshot'}" for r, o in enumerate(outcomes))
        raise IntegrityError(f"restore of {path}: the ranks found different snapshots ({seen}); every rank must "
                             "see the same shared filesystem at the same path (check the mounts)", file=path)
    return True


def _load_everywhere(comm: Comm, path: str, runtime: TrainingRuntime, replicated: Any, private: Any,
                     strict: bool, matched: frozenset[str]) -> None:
    """Put the read state into the runtime; a rank where that fails makes every rank raise."""
    failure: messages.RankError | None = None
    try:
        runtime.load_state(replicated, private, strict=strict, matched=matched)
    except Exception as exc:
        if comm.world_size == 1:
            raise
        failure = messages.RankError.of(comm.rank, exc, StateMismatchError)
        error = exc
    failures = [f for f in comm.all_gather(failure) if f is not None]
    if failure is not None:
        raise error
    if failures:
        raise failures[0].error(f"restore of {path} failed")
