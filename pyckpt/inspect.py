"""What the `pyckpt` command line needs on top of the reader: listing, verifying with progress, export.

Reading and checksum checks stay in reader.Snapshot (read_tensors); this module only walks a
snapshot's tensors one at a time so memory stays bounded by the largest tensor.
"""
from __future__ import annotations

import json
import os
import struct
from dataclasses import dataclass, field
from typing import Any, Callable, Iterator

import numpy as np
import torch

from .errors import PyckptError
from .manifest import Manifest, TensorRecord
from .reader import Snapshot
from .stores import open_store, snapshot_paths
from .tree import TORCH_DTYPES, dict_items, subscripts, tensor_chains, tensor_paths, unflatten

BATCH_BYTES = 64 << 20   # verify/export read this much at a time: memory stays bounded


# ---------------------------------------------------------------------------------------------
# Listing
# ---------------------------------------------------------------------------------------------

@dataclass
class VersionRow:
    """One version directory (committed, a stage left by a crash, or an unlisted leftover)."""

    path: str                  # the user's snapshot path
    version: str               # directory name under <path>.pyckpt/
    status: str                # current | committed | stage | orphan | broken
    complete: bool             # listed in the commit record with a valid manifest
    step: int | None = None
    epoch: int | None = None
    loss: float | None = None
    world_size: int | None = None
    bytes: int = 0
    created: float | None = None
    error: str | None = None

    def as_dict(self) -> dict:
        return dict(self.__dict__)


def list_versions(path: str) -> list[VersionRow]:
    """Every version of one snapshot path, newest first; committed ones validated. What cannot be
    read (a damaged record, a link or an unreadable directory) is a "broken" row."""
    store = open_store(path)
    rows: list[VersionRow] = []
    try:
        record = store.read_commit() if store.exists() else None
    except PyckptError as exc:
        record = None
        rows.append(VersionRow(store.path, "-", "broken", False, error=str(exc)))
    for position, ref in enumerate(record.versions if record else []):
        row = VersionRow(store.path, ref.name, "current" if position == 0 else "committed", True,
                         step=ref.step, epoch=ref.epoch, created=ref.created)
        try:
            _fill_from_manifest(row, store.read_manifest(ref))
        except PyckptError as exc:
            row.status, row.complete, row.error = "broken", False, str(exc)
        rows.append(row)
    for entry in store.uncommitted():
        row = VersionRow(store.path, entry.name, entry.status, False, created=entry.created, bytes=entry.bytes,
                         error=entry.error)
        if entry.manifest is not None:
            _fill_from_leftover(row, entry.manifest)
        rows.append(row)
    rows.sort(key=lambda r: (r.version.split(".")[0] if r.version != "-" else "~"), reverse=True)
    return rows


def _fill_from_manifest(row: VersionRow, manifest: Manifest) -> None:
    meta = manifest.meta
    row.world_size = manifest.world_size
    row.bytes = manifest.total_bytes
    row.loss = meta.get("loss") if isinstance(meta.get("loss"), (int, float)) else None
    for key in ("step", "epoch", "created"):
        if getattr(row, key) is None and isinstance(meta.get(key), (int, float)):
            setattr(row, key, meta[key])


def _fill_from_leftover(row: VersionRow, manifest: Manifest) -> None:
    """A crash between writing the manifest and publishing leaves it in the stage: show its step/epoch."""
    row.world_size = manifest.world_size
    meta = manifest.meta
    row.step = meta.get("step") if isinstance(meta.get("step"), int) else None
    row.epoch = meta.get("epoch") if isinstance(meta.get("epoch"), int) else None
    row.loss = meta.get("loss") if isinstance(meta.get("loss"), (int, float)) else None


def newest_complete_bytes(directory: str) -> int:
    """Size of the largest current snapshot under a directory (what the next one will roughly need)."""
    sizes = [0]
    if os.path.isdir(directory):
        for path in snapshot_paths(directory):
            for row in list_versions(path):
                if row.status == "current":
                    sizes.append(row.bytes)
    return max(sizes)


# ---------------------------------------------------------------------------------------------
# Tensors: names, verification with progress
# ---------------------------------------------------------------------------------------------

@dataclass
class TensorInfo:
    index: int
    name: str
    dtype: str
    shape: list[int]
    nbytes: int
    files: list[str] = field(default_factory=list)
    ranks: list[int] = field(default_factory=list)      # the ranks whose data files hold its pieces
    sharding: str = ""                                  # a sharded tensor's layout when saved
    chunks: list[dict] = field(default_factory=list)    # its boxes: offsets, sizes, the ranks that held each

    def as_dict(self) -> dict:
        return dict(self.__dict__)


def tensors(snap: Snapshot) -> list[TensorInfo]:
    names = snap.manifest.tensor_names()
    out = []
    for i, rec in enumerate(snap.manifest.tensors):
        pieces = rec.pieces if rec.chunks is None else [p for c in rec.chunks for p in c.pieces]
        ranks = sorted({p.file for p in pieces})
        files = [snap.manifest.files[r].name for r in ranks]
        chunks = [{"offsets": c.offsets, "sizes": c.sizes, "ranks": c.ranks} for c in rec.chunks or ()]
        out.append(TensorInfo(i, names.get(i, f"#{i}"), rec.dtype, list(rec.shape), rec.nbytes, files, ranks,
                              rec.placements, chunks))
    return out


def verify(snap: Snapshot, progress: Callable[[int, str], None] | None = None) -> int:
    """Read every tensor of a snapshot (one at a time) and check every checksum.

    Calls progress(bytes_done_for_this_tensor, tensor_name) after each tensor; raises
    IntegrityError naming the file and tensor on the first problem. Returns the bytes verified.
    """
    names = snap.manifest.tensor_names()
    done = 0
    for batch in batches(snap, range(len(snap.manifest.tensors))):
        snap.read_tensors(batch)  # opens every file (checks sizes), reads and checks each piece
        size = sum(snap.manifest.tensors[i].nbytes for i in batch)
        done += size
        if progress is not None:
            progress(size, names.get(batch[-1], f"#{batch[-1]}"))
    return done


def batches(snap: Snapshot, indices, limit: int = BATCH_BYTES) -> Iterator[list[int]]:
    """Group tensor indices into reads of about `limit` bytes (one big tensor is its own batch)."""
    batch: list[int] = []
    size = 0
    for index in indices:
        nbytes = snap.manifest.tensors[index].nbytes
        if batch and size + nbytes > limit:
            yield batch
            batch, size = [], 0
        batch.append(index)
        size += nbytes
    if batch:
        yield batch


# ---------------------------------------------------------------------------------------------
# Export: a single-file state dict, streamed
# ---------------------------------------------------------------------------------------------

SAFETENSORS_DTYPES = {
    "float64": "F64", "float32": "F32", "float16": "F16", "bfloat16": "BF16", "int64": "I64",
    "int32": "I32", "int16": "I16", "int8": "I8", "uint8": "U8", "bool": "BOOL", "uint16": "U16",
    "uint32": "U32", "uint64": "U64", "float8_e4m3fn": "F8_E4M3", "float8_e5m2": "F8_E5M2",
    "complex64": "C64",
}
SAFETENSORS_MAX_HEADER = 100_000_000   # safetensors refuses to load a file with a larger header


def _torch_dtype_name(record: TensorRecord) -> str | None:
    """The torch dtype name of a stored tensor (numpy arrays map to their torch equivalent)."""
    if not record.is_numpy:
        return record.dtype
    try:
        return str(torch.from_numpy(np.empty(0, dtype=np.dtype(record.dtype[6:]))).dtype).removeprefix("torch.")
    except (TypeError, ValueError):  # e.g. big-endian arrays: torch has no such dtype
        return None


def export_selection(snap: Snapshot, obj: str | None) -> Any:
    """The replicated state tree to export and the key prefix to strip: one object, or everything."""
    tree = snap.manifest.replicated
    if obj is None:
        return tree
    objects = dict_items(dict_items(tree).get("objects"))
    match = objects.get(obj)
    names = list(objects)
    if match is None:
        raise PyckptError(f"no object {obj!r} in this snapshot; objects: {', '.join(map(str, names)) or 'none'}")
    return match


def _tensor_keys(tree: Any) -> list[tuple[int, str]]:
    return sorted(((i, p) for i, p in tensor_paths(tree).items()), key=lambda item: item[0])


def _check_safetensors_keys(tree: Any, keys: list[tuple[int, str]]) -> None:
    """A safetensors file holds one tensor per name: refuse two tensors with one dotted name ('a.b'
    and a -> b), the reserved name __metadata__, and names that are not valid UTF-8, naming the keys
    (writing such a file would give one that safetensors cannot load, or loads wrong)."""
    first: dict[str, int] = {}
    for index, key in keys:
        other = first.setdefault(key, index)
        if other == index and key != "__metadata__" and key.encode("utf-8", "replace").decode() == key:
            continue
        chains = tensor_chains(tree)
        where = f"tensor {subscripts(chains[index]) or '<root>'}"
        if other != index:
            problem = f"tensors {subscripts(chains[other])} and {subscripts(chains[index])} would both be named {key!r}"
        elif key == "__metadata__":
            problem = f"{where} would be named '__metadata__', which safetensors reserves for the metadata"
        else:
            problem = f"{where} has a name that is not valid UTF-8 ({key!r})"
        raise PyckptError(f"cannot export to safetensors: {problem}; export to .pt instead (it keeps the "
                          "nesting), or rename the key in the model")


def _replace_atomically(tmp: str, out: str) -> None:
    with open(tmp, "rb+") as f:
        os.fsync(f.fileno())
    os.replace(tmp, out)


def export_safetensors(snap: Snapshot, out: str, obj: str | None = None,
                       progress: Callable[[int, str], None] | None = None) -> dict:
    """Write a .safetensors file: header first (from the manifest), then each tensor as it is read.

    Keys are the dotted paths of the tensors in the exported tree (a model's own state_dict keys when
    obj names a model). Non-tensor values (progress, optimizer hyperparameters) go to the metadata
    as JSON. Memory: one tensor at a time.
    """
    tree = export_selection(snap, obj)
    keys = _tensor_keys(tree)
    _check_safetensors_keys(tree, keys)
    header: dict[str, Any] = {}
    offset = 0
    for index, key in keys:
        record = snap.manifest.tensors[index]
        name = _torch_dtype_name(record)
        if name not in SAFETENSORS_DTYPES:
            raise PyckptError(f"tensor {key}: dtype {record.dtype} has no safetensors equivalent; "
                              "export to .pt instead")
        header[key] = {"dtype": SAFETENSORS_DTYPES[name], "shape": list(record.shape),
                       "data_offsets": [offset, offset + record.nbytes]}
        offset += record.nbytes
    # Non-tensor leaves as JSON metadata (tensors replaced by their key).
    placeholders = [None] * len(snap.manifest.tensors)
    for index, key in keys:
        placeholders[index] = f"<tensor {key}>"
    plain = unflatten(tree, placeholders, snap.manifest_where)
    header["__metadata__"] = {"format": "pt", "pyckpt_version": snap.ref.name,
                              "pyckpt_state": json.dumps(plain, default=str)}
    blob = json.dumps(header, separators=(",", ":")).encode()
    blob += b" " * (-len(blob) % 8)  # the data section starts 8-byte aligned
    if len(blob) > SAFETENSORS_MAX_HEADER:
        raise PyckptError(f"cannot export to safetensors: its header (tensor names and the non-tensor state) "
                          f"would be {len(blob)} bytes, safetensors reads at most {SAFETENSORS_MAX_HEADER}; "
                          "export to .pt instead")
    tmp = f"{out}.tmp-{os.getpid()}"
    try:
        with open(tmp, "wb") as f:
            f.write(struct.pack("<Q", len(blob)))
            f.write(blob)
            key_of = dict(keys)
            for batch in batches(snap, [i for i, _ in keys]):
                for index, value in zip(batch, snap.read_tensors(batch)):
                    f.write(memoryview(_as_bytes(value)))
                    if progress is not None:
                        progress(snap.manifest.tensors[index].nbytes, key_of[index])
        _replace_atomically(tmp, out)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise
    return {"tensors": len(keys), "bytes": offset}


def _as_bytes(value: Any) -> np.ndarray:
    if isinstance(value, torch.Tensor):
        return value.contiguous().view(-1).view(torch.uint8).numpy() if value.numel() else np.empty(0, np.uint8)
    return np.ascontiguousarray(value).view(np.uint8).reshape(-1)


def export_torch(snap: Snapshot, out: str, obj: str | None = None,
                 progress: Callable[[int, str], None] | None = None) -> dict:
    """Write a torch.save file loadable with torch.load(weights_only=True).

    torch.save needs every tensor as an object, so tensors are first streamed (read, verified) into a
    scratch file next to OUT and mapped back with np.memmap: the pages come from the page cache,
    not the heap, and the kernel can drop them. numpy arrays become tensors (weights_only loads no
    numpy). Peak extra disk: the size of the exported tensors.
    """
    tree = export_selection(snap, obj)
    keys = _tensor_keys(tree)
    scratch = f"{out}.scratch-{os.getpid()}"
    tmp = f"{out}.tmp-{os.getpid()}"
    values: list[Any] = [None] * len(snap.manifest.tensors)
    total = 0
    try:
        layout = []
        with open(scratch, "wb") as f:
            key_of = dict(keys)
            for batch in batches(snap, [i for i, _ in keys]):
                for index, value in zip(batch, snap.read_tensors(batch)):
                    data = _as_bytes(value)
                    start = f.tell()
                    f.write(memoryview(data))
                    f.write(b"\0" * (-f.tell() % 64))
                    layout.append((index, start))
                    total += data.nbytes
                    if progress is not None:
                        progress(data.nbytes, key_of[index])
        for index, start in layout:
            record = snap.manifest.tensors[index]
            dtype = TORCH_DTYPES.get(_torch_dtype_name(record) or "")
            if dtype is None:
                raise PyckptError(f"tensor #{index}: dtype {record.dtype} cannot be exported to torch")
            if record.nbytes == 0:
                values[index] = torch.empty(record.shape, dtype=dtype)
                continue
            mapped = np.memmap(scratch, dtype=np.uint8, mode="c", offset=start, shape=(record.nbytes,))
            values[index] = torch.from_numpy(mapped).view(dtype).reshape(record.shape)
        state = unflatten(tree, values, snap.manifest_where)
        torch.save(state, tmp)
        _replace_atomically(tmp, out)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise
    finally:
        values.clear()
        if os.path.exists(scratch):
            os.unlink(scratch)
    return {"tensors": len(keys), "bytes": total}


def iter_rows(path: str | os.PathLike) -> Iterator[VersionRow]:
    for snapshot_path in snapshot_paths(path):
        yield from list_versions(snapshot_path)


__all__ = ["TensorInfo", "VersionRow", "export_safetensors", "export_torch", "iter_rows",
           "list_versions", "newest_complete_bytes", "snapshot_paths", "tensors", "verify"]
