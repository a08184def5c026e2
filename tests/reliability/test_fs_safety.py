"""Filesystem safety of the snapshot store (issue 20 items 2, 5, 7, 9, 11, 12, 13): symlinks, FIFOs and
other entries pyckpt did not make, paths that are not snapshot paths, permissions, gc's lock, a full
disk at the commit record and readers racing the writer's pruning. Real files, links, FIFOs,
processes and flocks; operations that could hang run in a subprocess with a timeout."""
from __future__ import annotations

import json
import os
import re
import shutil
import socket
import stat
import subprocess
import sys
import time

import pytest
from typer.testing import CliRunner

from crash_harness import leftovers, verify
from helpers import WORKER, worker_env
from pyckpt import PyckptError, SnapshotError, SnapshotLockedError
from pyckpt import posix_store
from pyckpt.cli import app
from pyckpt.posix_store import PosixStore
from test_concurrency_disk import Job, small_tmpfs

pytestmark = pytest.mark.reliability


def two_versions(path: str) -> Job:
    job = Job(16 << 10)
    job.snapshot(path, 1)
    job.snapshot(path, 2)
    return job


def probe(code: str, *args: str, timeout: float = 120, privileged: bool = True) -> dict:
    """Run `code` in a fresh interpreter (argv: args); it prints one JSON line, returned here. A hang
    is a failure. privileged=False: without root's power to read anything (setpriv drops it)."""
    cmd = [sys.executable, "-c", code, *args]
    if not privileged and os.geteuid() == 0:
        if shutil.which("setpriv") is None:
            pytest.skip("running as root without setpriv: a chmod 000 file stays readable")
        cmd = ["setpriv", "--bounding-set", "-all", "--inh-caps", "-all", *cmd]
    try:
        done = subprocess.run(cmd, env=worker_env(), capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired:
        pytest.fail(f"hung for {timeout} s (a FIFO or a lock waited on forever)")
    assert done.returncode == 0, done.stderr[-3000:]
    return json.loads(done.stdout.strip().splitlines()[-1])


# -- item 2: symlinks are never followed for deleting, creating or opening for writing -----------

LINKED = [".spare", ".lock", "v00000009", "record-tmp", "record"]


@pytest.mark.parametrize("entry", LINKED)
def test_a_symlink_in_the_snapshot_dir_is_refused_by_snapshot_and_gc_and_left_alone(tmp_path, entry):
    path = str(tmp_path / "checkpoint.bin")
    root = path + ".pyckpt"
    job = two_versions(path)
    victim_dir = tmp_path / "victim"
    victim_dir.mkdir()
    (victim_dir / "keep.txt").write_text("keep")
    victim_file = tmp_path / "victim.txt"
    victim_file.write_text("keep")
    lock_target = tmp_path / "made-through-the-lock"
    other = str(tmp_path / "other" / "checkpoint.bin")
    Job(16 << 10).snapshot(other, 7)
    link, target = {
        ".spare": (os.path.join(root, ".spare"), victim_dir),
        ".lock": (os.path.join(root, ".lock"), lock_target),
        "v00000009": (os.path.join(root, "v00000009"), victim_dir),
        "record-tmp": (path + ".tmp-0123456789ab", victim_file),
        "record": (path, other),
    }[entry]
    if os.path.lexists(link):
        os.replace(link, str(tmp_path / "moved-away"))
    os.symlink(target, link)
    before = sorted(os.listdir(root))
    refused = re.escape(link) + ": is a symlink"
    with pytest.raises(PyckptError, match=refused):
        job.snapshot(path, 3)
    with pytest.raises(PyckptError, match=refused):
        PosixStore(path).gc(1, spares=True)
    assert os.readlink(link) == str(target)
    assert (victim_dir / "keep.txt").read_text() == "keep" and victim_file.read_text() == "keep"
    assert not lock_target.exists()
    assert verify(other) == 7
    assert sorted(os.listdir(root)) == before
    if entry != "record":
        assert verify(path) == 2


def test_gc_of_a_directory_refuses_a_symlinked_snapshot_dir_and_cleans_the_others(tmp_path):
    real = str(tmp_path / "a.bin")
    two_versions(real)
    os.symlink(real + ".pyckpt", str(tmp_path / "b.bin.pyckpt"))   # b's versions "are" a's
    result = CliRunner().invoke(app, ["gc", str(tmp_path), "--keep", "2", "--json"], catch_exceptions=False)
    assert result.exit_code == 1, result.output
    report = {os.path.basename(p["path"]): p for p in json.loads(result.stdout)["paths"]}
    assert "b.bin.pyckpt: is a symlink" in report["b.bin"]["error"] and report["b.bin"]["removed"] == []
    assert report["a.bin"]["error"] is None
    assert sorted(e for e in os.listdir(real + ".pyckpt") if e.startswith("v")) == ["v00000001", "v00000002"]
    assert verify(real) == 2
    listing = CliRunner().invoke(app, ["ls", str(tmp_path), "--json"], catch_exceptions=False)
    broken = [r for r in json.loads(listing.stdout) if r["status"] == "broken"]
    assert listing.exit_code == 1 and len(broken) == 1 and "b.bin.pyckpt: is a symlink" in broken[0]["error"]


# -- item 7 (and 12): FIFOs and devices are never opened for reading ------------------------------

FIFO_PROBE = r"""
import json, sys
import torch
import pyckpt
from pyckpt.inspect import list_versions, verify
from pyckpt.posix_store import PosixStore

def snapshot(path):
    runtime = pyckpt.TrainingRuntime(capture_rng=False)
    runtime.register_model(torch.nn.Linear(4, 4))
    config = pyckpt.load_config(environ={}, cuda_available=lambda: False)
    with pyckpt.DistributedCoordinator(config) as coordinator:
        coordinator.snapshot(path, runtime)

ops = {"load": pyckpt.load, "verify": lambda p: verify(pyckpt.Snapshot.open(p)),
       "ls": lambda p: [row.error for row in list_versions(p) if row.error],
       "gc": lambda p: PosixStore(p).gc(1, spares=True), "snapshot": snapshot}
out = {}
for path in sys.argv[1:]:
    for name, op in ops.items():
        try:
            out[f"{path} {name}"] = {"ok": True, "value": repr(op(path))[:500]}
        except Exception as exc:
            out[f"{path} {name}"] = {"ok": False, "type": type(exc).__name__, "pyckpt": isinstance(exc, pyckpt.PyckptError),
                                     "message": str(exc)}
print(json.dumps(out))
"""


def test_a_fifo_anywhere_in_a_snapshot_is_refused_by_every_command_without_blocking(tmp_path):
    base = str(tmp_path / "base" / "checkpoint.bin")
    two_versions(base)
    cases = {}
    for which in ("record", "manifest", "data", "stage-manifest", "lock"):
        path = str(tmp_path / which / "checkpoint.bin")
        shutil.copytree(os.path.dirname(base), os.path.dirname(path))
        current = os.path.join(path + ".pyckpt", "v00000002")
        stage = os.path.join(path + ".pyckpt", "v00000003.stage-0123456789ab")
        os.mkdir(stage)
        fifo = {"record": path, "manifest": os.path.join(current, "manifest.json"),
                "data": os.path.join(current, "data-0.bin"), "stage-manifest": os.path.join(stage, "manifest.json"),
                "lock": os.path.join(path + ".pyckpt", ".lock")}[which]
        if os.path.exists(fifo):
            os.unlink(fifo)
        os.mkfifo(fifo)
        cases[which] = (path, fifo)
    results = probe(FIFO_PROBE, *(path for path, _ in cases.values()))
    # who must refuse the FIFO (naming it); every other command must finish, with a pyckpt error at most
    refusing = {"record": ["load", "verify", "ls", "gc", "snapshot"], "manifest": ["load", "verify", "ls"],
                "data": ["load", "verify"], "stage-manifest": [], "lock": ["gc", "snapshot"]}
    for which, (path, fifo) in cases.items():
        for op in ("load", "verify", "ls", "gc", "snapshot"):
            got = results[f"{path} {op}"]
            where = f"{which} {op}: {got}"
            assert got["ok"] or got["pyckpt"], where
            if op in refusing[which]:
                text = got["value"] if got["ok"] else got["message"]   # ls reports it in a broken row
                assert f"{fifo}: is a FIFO" in text, where
            elif op != "snapshot":
                assert got["ok"], where
        if which != "stage-manifest":   # a leftover stage is removed with what is in it
            assert stat.S_ISFIFO(os.lstat(fifo).st_mode), f"{which}: the FIFO must be left alone"


LS_MEMORY_PROBE = r"""
import json, resource, sys
from pyckpt.inspect import list_versions
before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
rows = list_versions(sys.argv[1])
grown = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before
print(json.dumps({"grown_kib": grown, "rows": [[r.version, r.status, r.step] for r in rows]}))
"""


def test_ls_reads_nothing_big_or_endless_from_a_stage(tmp_path):
    path = str(tmp_path / "checkpoint.bin")
    two_versions(path)
    root = path + ".pyckpt"
    endless = os.path.join(root, "v00000003.stage-0123456789ab")
    huge = os.path.join(root, "v00000004.stage-0123456789ab")
    os.mkdir(endless)
    os.symlink("/dev/zero", os.path.join(endless, "manifest.json"))
    os.mkdir(huge)
    with open(os.path.join(huge, "manifest.json"), "wb") as f:
        f.truncate(400 << 20)   # sparse: 400 MiB to read, nothing on disk
    got = probe(LS_MEMORY_PROBE, path)
    assert ["v00000003.stage-0123456789ab", "stage", None] in got["rows"]
    assert ["v00000004.stage-0123456789ab", "stage", None] in got["rows"]
    assert got["grown_kib"] < 64 << 10, f"ls grew by {got['grown_kib']} KiB reading leftover manifests"


# -- item 5: paths that are not snapshot paths ---------------------------------------------------

def test_a_directory_at_the_record_path_stops_snapshots_and_deletes_nothing(tmp_path):
    path = str(tmp_path / "checkpoint.bin")
    job = two_versions(path)
    os.unlink(path)
    os.mkdir(path)
    before = sorted(os.listdir(path + ".pyckpt"))
    with pytest.raises(PyckptError, match=re.escape(path) + ": is a directory"):
        job.snapshot(path, 3)
    assert sorted(os.listdir(path + ".pyckpt")) == before   # v1 and v2 kept, no orphan v3
    with pytest.raises(PyckptError, match="is a directory"):
        PosixStore(path).gc(1)
    assert sorted(os.listdir(path + ".pyckpt")) == before


def test_a_stray_v99999999_does_not_push_version_names_past_8_digits(tmp_path):
    path = str(tmp_path / "checkpoint.bin")
    job = two_versions(path)
    os.mkdir(os.path.join(path + ".pyckpt", "v99999999"))
    assert job.snapshot(path, 3).version == "v00000003"
    assert verify(path) == 3
    assert job.snapshot(path, 4).version == "v00000004" and verify(path) == 4


def test_a_committed_v99999999_ends_the_path_with_a_clear_error(tmp_path):
    path = str(tmp_path / "checkpoint.bin")
    job = Job(16 << 10)
    job.snapshot(path, 1)
    store = PosixStore(path)
    record = store.read_commit()
    os.rename(store.version_dir("v00000001"), store.version_dir("v99999999"))
    record.versions[0].name = "v99999999"
    with open(path, "wb") as f:
        f.write(record.to_json())
    with pytest.raises(SnapshotError, match="version numbers are used up"):
        job.snapshot(path, 2)
    assert verify(path) == 1


@pytest.mark.parametrize("bad", ["", "/", "snapshots/", "snapshots/."])
def test_paths_that_name_no_file_are_refused_before_anything_is_made(tmp_path, monkeypatch, bad):
    work = tmp_path / "work"
    (work / "snapshots").mkdir(parents=True)
    monkeypatch.chdir(work)
    with pytest.raises(PyckptError, match="cannot be a snapshot path"):
        PosixStore(bad)
    if bad != "/":   # "/" is only constructed: an old pyckpt would make /.pyckpt
        with pytest.raises(PyckptError, match="cannot be a snapshot path"):
            Job(1024).snapshot(bad, 1)
    assert sorted(os.listdir(tmp_path)) == ["work"] and os.listdir(work) == ["snapshots"]
    assert os.listdir(work / "snapshots") == []


# -- item 9: gc's lock is waited for; the lock says who holds it ----------------------------------

HOLD_PROBE = r"""
import shutil, sys, time
from pyckpt.posix_store import PosixStore
path, what, seconds = sys.argv[1], sys.argv[2], float(sys.argv[3])
if what == "gc":   # a real gc whose deleting takes a while (a big version on NFS)
    real = shutil.rmtree
    def slow(*args, **kwargs):
        print("holding", flush=True)
        time.sleep(seconds)
        return real(*args, **kwargs)
    shutil.rmtree = slow
    PosixStore(path).gc(1)
else:
    with PosixStore(path).locked():
        print("holding", flush=True)
        time.sleep(seconds)
print('{"done": true}', flush=True)
"""


def hold_lock(path: str, what: str, seconds: float) -> subprocess.Popen:
    """A process that holds path's lock: a real gc removing a stage slowly, or a snapshot."""
    if what == "gc":
        os.mkdir(os.path.join(path + ".pyckpt", "v00000099.stage-0123456789ab"))
    proc = subprocess.Popen([sys.executable, "-c", HOLD_PROBE, path, what, str(seconds)], env=worker_env(),
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    assert proc.stdout.readline().strip() == "holding", proc.stderr.read()
    return proc


def test_a_snapshot_waits_for_a_short_gc_instead_of_failing(tmp_path):
    path = str(tmp_path / "checkpoint.bin")
    job = two_versions(path)
    holder = hold_lock(path, "gc", 1.5)
    try:
        start = time.monotonic()
        assert job.snapshot(path, 3).step == 3
        assert time.monotonic() - start >= 1.0, "the snapshot must have waited for gc's lock"
    finally:
        holder.communicate(timeout=60)
    assert holder.returncode == 0 and verify(path) == 3


@pytest.mark.parametrize("what", ["gc", "snapshot"])
def test_the_lock_error_says_who_holds_it(tmp_path, monkeypatch, what):
    path = str(tmp_path / "checkpoint.bin")
    job = two_versions(path)
    monkeypatch.setattr(posix_store, "LOCK_WAIT", 1.0, raising=False)   # raising=False: an old pyckpt has none
    holder = hold_lock(path, what, 30)
    try:
        start = time.monotonic()
        with pytest.raises(SnapshotLockedError) as caught:
            job.snapshot(path, 3)
        waited = time.monotonic() - start
    finally:
        holder.kill()
        holder.communicate()
    message = str(caught.value)
    assert f"pid {holder.pid} on host {socket.gethostname()} ({what} since " in message, message
    if what == "gc":
        assert waited >= 1.0 and "try again once it has finished" in message
    else:   # another job writing: no waiting
        assert waited < 1.0 and "two jobs must not share one snapshot path" in message
    assert verify(path) == 2


# -- item 11: permissions give a pyckpt error naming the path ------------------------------------

PERMISSION_PROBE = r"""
import json, sys
import pyckpt
from pyckpt.inspect import list_versions
from pyckpt.posix_store import PosixStore
out = {}
for name, op in {"load": pyckpt.load, "gc": lambda p: PosixStore(p).gc(1),
                 "ls": lambda p: [r.error for r in list_versions(p) if r.error]}.items():
    try:
        out[name] = {"ok": True, "value": repr(op(sys.argv[1]))}
    except Exception as exc:
        out[name] = {"ok": False, "type": type(exc).__name__, "message": str(exc)}
print(json.dumps(out))
"""


@pytest.mark.parametrize("unreadable", ["record", "snapshot dir"])
def test_an_unreadable_record_or_snapshot_dir_gives_a_pyckpt_error_naming_it(tmp_path, unreadable):
    path = str(tmp_path / "checkpoint.bin")
    two_versions(path)
    target = path if unreadable == "record" else path + ".pyckpt"
    os.chmod(target, 0)
    try:
        got = probe(PERMISSION_PROBE, path, privileged=False)
    finally:
        os.chmod(target, 0o755)
    for op in ("load", "gc"):
        assert got[op]["type"] == "SnapshotAccessError", (op, got[op])
        assert got[op]["message"].startswith(f"{target}") and "permission" in got[op]["message"], got[op]
    assert got["ls"]["ok"] and f"{target}" in got["ls"]["value"], got["ls"]
    assert verify(path) == 2


# -- item 13: gc --dry-run decides as gc; a failed record write leaves nothing; readers and pruning --

def test_gc_dry_run_refuses_a_corrupt_record_exactly_as_gc_does(tmp_path):
    path = str(tmp_path / "checkpoint.bin")
    two_versions(path)
    with open(path, "r+b") as f:
        f.seek(40)
        byte = f.read(1)
        f.seek(40)
        f.write(bytes([byte[0] ^ 0x55]))
    before = sorted(os.listdir(path + ".pyckpt"))
    for dry in (["--dry-run"], []):
        result = CliRunner().invoke(app, ["gc", path, "--keep", "1", "--json", *dry], catch_exceptions=False)
        entry = json.loads(result.stdout)["paths"][0]
        assert result.exit_code == 1 and entry["removed"] == [] and path in entry["error"], (dry, result.output)
    assert sorted(os.listdir(path + ".pyckpt")) == before


def test_a_full_disk_while_writing_the_record_leaves_no_orphan_version():
    """Free space swept page by page from too little for the data file (18 pages) to enough for all:
    the last failure is the record tmp (its own page, written last), the ones before it the manifest
    and the data file. After each failure nothing is left behind, without a gc."""
    outcomes = []
    with small_tmpfs("8m") as disk:
        path = os.path.join(disk, "snapshots", "checkpoint.bin")
        job = Job(64 << 10, keep_last=1)
        step = 1
        job.snapshot(path, step)
        filler = os.path.join(disk, "filler")
        for pages in range(12, 30):
            vfs = os.statvfs(disk)
            with open(filler, "wb") as f:
                f.write(b"\0" * max(0, vfs.f_bavail * vfs.f_frsize - pages * 4096))
            try:
                job.snapshot(path, step + 1)
                step += 1
                outcomes.append("committed")
            except SnapshotError as exc:
                outcomes.append("failed")
                assert not leftovers(path), f"{pages} pages free: {leftovers(path)} left after {exc}"
            assert verify(path) == step
            os.unlink(filler)
    assert outcomes[0] == "failed" and outcomes[-1] == "committed", outcomes


READER_PROBE = r"""
import json, sys, time
import pyckpt
path, seconds = sys.argv[1], float(sys.argv[2])
errors, reads, versions = [], 0, set()
end = time.monotonic() + seconds   # or sooner, once enough versions were read (a loaded machine is slow)
while time.monotonic() < end and not (reads > 50 and len(versions) > 10):
    try:
        snap = pyckpt.Snapshot.open(path)
        snap.replicated()
        versions.add(snap.ref.name)
        reads += 1
    except pyckpt.SnapshotNotFoundError:
        time.sleep(0.01)
    except Exception as exc:
        errors.append(f"{type(exc).__name__}: {exc}")
print(json.dumps({"reads": reads, "versions": len(versions), "errors": errors[:5], "failed": len(errors)}))
"""


def test_readers_never_see_files_vanish_while_the_writer_prunes_with_keep_last_1(tmp_path):
    path = str(tmp_path / "checkpoint.bin")
    writer = subprocess.Popen([sys.executable, WORKER, path, "--start", "1", "--steps", "100000", "--keep-last", "1",
                               "--size", "4096"], env=worker_env(), stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, text=True)
    try:
        assert writer.stdout.readline().strip() == "ready"
        got = probe(READER_PROBE, path, "90", timeout=150)
    finally:
        writer.kill()
        writer.communicate()
    assert got["failed"] == 0, got
    assert got["reads"] > 50 and got["versions"] > 10, got
