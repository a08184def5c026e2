"""Read a committed snapshot back: validated manifest, preadv into fresh tensors, every byte verified."""
from __future__ import annotations

import os
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any, Iterable

import numpy as np
import torch

from .errors import IntegrityError
from .manifest import TORCH_DTYPES, Manifest, TensorRecord, VersionRef, checksum, unflatten
from .storage import SnapshotStore

_READ_THREADS = 4


@dataclass
class Snapshot:
    """One committed version, opened for reading."""

    store: SnapshotStore
    ref: VersionRef
    manifest: Manifest

    @classmethod
    def open(cls, path: str | os.PathLike, version: str | None = None) -> "Snapshot":
        store = SnapshotStore(path)
        record = store.read_commit()
        ref = record.current
        if version is not None:
            matches = [v for v in record.versions if v.name == version]
            if not matches:
                names = ", ".join(v.name for v in record.versions)
                raise IntegrityError(f"{store.path}: no version {version!r}; committed versions: {names}",
                                     file=store.path)
            ref = matches[0]
        return cls(store, ref, store.read_manifest(ref))

    @property
    def directory(self) -> str:
        return self.store.version_dir(self.ref.name)

    @property
    def meta(self) -> dict:
        return self.manifest.meta

    def file_path(self, index: int) -> str:
        return os.path.join(self.directory, self.manifest.files[index].name)

    def read_tree(self, tree: Any, indices: Iterable[int] | None = None) -> Any:
        """Materialise a state tree of this snapshot with CPU tensors, verifying every checksum."""
        wanted = sorted(set(_referenced(tree))) if indices is None else sorted(set(indices))
        tensors: list[Any] = [None] * len(self.manifest.tensors)
        for index, value in zip(wanted, self.read_tensors(wanted)):
            tensors[index] = value
        return unflatten(tree, tensors, os.path.join(self.directory, "manifest.json"))

    def replicated(self) -> Any:
        return self.read_tree(self.manifest.replicated)

    def private(self, rank: int) -> Any:
        return self.read_tree(self.manifest.per_rank[rank])

    def read_tensors(self, indices: list[int]) -> list[torch.Tensor | np.ndarray]:
        where = os.path.join(self.directory, "manifest.json")
        if any(not 0 <= i < len(self.manifest.tensors) for i in indices):
            raise IntegrityError(f"{where}: state tree references a tensor that does not exist", file=where)
        records = [self.manifest.tensors[i] for i in indices]
        names = self.manifest.tensor_names()
        fds = self._open_files()  # checks every file's real size before any memory is allocated
        try:
            buffers = [torch.empty(r.nbytes, dtype=torch.uint8) for r in records]
            jobs = [(fds[p.file], p, buf, name, start)
                    for rec, buf, name in zip(records, buffers, (names.get(i, f"#{i}") for i in indices))
                    for p, start in _piece_starts(rec)]
            if len(jobs) > 1:
                with ThreadPoolExecutor(_READ_THREADS) as pool:
                    list(pool.map(lambda job: self._read_piece(*job), jobs))
            else:
                for job in jobs:
                    self._read_piece(*job)
        finally:
            for fd in fds.values():
                os.close(fd)
        return [_as_value(rec, buf) for rec, buf in zip(records, buffers)]

    def _open_files(self) -> dict[int, int]:
        fds: dict[int, int] = {}
        try:
            for index, record in enumerate(self.manifest.files):
                path = self.file_path(index)
                try:
                    fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW)
                except FileNotFoundError:
                    raise IntegrityError(f"{path}: data file missing", file=path) from None
                except OSError as exc:
                    raise IntegrityError(f"{path}: cannot open data file ({exc.strerror}); a symlink or "
                                         "unreadable file is not allowed in a snapshot", file=path) from None
                fds[index] = fd
                size = os.fstat(fd).st_size
                if size != record.size:
                    raise IntegrityError(f"{path}: {size} bytes on disk, manifest says {record.size} "
                                         "(truncated or replaced)", file=path)
        except BaseException:
            for fd in fds.values():
                os.close(fd)
            raise
        return fds

    def _read_piece(self, fd, piece, buf: torch.Tensor, name: str, start: int) -> None:
        view = memoryview(buf.numpy())[start: start + piece.length]
        done = 0
        while done < piece.length:
            got = os.preadv(fd, [view[done:]], piece.offset + done)
            if got == 0:
                path = self.file_path(piece.file)
                raise IntegrityError(f"{path}: ends early while reading tensor {name}", file=path, tensor=name)
            done += got
        if checksum(view) != piece.xxh3:
            path = self.file_path(piece.file)
            raise IntegrityError(
                f"{path}: checksum mismatch in tensor {name} (bytes {piece.offset}-{piece.offset + piece.length}); "
                "the snapshot is corrupted: restore an older version or take a new snapshot",
                file=path, tensor=name,
            )


def _piece_starts(record: TensorRecord):
    start = 0
    for piece in record.pieces:
        yield piece, start
        start += piece.length


def _as_value(record: TensorRecord, buf: torch.Tensor):
    if record.is_numpy:
        return buf.numpy().view(np.dtype(record.dtype[len("numpy:"):])).reshape(record.shape)
    dtype = TORCH_DTYPES[record.dtype]
    if record.nbytes == 0:
        return torch.empty(record.shape, dtype=dtype)
    return buf.view(dtype).reshape(record.shape)


def _referenced(node: Any):
    if isinstance(node, dict) and len(node) == 1:
        (kind, value), = node.items()
        if kind in ("T", "N") and isinstance(value, int):
            yield value
        elif kind == "D" and isinstance(value, list):
            for item in value:
                if isinstance(item, list) and len(item) == 2:
                    yield from _referenced(item[1])
        elif kind in ("L", "U") and isinstance(value, list):
            for item in value:
                yield from _referenced(item)


def load(path: str | os.PathLike, *, version: str | None = None) -> dict:
    """Load a snapshot's state in a plain process (no process group): for evaluation or export.

    Returns {"progress": {...}, "kinds": {...}, "objects": {name: state_dict},
             "per_rank": [{"loss": ..., "rng": {...}} for each rank that saved it]}.
    """
    snap = Snapshot.open(path, version)
    state = snap.replicated()
    state["per_rank"] = [snap.private(rank) for rank in range(snap.manifest.world_size)]
    return state
