"""Shared helpers of the reliability tests: make real snapshots, copy them, edit them, probe them."""
from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys

from pyckpt.manifest import CommitRecord, checksum
from pyckpt.posix_store import PosixStore

HERE = os.path.dirname(os.path.abspath(__file__))
WORKER = os.path.join(HERE, "crash_worker.py")
PROBE = os.path.join(HERE, "load_probe.py")


def worker_env(**extra) -> dict:
    env = dict(os.environ, OMP_NUM_THREADS="1", GLOO_SOCKET_IFNAME="lo", **extra)
    env.pop("PYCKPT_TEST_CRASH_AT", None)
    env.update(extra)
    return env


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def make_snapshots(path: str, start: int, steps: int, world: int = 1, extra: tuple = (), timeout: float = 180,
                   env: dict | None = None) -> None:
    """Run a real job (world gloo ranks) that commits `steps` snapshots to path, starting at step `start`."""
    port = free_port()
    procs = [subprocess.Popen([sys.executable, WORKER, path, "--rank", str(r), "--world-size", str(world),
                               "--port", str(port), "--start", str(start), "--steps", str(steps), *extra],
                              env=env or worker_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
             for r in range(world)]
    try:
        outs = [p.communicate(timeout=timeout) for p in procs]
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
                p.wait()
    for p, (out, err) in zip(procs, outs):
        assert p.returncode == 0, f"snapshot job failed ({p.returncode}): {err[-3000:]}"


def copy_snapshot(src: str, dst_dir: str) -> str:
    """Copy record + version dirs of snapshot path src into dst_dir; returns the new path."""
    os.makedirs(dst_dir, exist_ok=True)
    dst = os.path.join(dst_dir, os.path.basename(src))
    shutil.copy2(src, dst)
    shutil.copytree(src + ".pyckpt", dst + ".pyckpt", symlinks=True)
    return dst


def current_dir(path: str) -> str:
    store = PosixStore(path)
    return store.version_dir(store.read_commit().current.name)


def manifest_json(path: str) -> dict:
    with open(os.path.join(current_dir(path), "manifest.json"), "rb") as f:
        return json.loads(f.read())


def chunk_objects(body: dict) -> dict:
    """A format_version 3 manifest body in version 2's form: each sharded tensor's "chunks" a list of
    chunk objects with their pieces, the tables gone (docs/FORMAT.md). Written apart from pyckpt's
    encoder: what the tests read and edit, and a version 2 manifest for the reader of old snapshots."""
    body = json.loads(json.dumps(body))
    chunks, pieces = body.pop("chunk_table"), body.pop("piece_table")
    chunk = cell = rank = piece = 0
    for record in body["tensors"]:
        if "chunks" not in record:
            continue
        dims, objects = len(record["shape"]), []
        for _ in range(record["chunks"]):
            holders, count = chunks["holders"][chunk], chunks["pieces"][chunk]
            objects.append({"offsets": chunks["offsets"][cell: cell + dims], "sizes": chunks["sizes"][cell: cell + dims],
                            "ranks": chunks["ranks"][rank: rank + holders],
                            "pieces": [{"file": pieces["file"][k], "offset": pieces["offset"][k],
                                        "length": pieces["length"][k], "xxh3": pieces["xxh3"][16 * k: 16 * k + 16]}
                                       for k in range(piece, piece + count)]})
            chunk, cell, rank, piece = chunk + 1, cell + dims, rank + holders, piece + count
        record["chunks"] = objects
    assert chunk == len(chunks["pieces"]) and piece == len(pieces["file"]), "the tables hold chunks no tensor names"
    body["format_version"] = 2
    return body


def chunk_tables(body: dict) -> dict:
    """The inverse of chunk_objects: version 2's chunk objects as version 3's chunk and piece tables."""
    body = json.loads(json.dumps(body))
    chunks = {"offsets": [], "sizes": [], "holders": [], "ranks": [], "pieces": []}
    pieces = {"file": [], "offset": [], "length": [], "xxh3": ""}
    for record in body["tensors"]:
        if "chunks" not in record:
            continue
        for c in record["chunks"]:
            chunks["offsets"] += c["offsets"]
            chunks["sizes"] += c["sizes"]
            chunks["holders"].append(len(c["ranks"]))
            chunks["ranks"] += c["ranks"]
            chunks["pieces"].append(len(c["pieces"]))
            for p in c["pieces"]:
                for key in ("file", "offset", "length"):
                    pieces[key].append(p[key])
                pieces["xxh3"] += p["xxh3"]
        record["chunks"] = len(record["chunks"])
    body.update(chunk_table=chunks, piece_table=pieces, format_version=3)
    return body


def write_manifest(path: str, body: dict | bytes, *, recompute_record: bool) -> None:
    """Replace the current version's manifest; with recompute_record, also fix the record (a hostile author)."""
    data = body if isinstance(body, bytes) else json.dumps(body, separators=(",", ":")).encode()
    where = os.path.join(current_dir(path), "manifest.json")
    with open(where, "wb") as f:
        f.write(data)
    if recompute_record:
        rewrite_record(path, manifest=data)


def rewrite_record(path: str, *, manifest: bytes | None = None, edit=None) -> None:
    store = PosixStore(path)
    record = store.read_commit()
    if manifest is not None:
        record.versions[0].manifest_xxh3 = checksum(manifest)
        record.versions[0].manifest_size = len(manifest)
    if edit is not None:
        edit(record)
    with open(path, "wb") as f:
        f.write(CommitRecord(record.versions).to_json())


def covered_ranges(path: str, file_index: int) -> list[tuple[int, int, int]]:
    """(start, end, tensor index) of the bytes of data-<file_index>.bin that hold tensors (the rest is padding)."""
    m = manifest_json(path)
    return sorted((p["offset"], p["offset"] + p["length"], i) for i, t in enumerate(m["tensors"])
                  for p in t["pieces"] if p["file"] == file_index and p["length"])


def tree_refs(node) -> set[int]:
    """Tensor indices a manifest state tree refers to."""
    out, todo = set(), [node]
    while todo:
        n = todo.pop()
        (kind, value), = n.items()
        if kind in ("T", "N"):
            out.add(value)
        elif kind == "D":
            todo.extend(item[1] for item in value)
        elif kind in ("L", "U"):
            todo.extend(value)
    return out


def run_probe(cases: list[dict], workdir: str, max_extra_mb: int = 0, timeout: float = 300) -> dict[str, dict]:
    """Load every case in one subprocess; a case during which the process died is reported as 'crashed'."""
    cases_file = os.path.join(workdir, "cases.json")
    with open(cases_file, "w") as f:
        json.dump(cases, f)
    cmd = [sys.executable, PROBE, cases_file] + (["--max-extra-mb", str(max_extra_mb)] if max_extra_mb else [])
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=worker_env())
    results, current = {}, None
    for line in proc.stdout.splitlines():
        if line.startswith("start "):
            current = line[len("start "):]
        elif line.startswith("{"):
            result = json.loads(line)
            results[result["name"]] = result
            current = None
    if proc.returncode != 0 or current is not None:
        raise AssertionError(f"probe process died (exit {proc.returncode}) during case {current!r}: "
                             f"{proc.stderr[-3000:]}")
    return results
