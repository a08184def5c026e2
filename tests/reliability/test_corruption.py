"""Every file of a real 2-rank snapshot flipped, truncated, deleted, swapped; the manifest edited.

Each case is loaded in a subprocess (load_probe.py: a segfault would fail the test, pickle is
disabled there) through both DistributedCoordinator.restore and a full Snapshot read (verify).
Both must raise IntegrityError naming the damaged file (a deleted commit record is "no snapshot":
SnapshotNotFoundError), never return wrong values, never crash the interpreter.
"""
from __future__ import annotations

import json
import os
import random
import shutil

import pytest

from helpers import (copy_snapshot, covered_ranges, current_dir, make_snapshots, manifest_json, rewrite_record,
                     run_probe, tree_refs, write_manifest)

pytestmark = pytest.mark.reliability
SEED = int(os.environ.get("PYCKPT_CORRUPT_SEED", "1234"))
FILES = ["record", "manifest.json", "data-0.bin", "data-1.bin"]


@pytest.fixture(scope="module")
def base(tmp_path_factory):
    root = tmp_path_factory.mktemp("base")
    a = str(root / "a" / "checkpoint.bin")
    b = str(root / "b" / "checkpoint.bin")
    make_snapshots(a, start=1, steps=2, world=2)       # v00000001 = step 1, v00000002 = step 2
    make_snapshots(b, start=101, steps=2, world=1)     # another job's snapshots (same version names)
    return a, b


def file_of(path: str, which: str) -> str:
    return path if which == "record" else os.path.join(current_dir(path), which)


class Cases:
    def __init__(self, base_path: str, workdir):
        self.base, self.workdir, self.cases, self.expect = base_path, workdir, [], {}
        self.restore_may_skip: set[str] = set()

    def new(self, name: str, which: str, expect: str = "IntegrityError") -> tuple[str, str]:
        """A fresh copy of the snapshot; returns (snapshot path, path of the file `which` in it)."""
        path = copy_snapshot(self.base, str(self.workdir / name))
        name = f"{self.workdir.name}/{name}"
        target = file_of(path, which)          # resolved before the damage (the record may be gone after)
        self.cases.append({"name": name, "path": path})
        self.expect[name] = (expect, target)
        return path, target

    def check(self, results: dict) -> None:
        problems = []
        for name, (expect, target) in self.expect.items():
            for how in ("restore", "verify", "cli_verify"):
                got = results[name][how]
                if got["kind"] == "ok" and got["exact"] and (
                        expect == "error-or-exact" or (how == "restore" and name in self.restore_may_skip)):
                    continue
                want_type = "IntegrityError" if expect == "error-or-exact" else expect
                if got["kind"] != "error" or got["type"] != want_type:
                    problems.append(f"{name} {how}: wanted {want_type}, got {got}")
                elif want_type == "IntegrityError" and not any(
                        os.path.abspath(got["file"] or "") == t or t in got["message"]
                        for t in (target if isinstance(target, list) else [target])):
                    # The damaged file is the error's file, or (a record/manifest mismatch: either may be
                    # the bad one) the message names it too.
                    problems.append(f"{name} {how}: error does not name the damaged {target}: {got}")
        assert len(self.expect) >= 4 and not problems, "\n".join(problems)


def flip(target: str, offset: int, rng: random.Random) -> None:
    with open(target, "r+b") as f:
        f.seek(offset)
        byte = f.read(1)[0]
        f.seek(offset)
        f.write(bytes([byte ^ rng.randrange(1, 256)]))


def build_flips(base, tmp_path):
    rng = random.Random(SEED)
    cases = Cases(base[0], tmp_path)
    for which in FILES:
        for i in range(4):
            path, target = cases.new(f"flip-{which}-{i}", which)
            size = os.path.getsize(target)
            if which.startswith("data-"):
                lo, hi, tensor = rng.choice(covered_ranges(path, int(which[5])))
                flip(target, rng.randrange(lo, hi), rng)          # inside a tensor: must be detected
                if tensor in tree_refs(manifest_json(path)["per_rank"][1]):
                    # rank 1's RNG/loss: a 1-process restore does not read it (correct values), verify must fail
                    cases.restore_may_skip.add(f"{tmp_path.name}/flip-{which}-{i}")
            else:
                flip(target, rng.randrange(size), rng)
        if which.startswith("data-"):
            # Anywhere, padding included: padding is no tensor's bytes, so "detected or exact".
            path, target = cases.new(f"flip-anywhere-{which}", which, "error-or-exact")
            flip(target, rng.randrange(os.path.getsize(target)), rng)
    return cases


def build_truncations(base, tmp_path):
    rng = random.Random(SEED + 1)
    cases = Cases(base[0], tmp_path)
    for which in FILES:
        for label in ("empty", "minus1", "random"):
            path, target = cases.new(f"truncate-{which}-{label}", which)
            size = os.path.getsize(target)
            os.truncate(target, {"empty": 0, "minus1": size - 1, "random": rng.randrange(1, size - 1)}[label])
    return cases


def build_deletions(base, tmp_path):
    cases = Cases(base[0], tmp_path)
    for which in FILES:
        # No record = no committed snapshot: the documented "not found" (restore(missing_ok=True) starts fresh).
        path, target = cases.new(f"delete-{which}", which, "SnapshotNotFoundError" if which == "record"
                                 else "IntegrityError")
        os.unlink(target)
    path, target = cases.new("delete-version-dir", "manifest.json")
    shutil.rmtree(os.path.dirname(target))
    return cases


def build_swaps(base, tmp_path):
    a, b = base
    cases = Cases(a, tmp_path)
    older = os.path.join(os.path.dirname(current_dir(a)), "v00000001")
    for which in ("manifest.json", "data-0.bin", "data-1.bin"):
        path, target = cases.new(f"swap-{which}-older-version", which)
        shutil.copyfile(os.path.join(older, which), target)
    path, target = cases.new("swap-record-other-job", "record")
    shutil.copyfile(b, target)
    path, target = cases.new("swap-data-0-with-data-1", "data-0.bin")
    shutil.copyfile(os.path.join(current_dir(path), "data-1.bin"), target)
    return cases


def _edits(m: dict, rng: random.Random):
    """(label, function editing the manifest in place). Every edit makes it inconsistent with the data."""
    big = max(range(len(m["tensors"])), key=lambda i: m["tensors"][i]["nbytes"])
    t = m["tensors"][big]
    two_d = next(i for i, x in enumerate(m["tensors"]) if len(x["shape"]) == 2)

    def set_(obj, key, value):
        return lambda: obj.__setitem__(key, value)

    p = t["pieces"][0]
    return [
        ("nbytes+1", set_(t, "nbytes", t["nbytes"] + 1)),
        ("nbytes-itemsize", set_(t, "nbytes", t["nbytes"] - 4)),
        ("piece-length-1", set_(p, "length", p["length"] - 1)),
        ("piece-offset+64", set_(p, "offset", p["offset"] + 64)),
        ("piece-offset-negative", set_(p, "offset", -64)),
        ("piece-offset-past-end", set_(p, "offset", m["files"][p["file"]]["size"])),
        ("piece-file-other", set_(p, "file", 1 - p["file"])),
        ("piece-file-out-of-range", set_(p, "file", 7)),
        ("piece-checksum", set_(p, "xxh3", "0" * 16)),
        ("dtype-other-size", set_(t, "dtype", "float64" if t["dtype"] != "float64" else "float32")),
        ("dtype-unknown", set_(t, "dtype", "object")),
        ("dtype-numpy-object", set_(t, "dtype", "numpy:O")),
        ("shape-bigger", set_(t, "shape", [x * 2 for x in t["shape"]])),
        ("shape-negative", set_(m["tensors"][two_d], "shape", [-1, m["tensors"][two_d]["shape"][1]])),
        ("shape-string", set_(t, "shape", ["7"])),
        ("file-size+1", set_(m["files"][0], "size", m["files"][0]["size"] + 1)),
        ("file-size-1", set_(m["files"][1], "size", m["files"][1]["size"] - 1)),
        ("world-size", set_(m, "world_size", 3)),
        ("tree-ref-out-of-range", set_(m, "replicated", {"T": len(m["tensors"]) + 5})),
        ("tree-unknown-kind", set_(m, "replicated", {"X": 1})),
        ("format-version", set_(m, "format_version", 99)),
    ]


def build_manifest_edits(base, tmp_path, recompute_record):
    """Stale checksum: the record catches it. Recomputed (a hostile author): the validator or the data checksums."""
    rng = random.Random(SEED + 2)
    cases = Cases(base[0], tmp_path)
    for label, _ in _edits(manifest_json(base[0]), rng):
        path, target = cases.new(f"edit-{label}", "manifest.json")
        m = manifest_json(path)
        dict(_edits(m, rng))[label]()
        write_manifest(path, m, recompute_record=recompute_record)
        if recompute_record and label.startswith("file-size"):
            # The manifest is the only witness of the size: the data file is named as not matching it.
            # (or the validator finds the manifest inconsistent with itself: a piece now ends past the file)
            cases.expect[f"{tmp_path.name}/edit-{label}"] = ("IntegrityError", [target, os.path.join(
                current_dir(path), "data-0.bin" if "+" in label else "data-1.bin")])
        if recompute_record and label in ("piece-offset+64", "piece-checksum", "piece-file-other"):
            # Consistent manifest, but the bytes it points at do not match their checksums: the data file is named.
            piece = m["tensors"][max(range(len(m["tensors"])), key=lambda i: m["tensors"][i]["nbytes"])]["pieces"][0]
            cases.expect[f"{tmp_path.name}/edit-{label}"] = ("IntegrityError",
                                            os.path.join(current_dir(path), f"data-{piece['file']}.bin"))
    return cases


def build_record_edits(base, tmp_path):
    """Commit record edited: version name, manifest size/checksum, or valid JSON with the checksum recomputed."""
    cases = Cases(base[0], tmp_path)
    edits = {
        "record-version-missing-dir": lambda r: setattr(r.versions[0], "name", "v00000042"),
        "record-manifest-size": lambda r: setattr(r.versions[0], "manifest_size", r.versions[0].manifest_size + 10),
        "record-manifest-xxh3": lambda r: setattr(r.versions[0], "manifest_xxh3", "f" * 16),
    }
    for name, edit in edits.items():
        path, _ = cases.new(name, "record")
        rewrite_record(path, edit=edit)
    path, target = cases.new("record-reformatted", "record")
    with open(target) as f:
        body = json.load(f)
    with open(target, "w") as f:
        json.dump(body, f, indent=4)       # same content, checksum still valid, not pyckpt's exact bytes
    return cases


BUILDERS = {
    "flips": build_flips,
    "truncations": build_truncations,
    "deletions": build_deletions,
    "swaps": build_swaps,
    "manifest-edits-stale-record": lambda base, tmp: build_manifest_edits(base, tmp, recompute_record=False),
    "manifest-edits-record-recomputed": lambda base, tmp: build_manifest_edits(base, tmp, recompute_record=True),
    "record-edits": build_record_edits,
}


@pytest.fixture(scope="module")
def outcomes(base, tmp_path_factory):
    """Every damaged copy of every category, loaded in one probe subprocess."""
    work = tmp_path_factory.mktemp("cases")
    batches = {}
    for category, build in BUILDERS.items():
        os.makedirs(work / category)
        batches[category] = build(base, work / category)
    results = run_probe([c for b in batches.values() for c in b.cases], str(work))
    return batches, results


@pytest.mark.parametrize("category", list(BUILDERS))
def test_damaged_snapshot_is_refused_naming_the_file(outcomes, category):
    batches, results = outcomes
    batches[category].check(results)
