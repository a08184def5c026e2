"""Hostile snapshots: files that would run code when unpickled, paths escaping the snapshot, huge claims.

The hostile author here rewrites the commit record to match whatever manifest they wrote, so these
cases exercise the manifest validator itself, not the record's checksum. Loads run in load_probe.py
(a subprocess with pickle disabled and, for the size cases, RLIMIT_AS capped at +512 MiB).
"""
from __future__ import annotations

import ast
import io
import os
import pickle
import shutil

import pytest
import torch

from helpers import copy_snapshot, current_dir, make_snapshots, manifest_json, rewrite_record, run_probe, write_manifest
from pyckpt.manifest import CommitRecord

pytestmark = pytest.mark.reliability
PYCKPT_DIR = os.path.join(os.path.dirname(__file__), "..", "..", "pyckpt")


@pytest.fixture(scope="module")
def base(tmp_path_factory):
    path = str(tmp_path_factory.mktemp("hostile") / "src" / "checkpoint.bin")
    make_snapshots(path, start=1, steps=2, world=2)
    return path


class _Bomb:
    def __init__(self, marker: str):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def check_all_refused(results: dict, names: list[str], expect_type: str = "IntegrityError") -> None:
    problems = [f"{n} {how}: {results[n][how]}" for n in names for how in ("restore", "verify", "cli_verify")
                if results[n][how]["kind"] != "error" or results[n][how]["type"] != expect_type]
    assert not problems, "\n".join(problems)


def test_pickle_bombs_are_refused_without_running(base, tmp_path):
    marker = str(tmp_path / "PWNED")
    bomb = pickle.dumps(_Bomb(marker))
    buffer = io.BytesIO()
    torch.save({"x": _Bomb(marker)}, buffer)   # torch's own format: a zip with a pickle inside
    torch_bomb = buffer.getvalue()
    assert not os.path.exists(marker)
    cases = []

    def case(name):
        path = copy_snapshot(base, str(tmp_path / name))
        cases.append({"name": name, "path": path})
        return path

    for label, payload in (("pickle", bomb), ("torch-save", torch_bomb)):
        with open(case(f"record-{label}"), "wb") as f:
            f.write(payload)
        write_manifest(case(f"manifest-{label}"), payload, recompute_record=True)
        for which in ("data-0.bin", "data-1.bin"):
            with open(os.path.join(current_dir(case(f"{which}-{label}")), which), "wb") as f:
                f.write(payload)
    results = run_probe(cases, str(tmp_path))
    assert not os.path.exists(marker), "a snapshot file was unpickled: the bomb ran"
    check_all_refused(results, [c["name"] for c in cases])


def test_pyckpt_never_unpickles_files():
    """No module of pyckpt imports pickle-like loaders or calls torch.load / numpy.load."""
    banned_modules = {"pickle", "cPickle", "dill", "cloudpickle", "marshal", "shelve", "joblib"}
    offenders = []
    for name in sorted(os.listdir(PYCKPT_DIR)):
        if not name.endswith(".py"):
            continue
        with open(os.path.join(PYCKPT_DIR, name)) as f:
            tree = ast.parse(f.read(), name)
        for node in ast.walk(tree):
            if isinstance(node, ast.Import):
                offenders += [f"{name}: import {a.name}" for a in node.names if a.name.split(".")[0] in banned_modules]
            elif isinstance(node, ast.ImportFrom) and (node.module or "").split(".")[0] in banned_modules:
                offenders.append(f"{name}: from {node.module} import")
            elif isinstance(node, ast.Attribute) and node.attr == "load" and isinstance(node.value, ast.Name) \
                    and node.value.id in ("torch", "np", "numpy"):
                offenders.append(f"{name}:{node.lineno}: {node.value.id}.load")
            elif isinstance(node, ast.Name) and node.id in ("eval", "exec"):
                offenders.append(f"{name}:{node.lineno}: {node.id}")
    assert not offenders, offenders


def _hostile_manifests(m: dict) -> dict:
    """name -> function(m) editing a parsed manifest into a path-escaping or memory-hungry one."""
    def files(names):
        def edit(m):
            for f, n in zip(m["files"], names):
                f["name"] = n
        return edit

    def huge_tensor(m):
        t = m["tensors"][0]
        t["dtype"], t["shape"], t["nbytes"] = "float32", [1 << 40], 4 << 40
        t["pieces"] = [{"file": 0, "offset": 0, "length": 4 << 40, "xxh3": "0" * 16}]

    def huge_files_and_tensor(m):
        m["files"][0]["size"] = 8 << 40
        huge_tensor(m)

    def many_aliases(m):
        # 20000 tensors all claiming the biggest tensor's bytes: each valid alone, 40+ GB together.
        big = max(m["tensors"], key=lambda t: t["nbytes"])
        m["tensors"] = m["tensors"] + [big] * 20000
        m["replicated"] = {"L": [{"T": i} for i in range(len(m["tensors"]))]}

    def deep_tree(m):
        node = {"V": 1}
        for _ in range(70):
            node = {"L": [node]}
        m["replicated"] = node

    def many_dims(m):
        t = m["tensors"][0]
        t["shape"] = [1] * 40 + [t["nbytes"] // 4]

    return {
        "name-dotdot": files(["../../../escape.bin", "data-1.bin"]),
        "name-absolute": files(["/etc/passwd", "data-1.bin"]),
        "name-nested": files(["data-0.bin/../data-1.bin", "data-1.bin"]),
        "name-subdir": files(["sub/data-0.bin", "data-1.bin"]),
        "name-swapped-order": files(["data-1.bin", "data-0.bin"]),
        "huge-tensor": huge_tensor,
        "huge-files-and-tensor": huge_files_and_tensor,
        "many-aliased-tensors": many_aliases,
        "deep-tree": deep_tree,
        "many-dims": many_dims,
    }


def test_path_escapes_and_huge_claims_are_refused_before_allocating(base, tmp_path):
    cases = []
    for name, edit in _hostile_manifests(manifest_json(base)).items():
        path = copy_snapshot(base, str(tmp_path / name))
        m = manifest_json(path)
        edit(m)
        write_manifest(path, m, recompute_record=True)
        cases.append({"name": name, "path": path})
    raw = {
        "json-nesting-100k": b"[" * 100_000 + b"]" * 100_000,
        "json-giant-int": b'{"format":"pyckpt-manifest","format_version":1,"world_size":' + b"9" * 100_000 + b"}",
    }
    for name, data in raw.items():
        path = copy_snapshot(base, str(tmp_path / name))
        write_manifest(path, data, recompute_record=True)
        cases.append({"name": name, "path": path})
    # The record claims a 1 GiB manifest: refused from the file's real size, nothing that big is read.
    path = copy_snapshot(base, str(tmp_path / "record-manifest-size-1GiB"))
    rewrite_record(path, edit=lambda r: setattr(r.versions[0], "manifest_size", 1 << 30))
    cases.append({"name": "record-manifest-size-1GiB", "path": path})
    results = run_probe(cases, str(tmp_path), max_extra_mb=512)
    check_all_refused(results, [c["name"] for c in cases])


def _record_with_version_name(path: str, name: str) -> None:
    record = CommitRecord.from_json(open(path, "rb").read(), path)
    record.versions[0].name = name
    with open(path, "wb") as f:
        f.write(record.to_json())   # checksum recomputed: only the name validation stands in the way


def test_symlinks_and_escaping_version_names_are_refused(base, tmp_path):
    outside = tmp_path / "outside"
    cases = []

    def case(name):
        path = copy_snapshot(base, str(tmp_path / name))
        cases.append({"name": name, "path": path})
        return path

    # Symlinks to byte-identical copies outside the snapshot: refused even though the content is right.
    for which in ("data-0.bin", "data-1.bin", "manifest.json"):
        path = case(f"symlink-{which}")
        target = os.path.join(current_dir(path), which)
        copy = str(outside / f"{which}-{len(cases)}")
        os.makedirs(outside, exist_ok=True)
        shutil.copyfile(target, copy)
        os.unlink(target)
        os.symlink(copy, target)
    path = case("symlink-version-dir")
    version = current_dir(path)
    moved = str(outside / "version-copy")
    shutil.copytree(version, moved)
    shutil.rmtree(version)
    os.symlink(moved, version)
    for label, name in (("dotdot", "../../outside"), ("absolute", "/tmp"), ("dotdot-vname", "v00000002/../..")):
        _record_with_version_name(case(f"version-name-{label}"), name)
    results = run_probe(cases, str(tmp_path))
    check_all_refused(results, [c["name"] for c in cases])
    for c in cases:
        if c["name"].startswith("symlink-"):
            assert "symlink" in results[c["name"]]["verify"]["message"], results[c["name"]]
