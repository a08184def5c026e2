"""DistributedCoordinator: what a training script calls. It joins the process group and runs a
snapshot (capture.py, then the commit protocol of commit.py, in the background if asked) or a
restore (restore.py) on every rank, finishes a snapshot in flight at exit or on SIGTERM, and deletes
the versions a new snapshot drops (on a helper thread)."""
from __future__ import annotations

import atexit
import logging
import os
import signal
import sys
import threading
import time
from concurrent.futures import Future
from dataclasses import dataclass
from datetime import timedelta
from typing import Any

import torch
import torch.distributed as dist

from . import messages
from .capture import CaptureCache, Captured, PlanCache, capture, stage
from .collectives import Comm, process_space
from .commit import KeptTable, commit_snapshot
from .config import Config, load_config
from .errors import DistributedInitError, PyckptError, SnapshotLockedError
from .restore import Neighbours, restore_snapshot
from .runtime import TrainingRuntime
from .storage import Store
from .stores import open_store
from .sysio import gc_paused
from .testhooks import crash_point

log = logging.getLogger("pyckpt")
DEFAULT_KEEP_LAST = 2


@dataclass(frozen=True)
class SnapshotInfo:
    path: str
    version: str
    step: int
    bytes_written: int      # by this rank
    seconds: float          # until durable and committed


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
        self._comm = Comm()
        self._owns_group = False
        self._initialized = False
        self._pending: _SnapshotFuture | None = None
        self._exit_hooked = False
        self._pruning: threading.Thread | None = None
        self._staging = torch.empty(0, dtype=torch.uint8)
        self._plans = PlanCache()
        self._captures = CaptureCache()
        self._kept_table = KeptTable()
        self._previous_sigterm: Any = None
        self._neighbours = Neighbours([0], False)

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
        else:
            self._join(cfg)
        if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
            # Our own gloo group: snapshot traffic never interleaves with training collectives,
            # and object collectives work even when the training backend is nccl.
            group = dist.new_group(backend="gloo")
            self._comm = Comm(group, dist.get_rank(), dist.get_world_size())
            # Ranks that can read each other's memory split the reading of replicated state at
            # restore (peers.py).
            spaces = self._comm.all_gather(process_space())
            self._neighbours = Neighbours([r for r, space in enumerate(spaces) if space == spaces[self.rank]],
                                          len(set(spaces)) < len(spaces))
        if self._owns_group or self._comm.group is not None:
            atexit.register(self._release_groups)
        self._initialized = True
        return self

    def _join(self, cfg: Config) -> None:
        if cfg.backend == "nccl":
            torch.cuda.set_device(cfg.local_rank)
        if cfg.world_size == 1:
            # A one-rank group, so that the script's DDP(model) and collectives work at every world
            # size (the spec's example). Its store lives in this process: no port, no network.
            dist.init_process_group(cfg.backend, store=dist.HashStore(), rank=0, world_size=1)
            self._owns_group = True
            return
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
        self._comm = Comm()

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

        What a snapshot derives from the runtime's tensors is kept for the next one while they stay the
        same (capture.CaptureCache): a tensor the runtime stops holding stays in memory until the
        runtime's next snapshot, or until the runtime itself is dropped.
        """
        self.initialize()
        self._wait_pending()  # not the previous clean-up: the write waits for that, off the training thread
        keep = keep_last or self.keep_last
        start = time.perf_counter()
        with gc_paused(), torch.no_grad():   # (no_grad: once, not per DTensor in shards.local_tensor)
            try:
                captured = capture(runtime, self.rank, self.world_size, self._plans, self._captures)
                if not blocking:
                    self._staging = stage(captured, self._staging)
            except Exception as exc:
                if self.world_size == 1:
                    raise
                captured = Captured.failed(exc)  # the other ranks learn of it in the protocol, not by a hang
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

    def _write(self, path: str, cap: Captured, keep_last: int, start: float) -> SnapshotInfo:
        self._wait_pruning()  # the disk never holds more versions than during one write
        store = open_store(path)
        name, written = commit_snapshot(self._comm, store, cap, keep_last, self.reuse_files, self._plans,
                                        self._kept_table)
        if self.is_leader:
            self._prune_in_background(store, keep_last)
        return SnapshotInfo(path, name, cap.meta["step"], written, time.perf_counter() - start)

    def _prune_in_background(self, store: Store, keep_last: int) -> None:
        """Delete the versions the new record dropped on a helper thread, after the snapshot is
        committed (deleting 1.5 GiB costs ~0.2 s on ext4 with discard, more on NFS): training goes
        on meanwhile; the next snapshot or restore, wait() and shutdown() wait for it."""
        def prune() -> None:
            try:
                store.gc(keep_last)
            except SnapshotLockedError:
                pass        # another writer holds the path: its begin() removes unlisted versions
            except (PyckptError, OSError) as exc:   # e.g. an entry gc refuses to touch: the next snapshot says so
                log.warning("could not delete old versions of %s: %s (the next snapshot retries)", store.path, exc)
            crash_point("pruned")

        self._pruning = threading.Thread(target=prune, name="pyckpt-prune", daemon=False)
        self._pruning.start()

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
        return restore_snapshot(self._comm, self._neighbours, str(path), runtime, strict=strict,
                                missing_ok=missing_ok, version=version)
