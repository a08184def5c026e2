"""DistributedCoordinator: joins the process group and runs snapshot/restore on every rank.

Snapshot protocol (rank 0 leads):
  1. leader takes the path's lock, cleans leftovers of crashed writers, creates a stage dir;
  2. every rank writes its share of the replicated bytes plus its private state to
     stage/data-<rank>.bin and fsyncs it;
  3. leader gathers every rank's checksums; only if every rank succeeded and all ranks hold the
     same replicated structure does it write the manifest and publish the version atomically;
  4. the outcome is broadcast, so every rank returns or raises together.
"""
from __future__ import annotations

import atexit
import gc
import logging
import os
import signal
import socket
import sys
import threading
import time
import warnings
from concurrent.futures import Future
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass
from datetime import timedelta
from typing import Any

import numpy as np
import torch
import torch.distributed as dist
from xxhash import xxh3_64_intdigest

from . import fitting, messages, peers
from .config import Config, load_config
from .errors import (DistributedInitError, IntegrityError, PyckptError, SnapshotError, SnapshotLockedError,
                     SnapshotNotFoundError, StateMismatchError)
from .manifest import FileRecord, Manifest, Piece, TensorRecord, checksum
from .planner import RankPlan, Slice, plan_private, plan_replicated
from .reader import Snapshot, TreeRead
from .runtime import TrainingRuntime
from .storage import SPARE_DIR, SnapshotStore
from .testhooks import crash_point
from .sysio import byte_view, helper_pool
from .tree import DTYPE_NAMES, flatten, shift, tensor_paths
from .writer import write_file

log = logging.getLogger("pyckpt")
DEFAULT_KEEP_LAST = 2


@dataclass(frozen=True)
class SnapshotInfo:
    path: str
    version: str
    step: int
    bytes_written: int      # by this rank
    seconds: float          # until durable and committed


class _Comm:
    """The few collectives the coordinator needs, or their single-process equivalents."""

    def __init__(self, group: Any = None, rank: int = 0, world_size: int = 1):
        self.group, self.rank, self.world_size = group, rank, world_size

    def broadcast(self, obj: Any) -> Any:
        if self.world_size == 1:
            return obj
        box = [obj]
        dist.broadcast_object_list(box, src=0, group=self.group)
        return box[0]

    def gather(self, obj: Any) -> list[Any] | None:
        if self.world_size == 1:
            return [obj]
        out = [None] * self.world_size if self.rank == 0 else None
        dist.gather_object(obj, out, dst=0, group=self.group)
        return out

    def all_gather(self, obj: Any) -> list[Any]:
        if self.world_size == 1:
            return [obj]
        out: list[Any] = [None] * self.world_size
        dist.all_gather_object(out, obj, group=self.group)
        return out


class _SnapshotFuture(Future):
    """The Future of a background snapshot; remembers whether the script has looked at its outcome,
    so that an error it already handled is not raised again by the next snapshot() or at exit."""

    def __init__(self, path: str):
        super().__init__()
        self.path = path
        self.seen = False

    def result(self, timeout: float | None = None) -> Any:
        self.seen = True
        return super().result(timeout)

    def exception(self, timeout: float | None = None) -> BaseException | None:
        self.seen = True
        return super().exception(timeout)


@dataclass
class _Captured:
    """What one rank contributes to one snapshot: its plan and the bytes to write (or why it has none)."""

    replicated_tree: Any
    private_tree: Any
    records: list[TensorRecord]          # replicated tensors, pieces filled in by the leader
    private_records: list[TensorRecord]
    segments: list[tuple[Slice, memoryview]]
    share: RankPlan
    private_plan: RankPlan
    meta: dict
    samples: bytes = b""                 # divergence fingerprints of the replicated tensors
    error: Exception | None = None

    @classmethod
    def failed(cls, error: Exception) -> "_Captured":
        empty = RankPlan([], 0)
        return cls(None, None, [], [], [], empty, empty, {}, error=error)


class DistributedCoordinator:
    def __init__(self, config: Config | None = None, *, keep_last: int = DEFAULT_KEEP_LAST,
                 reuse_files: bool = False):
        """keep_last: committed versions kept. reuse_files: keep the data files of the version that
        falls out of keep_last as spares (P.pyckpt/.spare/) and overwrite them with the next snapshot
        instead of deleting them and allocating new files (faster, steadier saves: docs/PERFORMANCE.md;
        costs the disk space of one more version between snapshots, hence off by default)."""
        if keep_last < 1:
            raise ValueError(f"keep_last must be >= 1, got {keep_last}")
        self.config = config
        self.keep_last = keep_last
        self.reuse_files = reuse_files
        self._comm = _Comm()
        self._owns_group = False
        self._initialized = False
        self._pending: _SnapshotFuture | None = None
        self._exit_hooked = False
        self._pruning: threading.Thread | None = None
        self._staging = torch.empty(0, dtype=torch.uint8)
        self._plan_cache: tuple | None = None
        self._previous_sigterm: Any = None
        self._machine_ranks = [0]   # the ranks whose memory this rank can read (one machine, one pid namespace)
        self._ranks_share_machines = False

    # -- lifecycle -------------------------------------------------------------------------
    def initialize(self) -> "DistributedCoordinator":
        if self._initialized:
            return self
        if self.config is None:
            self.config = load_config()
        cfg = self.config
        for key, value in cfg.passthrough:
            os.environ.setdefault(key, value)
        if dist.is_available() and dist.is_initialized():
            pass  # the script joined the group itself: use it
        elif cfg.world_size > 1:
            self._join(cfg)
        if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
            # Our own gloo group: snapshot traffic never interleaves with training collectives,
            # and object collectives work even when the training backend is nccl.
            group = dist.new_group(backend="gloo")
            self._comm = _Comm(group, dist.get_rank(), dist.get_world_size())
            # Ranks that can read each other's memory split the reading of replicated state at
            # restore (peers.py).
            spaces = self._comm.all_gather(_process_space())
            self._machine_ranks = [r for r, space in enumerate(spaces) if space == spaces[self.rank]]
            self._ranks_share_machines = len(set(spaces)) < len(spaces)
        if self._owns_group or self._comm.group is not None:
            atexit.register(self._release_groups)
        self._initialized = True
        return self

    def _join(self, cfg: Config) -> None:
        if cfg.backend == "nccl":
            torch.cuda.set_device(cfg.local_rank)
        host = f"[{cfg.master_addr}]" if ":" in cfg.master_addr else cfg.master_addr
        init_method = "env://" if cfg.launched_by_torchrun else f"tcp://{host}:{cfg.master_port}"
        try:
            dist.init_process_group(cfg.backend, init_method=init_method, rank=cfg.rank, world_size=cfg.world_size,
                                    timeout=timedelta(seconds=cfg.init_timeout_s))
        except (RuntimeError, ValueError, OSError) as exc:
            raise DistributedInitError(
                f"rank {cfg.rank}/{cfg.world_size} could not join the process group at "
                f"{cfg.master_addr}:{cfg.master_port} (backend {cfg.backend}, timeout {cfg.init_timeout_s:g}s): "
                f"{str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__}\n"
                "Check: MASTER_ADDR is the master's cluster address and resolves on this node (not 127.0.1.1); "
                f"port {cfg.master_port}/tcp is open on the master and the firewall allows the cluster subnet "
                "(gloo/NCCL also use ephemeral ports); rank 0 (the master) is running and nothing else holds "
                "the port; every node has the same WORLD_SIZE. `pyckpt doctor` checks these."
            ) from exc
        self._owns_group = True

    def shutdown(self) -> None:
        """Finish the snapshot in flight, then leave the process group (if we joined it)."""
        try:
            self.wait()
        finally:
            self._release_groups()
            self._initialized = False

    def _release_groups(self) -> None:
        """Destroy the process groups this coordinator created (all of them if it joined the job).

        A gloo group still alive when the interpreter exits can abort the process ("terminate called
        without an active exception") while C++ tears its threads down, so this also runs at exit."""
        atexit.unregister(self._release_groups)
        if dist.is_available() and dist.is_initialized():
            if self._owns_group:
                dist.destroy_process_group()
            elif self._comm.group is not None:
                dist.destroy_process_group(self._comm.group)
        self._owns_group = False
        self._comm = _Comm()

    def __enter__(self) -> "DistributedCoordinator":
        return self.initialize()

    def __exit__(self, *exc_info) -> None:
        self.shutdown()

    @property
    def rank(self) -> int:
        return self._comm.rank

    @property
    def world_size(self) -> int:
        return self._comm.world_size

    @property
    def is_leader(self) -> bool:
        return self._comm.rank == 0

    # -- snapshot --------------------------------------------------------------------------
    def snapshot(self, path: str | os.PathLike, runtime: TrainingRuntime, *, blocking: bool = True,
                 keep_last: int | None = None) -> SnapshotInfo | Future:
        """Snapshot the runtime's state to `path` (the same path every time is fine).

        blocking=True returns when the snapshot is durable and committed. blocking=False returns a
        Future after one copy of this rank's share into a reused staging buffer; the write continues
        in the background (one snapshot in flight at a time: the next call waits for it).
        """
        self.initialize()
        self._wait_pending()  # not the previous clean-up: the write waits for that, off the training thread
        keep = keep_last or self.keep_last
        start = time.perf_counter()
        with _gc_paused():
            try:
                captured = self._capture(runtime)
                if not blocking:
                    self._stage(captured)
            except Exception as exc:
                if self.world_size == 1:
                    raise
                captured = _Captured.failed(exc)  # the other ranks learn of it in the protocol, not by a hang
            if blocking:
                return self._write(str(path), captured, keep, start)
        self._install_sigterm_guard()
        self._finish_at_exit_once()
        future = _SnapshotFuture(str(path))
        self._pending = future

        def run() -> None:
            try:
                future.set_result(self._write(str(path), captured, keep, start))
            except BaseException as exc:  # handed to the caller through the future
                future.set_exception(exc)

        threading.Thread(target=run, name="pyckpt-snapshot", daemon=False).start()
        return future

    def wait(self) -> SnapshotInfo | None:
        """Block until the snapshot in flight (if any) is committed and the versions it dropped are
        deleted; re-raise its error unless the caller already got it through the snapshot's future."""
        try:
            return self._wait_pending()
        finally:
            self._wait_pruning()

    def _wait_pending(self) -> SnapshotInfo | None:
        future, self._pending = self._pending, None
        if future is None:
            return None
        already_seen = future.seen
        try:
            return future.result()
        except BaseException:
            if already_seen:
                return None  # the script got this error from the future and handled it: do not raise it twice
            raise

    def _wait_pruning(self) -> None:
        pruning, self._pruning = self._pruning, None
        if pruning is not None:
            pruning.join()

    def _finish_at_exit_once(self) -> None:
        """Make the interpreter finish the snapshot in flight when the script ends (normally, by sys.exit,
        an uncaught exception or Ctrl-C) before concurrent.futures stops its threads at exit.
        threading runs its exit hooks newest first, so this one runs before that of concurrent.futures."""
        if self._exit_hooked:
            return
        try:
            threading._register_atexit(self._finish_at_exit)  # type: ignore[attr-defined]
        except (AttributeError, RuntimeError):
            return  # already exiting: the snapshot thread is joined anyway and the pool runs work inline
        self._exit_hooked = True

    def _finish_at_exit(self) -> None:
        future = self._pending
        if future is None or (future.done() and future.seen):
            return
        if not future.done():
            log.warning("the script is exiting: finishing the snapshot to %s first", future.path)
        try:
            future.result()
        except BaseException as exc:
            message = messages.describe(exc)
            sys.stderr.write(f"pyckpt: ERROR: the background snapshot to {future.path} was not committed: {message}\n"
                             "pyckpt: the previous snapshot (if any) is still the newest; exiting with status 1\n")
            sys.stderr.flush()
            sys.stdout.flush()
            os._exit(1)

    def _capture(self, runtime: TrainingRuntime) -> _Captured:
        rep_tensors: list = []
        rep_tree = flatten(runtime.replicated_state(), rep_tensors, "replicated")
        priv_tensors: list = []
        priv_tree = flatten(runtime.private_state(), priv_tensors, "private")
        views = [byte_view(t) for t in rep_tensors]
        priv_views = [byte_view(t) for t in priv_tensors]
        share = self._plan([len(v) for v in views], self.world_size)[self.rank]
        private_plan = plan_private([len(v) for v in priv_views], share.size)
        segments = [(s, views[s.tensor]) for s in share.slices]
        segments += [(s, priv_views[s.tensor]) for s in private_plan.slices]
        meta = {"step": runtime.step, "epoch": runtime.epoch, "loss": runtime.loss, "created": time.time(),
                "world_size": self.world_size, "torch": torch.__version__, "host": socket.gethostname()}
        samples = _divergence_samples(views) if self.world_size > 1 else b""
        return _Captured(rep_tree, priv_tree, [_record(t) for t in rep_tensors], [_record(t) for t in priv_tensors],
                         segments, share, private_plan, meta, samples)

    def _plan(self, sizes: list[int], world_size: int) -> list[RankPlan]:
        """plan_replicated, cached while the tensor sizes stay the same (every snapshot of a run)."""
        key = (world_size, tuple(sizes))
        cached = self._plan_cache
        if cached is None or cached[0] != key:
            cached = self._plan_cache = (key, plan_replicated(sizes, world_size))
        return cached[1]

    def _stage(self, captured: _Captured) -> None:
        """Copy this rank's bytes into the reused staging buffer (the only part that blocks training).

        The copy is split into equal byte ranges copied in parallel by this thread and the helper
        threads (one per usable CPU, at most 4): the copy is bound by memory bandwidth, which one
        core does not saturate, and the training loop is blocked for this copy anyway."""
        size = captured.share.size + captured.private_plan.size
        if self._staging.numel() < size:
            self._staging = torch.empty(size, dtype=torch.uint8)
        staging = self._staging.numpy()
        jobs = [(piece.file_offset, view, piece.src_offset, piece.length) for piece, view in captured.segments]
        parts = _split(jobs, _copy_workers())
        futures = [helper_pool().submit(_copy_into, staging, part) for part in parts[1:]]
        try:
            _copy_into(staging, parts[0] if parts else [])
        finally:
            for future in futures:
                future.result()
        whole = memoryview(staging)
        captured.segments = [(Slice(p.tensor, p.file_offset, p.file_offset, p.length), whole)
                             for p, _ in captured.segments]

    def _write(self, path: str, cap: _Captured, keep_last: int, start: float) -> SnapshotInfo:
        """The commit protocol (module docstring). Every rank reaches every collective whatever fails
        where, so a failure on one rank is raised on all of them, naming that rank."""
        self._wait_pruning()  # the disk never holds more versions than during one write
        comm = self._comm
        store = SnapshotStore(path)
        with ExitStack() as held:
            begun = comm.broadcast(self._begin(store, cap, held) if comm.rank == 0 else None)
            if begun.error is not None:
                raise self._failure(begun.error, f"snapshot to {path} could not start", cap)
            report = self._write_share(store, begun.stage, cap)
            reports = comm.gather(report)
            failure: messages.RankError | None = None
            if comm.rank == 0:
                try:
                    self._commit(store, begun.name, begun.stage, cap, reports, keep_last)
                except Exception as exc:  # nothing half-made stays behind, whatever went wrong
                    store.abort(begun.stage)
                    failure = next((r.error for r in reports if r.error is not None), None) \
                        or messages.RankError.of(0, exc)
            failure = comm.broadcast(failure)
            if failure is not None:
                raise self._failure(failure, f"snapshot to {path} failed, the previous snapshot is intact", cap)
        if comm.rank == 0:
            self._prune_in_background(store, keep_last)
        return SnapshotInfo(path, begun.name, cap.meta["step"], report.size, time.perf_counter() - start)

    def _begin(self, store: SnapshotStore, cap: _Captured, held: ExitStack) -> messages.Begun:
        """Leader: take the path's lock (held until `held` closes) and create the stage."""
        if cap.error is not None:
            return messages.Begun(error=messages.RankError.of(0, cap.error))
        try:
            held.enter_context(store.locked())
            name, stage = store.begin()
        except Exception as exc:
            held.close()
            return messages.Begun(error=messages.RankError.of(0, exc))
        return messages.Begun(name, stage)

    def _write_share(self, store: SnapshotStore, stage: str, cap: _Captured) -> messages.RankReport:
        """Write this rank's data file into the stage; the report says what the leader needs to commit."""
        rank = self.rank
        if cap.error is not None:
            return messages.RankReport(rank, messages.RankError.of(rank, cap.error))
        size = cap.share.size + cap.private_plan.size
        try:
            data_name = f"data-{rank}.bin"
            spare = os.path.join(store.root, SPARE_DIR, data_name) if self.reuse_files else None
            digests = write_file(os.path.join(stage, data_name), cap.segments, size, reuse=spare)
            # Only several ranks need to compare their replicated structure (and it costs ~50 ms at 20k tensors).
            structure = checksum(repr(cap.replicated_tree).encode() +
                                 repr([(r.dtype, r.shape) for r in cap.records]).encode()) \
                if self.world_size > 1 else ""
        except Exception as exc:
            return messages.RankReport(rank, messages.RankError.of(rank, exc))
        return messages.RankReport(rank, None, size, digests, structure, cap.samples, cap.private_tree,
                                   [(r.dtype, r.shape, r.nbytes) for r in cap.private_records])

    def _failure(self, error: messages.RankError, what: str, cap: _Captured) -> Exception:
        """The exception this rank raises for a failed snapshot: the original one on the rank where it
        happened (single process: exactly what the script caused), the same pyckpt error elsewhere."""
        if cap.error is not None and (self.world_size == 1 or error.rank == self.rank):
            if self.world_size == 1:
                return cap.error
            exc = error.error(what, SnapshotError)
            exc.__cause__ = cap.error
            return exc
        return error.error(what, SnapshotError)

    def _prune_in_background(self, store: SnapshotStore, keep_last: int) -> None:
        """Delete the versions the new record dropped on a helper thread, after the snapshot is
        committed (deleting 1.5 GiB costs ~0.2 s on ext4 with discard, more on NFS): training goes
        on meanwhile; the next snapshot or restore, wait() and shutdown() wait for it."""
        def prune() -> None:
            try:
                store.gc(keep_last)
            except SnapshotLockedError:
                pass        # another writer holds the path: its begin() removes unlisted versions
            except (PyckptError, OSError) as exc:   # e.g. an entry gc refuses to touch: the next snapshot says so
                log.warning("could not delete old versions under %s: %s (the next snapshot retries)", store.root, exc)
            crash_point("pruned")

        self._pruning = threading.Thread(target=prune, name="pyckpt-prune", daemon=False)
        self._pruning.start()

    def _commit(self, store: SnapshotStore, name: str, stage: str, cap: _Captured, reports: list,
                keep_last: int) -> None:
        failed = [r.error for r in reports if r.error is not None]
        if failed:
            raise SnapshotError("; ".join(f.message for f in failed))
        if len({r.structure for r in reports}) != 1:
            raise SnapshotError("ranks hold different replicated state (different models/optimizers per rank); "
                                "pyckpt stores replicated (DDP) state once and needs it identical on every rank; "
                                "register state that differs per rank with per_rank=True")
        _check_same_bytes(reports, cap.replicated_tree)
        # Replicated pieces: every rank planned the same layout, so the leader recomputes it and
        # fills in each rank's checksums in plan order.
        sizes = [r.nbytes for r in cap.records]
        plans = self._plan(sizes, len(reports))
        tensors = [TensorRecord(r.dtype, r.shape, r.nbytes, []) for r in cap.records]
        per_rank_trees = []
        for rank, (plan, report) in enumerate(zip(plans, reports)):
            digests = iter(report.digests)
            for s in plan.slices:
                tensors[s.tensor].pieces.append(Piece(rank, s.file_offset, s.length, next(digests)))
            base = len(tensors)
            tensors.extend(TensorRecord(d, list(shape), n, []) for d, shape, n in report.private_records)
            private_sizes = [n for _, _, n in report.private_records]
            for s in plan_private(private_sizes, plan.size).slices:
                tensors[base + s.tensor].pieces.append(Piece(rank, s.file_offset, s.length, next(digests)))
            per_rank_trees.append(shift(report.private_tree, base))
        manifest = Manifest(len(reports), [FileRecord(f"data-{r}.bin", rep.size) for r, rep in enumerate(reports)],
                            tensors, cap.replicated_tree, per_rank_trees, cap.meta)
        store.keep_spares(keep_last if self.reuse_files else None)
        store.publish(stage, name, manifest.to_json(), cap.meta, keep_last)

    def _install_sigterm_guard(self) -> None:
        """On SIGTERM, finish the snapshot in flight before the process dies (main thread only)."""
        if self._previous_sigterm is not None or threading.current_thread() is not threading.main_thread():
            return
        previous = signal.getsignal(signal.SIGTERM)
        if previous not in (signal.SIG_DFL, None):
            return  # the script handles SIGTERM itself; it should call shutdown()

        def on_sigterm(signum, frame):
            log.warning("SIGTERM: finishing the snapshot in flight before exiting")
            try:
                self.wait()
            finally:
                signal.signal(signal.SIGTERM, signal.SIG_DFL)
                os.kill(os.getpid(), signal.SIGTERM)

        signal.signal(signal.SIGTERM, on_sigterm)
        self._previous_sigterm = previous

    # -- restore ---------------------------------------------------------------------------
    def restore(self, path: str | os.PathLike, runtime: TrainingRuntime, *, strict: bool = True,
                missing_ok: bool = False, version: str | None = None) -> bool:
        """Load the newest committed snapshot at `path` into the runtime, on every rank.

        Works at any world size, and without a process group (a plain process). Returns False
        (and changes nothing) when there is no snapshot and missing_ok=True.
        """
        if not self._initialized and self.config is not None:
            self.initialize()
        self.wait()
        path = str(path)
        comm = self._comm
        local = self._machine_ranks if comm.rank in self._machine_ranks else [comm.rank]
        job = _Restoring(path, comm.rank)
        with ExitStack() as held:
            if len(local) > 1:
                held.enter_context(peers.readable_by_peers())
            job.attempt(lambda: job.prepare(runtime, version, strict, held))
            offers = self._exchange_offers(job.replicated, job.version, local)
            job.attempt(lambda: job.read(offers, local))
            # Also the point before which no rank returns: peers may be copying from its tensors.
            outcomes = comm.all_gather(job.outcome())
        error = job.error
        if isinstance(error, IntegrityError) and job.in_place:
            # tensors are read straight into the live objects: say they are now unusable
            error = IntegrityError(f"{error}\nThe registered model/optimizer were being restored in place and may "
                                   "be partly overwritten: restore another version (restore(path, version=...); "
                                   "`pyckpt ls` lists them) before training on.", file=error.file, tensor=error.tensor)
        if not _restore_agreed(outcomes, path, error):
            if missing_ok:
                return False
            raise error
        saved_world = job.snap.manifest.world_size
        if comm.world_size != saved_world:
            warnings.warn(f"restoring a {saved_world}-rank snapshot on {comm.world_size} ranks: model and optimizer "
                          "state are restored; per-rank RNG state only for ranks present in both", stacklevel=2)
        self._load_everywhere(path, runtime, job.replicated.tree(), job.private, strict)
        return True

    def _load_everywhere(self, path: str, runtime: TrainingRuntime, replicated: Any, private: Any,
                         strict: bool) -> None:
        """Put the read state into the runtime; a rank where that fails makes every rank raise."""
        failure: messages.RankError | None = None
        try:
            with _gc_paused():
                runtime.load_state(replicated, private, strict=strict)
        except Exception as exc:
            if self.world_size == 1:
                raise
            failure = messages.RankError.of(self.rank, exc, StateMismatchError)
            error = exc
        failures = [f for f in self._comm.all_gather(failure) if f is not None]
        if failure is not None:
            raise error
        if failures:
            raise failures[0].error(f"restore of {path} failed")

    def _exchange_offers(self, replicated: TreeRead | None, version: str | None,
                         local: list[int]) -> list[peers.Offer] | None:
        """Where each rank on this machine will read its share into (peers.offer), for every rank of
        the job (a collective, when any ranks share a machine). None when this rank reads alone: no
        peers, or a peer that could not open the same version."""
        if not self._ranks_share_machines:
            return None
        mine = (peers.offer(replicated, len(local), local.index(self.rank))
                if replicated is not None and len(local) > 1 else None)
        gathered = self._comm.all_gather((version, mine))
        offers = [gathered[r][1] for r in local]
        if len(local) < 2 or None in offers or len({gathered[r][0] for r in local}) != 1:
            return None
        return offers


class _Restoring:
    """One rank's side of a restore: the version opened, its state read (into the live objects where
    they fit exactly), or the error that stopped it, turned into a pyckpt error for the other ranks."""

    def __init__(self, path: str, rank: int):
        self.path, self.rank = path, rank
        self.snap: Snapshot | None = None
        self.private: Any = None
        self.in_place: dict[int, torch.Tensor] = {}
        self.replicated: TreeRead | None = None
        self.error: Exception | None = None

    @property
    def version(self) -> str | None:
        return self.snap.ref.name if self.replicated is not None else None

    def attempt(self, step) -> None:
        if self.error is not None:
            return
        try:
            with _gc_paused():
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
        fitting.check_fits(snap.manifest, runtime, self.rank, strict, private=self.private)
        self.in_place = fitting.live_destinations(snap.manifest, runtime)
        self.replicated = held.enter_context(snap.reading(snap.manifest.replicated, into=self.in_place))

    def read(self, offers: list[peers.Offer] | None, local: list[int]) -> None:
        if offers:  # ranks on one machine each read a share and copy the rest
            peers.read_shared(self.replicated, offers, local.index(self.rank))
        else:
            self.replicated.run()

    def outcome(self) -> messages.RestoreOutcome:
        if isinstance(self.error, SnapshotNotFoundError):
            return messages.RestoreOutcome(missing=True)
        if self.error is not None:
            return messages.RestoreOutcome(error=messages.RankError.of(self.rank, self.error))
        return messages.RestoreOutcome(version=self.snap.ref.name)


def _restore_agreed(outcomes: list[messages.RestoreOutcome], path: str, error: Exception | None) -> bool:
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


def _process_space() -> str:
    """Which processes can read each other's memory by pid: those on one running kernel (the boot id,
    not the host name: containers share the host's kernel) and in one pid namespace (a pid means
    another process, or none, in another container)."""
    try:
        with open("/proc/sys/kernel/random/boot_id") as f:
            boot = f.read().strip()
    except OSError:
        boot = socket.gethostname()
    try:
        namespace = os.readlink("/proc/self/ns/pid")
    except OSError:
        namespace = f"host {socket.gethostname()}"   # unknown: do not share with anyone on another host
    return f"{boot} {namespace}"


def _copy_workers() -> int:
    try:
        cpus = len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        cpus = os.cpu_count() or 1
    return max(1, min(4, cpus))


def _split(jobs: list[tuple[int, memoryview, int, int]], parts: int) -> list[list]:
    """Cut copy jobs (dst offset, source view, src offset, length) into `parts` lists of ~equal bytes."""
    total = sum(job[3] for job in jobs)
    target = -(-total // parts) if total else 1
    out: list[list] = [[]]
    room = target
    for dst, view, src, length in jobs:
        while length > room and len(out) < parts:
            if room:
                out[-1].append((dst, view, src, room))
                dst, src, length = dst + room, src + room, length - room
            out.append([])
            room = target
        out[-1].append((dst, view, src, length))
        room -= length
    return out


def _copy_into(staging: np.ndarray, jobs: list[tuple[int, memoryview, int, int]]) -> None:
    """numpy copies of plain bytes release the GIL (above a few hundred bytes), so parts run in parallel."""
    for dst, view, src, length in jobs:
        staging[dst: dst + length] = np.frombuffer(view, dtype=np.uint8, count=length, offset=src)


@contextmanager
def _gc_paused():
    """No cyclic GC while tens of thousands of small objects are built (it cost seconds at 20k tensors);
    nothing created here forms cycles that need it, and the collector resumes right after."""
    enabled = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        if enabled:
            gc.enable()


def _check_same_bytes(reports: list[messages.RankReport], tree: Any) -> None:
    """Refuse "replicated" tensors whose sampled bytes differ between ranks, naming the first one."""
    first = np.frombuffer(reports[0].samples, dtype=np.uint64)
    for report in reports[1:]:
        differ = np.flatnonzero(np.frombuffer(report.samples, dtype=np.uint64) != first)
        if len(differ):
            names = tensor_paths(tree)
            keys = ", ".join(repr(names.get(int(i), f"tensor {i}")) for i in differ[:5])
            raise SnapshotError(
                f"replicated state differs between rank 0 and rank {report.rank} in {len(differ)} tensor(s): {keys}. "
                "pyckpt writes replicated state once, from the ranks' shares, so it must be identical on every "
                "rank. If this state is meant to differ per rank (a per-rank generator, a pipeline stage), "
                "register it with per_rank=True; if it should be identical (DDP), the ranks have diverged")


_SAMPLE = 512   # bytes hashed in the middle of each replicated tensor


def _divergence_samples(views: list[memoryview]) -> bytes:
    """One xxh3-64 per replicated tensor over the _SAMPLE bytes at its middle (all of it when smaller).
    Ranks compare these at commit: state that differs between ranks (a per-rank generator, pipeline
    stages, ranks that diverged) is caught by name. One call per tensor, whatever its size: 0.1 ms for
    64 tensors, 25-50 ms for 20,000 (docs/PERFORMANCE.md). Bytes differing only outside the sample
    are not seen."""
    digests = [0] * len(views)
    for i, view in enumerate(views):
        start = (len(view) - _SAMPLE) // 2 if len(view) > _SAMPLE else 0
        digests[i] = xxh3_64_intdigest(view[start: start + _SAMPLE])
    return np.array(digests, dtype=np.uint64).tobytes()


def _record(tensor) -> TensorRecord:
    if isinstance(tensor, torch.Tensor):
        return TensorRecord(DTYPE_NAMES[tensor.dtype], list(tensor.shape), tensor.nbytes)
    return TensorRecord(f"numpy:{tensor.dtype.str}", list(tensor.shape), tensor.nbytes)
