"""`pyckpt ls / inspect / verify / gc / export` on real snapshots written through the public API.

Most tests call the typer app in-process (CliRunner: same code path, exit codes and output, no
interpreter start); a few run the real console entry point in a subprocess to check exit codes and
that expected failures print one line, not a traceback.
"""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys

import pytest
import torch
from typer.testing import CliRunner

import pyckpt
from pyckpt.cli import app
from pyckpt.inspect import verify
from pyckpt.posix_store import PosixStore

from .conftest import run_cli

runner = CliRunner()


def cli(*args):
    return runner.invoke(app, [str(a) for a in args], catch_exceptions=False)


def flip_byte_in_tensor(path, tensor_name: str) -> str:
    snap = pyckpt.Snapshot.open(path)
    names = snap.manifest.tensor_names()
    index = next(i for i, n in names.items() if n == tensor_name)
    piece = snap.manifest.tensors[index].pieces[0]
    data = snap.file_path(piece.file)
    with open(data, "r+b") as f:
        f.seek(piece.offset + piece.length // 2)
        byte = f.read(1)
        f.seek(-1, os.SEEK_CUR)
        f.write(bytes([byte[0] ^ 0x01]))
    return data


# -- ls ------------------------------------------------------------------------------------

def test_ls_directory_lists_versions_with_progress_fields(snapdir):
    stage = snapdir / "checkpoint.bin.pyckpt" / "v00000009.stage-0123456789ab"
    stage.mkdir()
    (stage / "data-0.bin").write_bytes(b"x" * 100)
    result = cli("ls", snapdir, "--json")
    assert result.exit_code == 0, result.output
    rows = json.loads(result.stdout)
    committed = [r for r in rows if r["complete"]]
    assert [r["version"] for r in committed] == ["v00000003", "v00000002", "v00000001"]
    assert [r["status"] for r in committed] == ["current", "committed", "committed"]
    assert [r["step"] for r in committed] == [3, 2, 1]
    assert [r["epoch"] for r in committed] == [1, 1, 0]
    assert all(isinstance(r["loss"], float) and r["world_size"] == 1 and r["bytes"] > 0 for r in committed)
    assert committed[0]["created"] >= committed[1]["created"]
    incomplete = [r for r in rows if not r["complete"]]
    assert [(r["version"], r["status"], r["bytes"]) for r in incomplete] == [
        ("v00000009.stage-0123456789ab", "stage", 100)]
    # a crash after the manifest was written but before the publish: the stage shows its step
    crashed = snapdir / "checkpoint.bin.pyckpt" / "v00000008.stage-ba5eba11ba5e"
    shutil.copytree(snapdir / "checkpoint.bin.pyckpt" / "v00000003", crashed)
    row = next(r for r in json.loads(cli("ls", snapdir, "--json").stdout) if r["version"] == crashed.name)
    assert (row["status"], row["complete"], row["step"], row["epoch"]) == ("stage", False, 3, 1)
    human = cli("ls", snapdir)
    assert human.exit_code == 0
    assert "current" in human.stdout and "incomplete (stage)" in human.stdout and "v00000009" in human.stdout


def test_ls_snapshot_path_equals_its_directory_listing(snapdir):
    one = json.loads(cli("ls", snapdir / "checkpoint.bin", "--json").stdout)
    assert {r["path"] for r in one} == {str(snapdir / "checkpoint.bin")}
    assert len(one) == 3


def test_ls_broken_manifest_exits_1_and_names_it(snapdir):
    manifest = snapdir / "checkpoint.bin.pyckpt" / "v00000002" / "manifest.json"
    manifest.write_bytes(manifest.read_bytes().replace(b'"world_size"', b'"world_sizf"'))
    result = cli("ls", snapdir)
    assert result.exit_code == 1
    assert "broken" in result.stdout and "v00000002" in result.stdout and "manifest" in result.stdout


def test_ls_missing_path_is_a_usage_error(tmp_path):
    result = cli("ls", tmp_path / "nothing.bin")
    assert result.exit_code == 2
    assert "no such snapshot path" in result.stderr


# -- inspect -------------------------------------------------------------------------------

def test_inspect_lists_tensors_dtypes_shapes_bytes(snapdir, pristine):
    result = cli("inspect", snapdir / "checkpoint.bin", "--json")
    assert result.exit_code == 0, result.output
    info = json.loads(result.stdout)
    assert info["version"] == "v00000003" and info["meta"]["step"] == 3 and info["world_size"] == 1
    by_name = {t["name"]: t for t in info["tensors"]}
    state = pristine[1]["model"]
    for key, tensor in state.items():
        entry = by_name[f"objects.model.{key}"]
        assert entry["shape"] == list(tensor.shape)
        assert entry["dtype"] == str(tensor.dtype).removeprefix("torch.")
        assert entry["nbytes"] == tensor.numel() * tensor.element_size()
        assert entry["files"] == ["data-0.bin"]
    assert info["bytes"] == sum(f["size"] for f in info["files"])
    human = cli("inspect", snapdir / "checkpoint.bin")
    assert "objects.model.0.weight" in human.stdout and "int64" in human.stdout


def test_inspect_prints_a_long_table_as_plain_aligned_columns(snapdir, monkeypatch):
    """Over _RICH_ROWS rows (rich took 12 s for 20,000 tensors) the same cells come as plain columns."""
    framed = cli("inspect", snapdir / "checkpoint.bin").stdout
    monkeypatch.setattr(pyckpt.cli, "_RICH_ROWS", 1)
    plain = cli("inspect", snapdir / "checkpoint.bin").stdout.splitlines()
    summary = json.loads(cli("inspect", snapdir / "checkpoint.bin", "--json").stdout)
    at = next(i for i, line in enumerate(plain) if line.split()[:2] == ["#", "tensor"])
    header, rows = plain[at], plain[at + 1:]
    assert header.split() == ["#", "tensor", "dtype", "shape", "bytes", "files"] and "│" not in "".join(plain)
    assert len(rows) == len(summary["tensors"]) and framed.startswith("\n".join(plain[:at]))   # the same summary
    name_at, dtype_at = header.index("tensor"), header.index("dtype")
    for row, tensor in zip(rows, summary["tensors"]):
        assert row.split()[:3] == [str(tensor["index"]), tensor["name"], tensor["dtype"]]
        assert row[name_at:].startswith(tensor["name"]) and row[dtype_at:].startswith(tensor["dtype"])  # aligned
        assert tensor["name"] in framed


def test_inspect_older_version_and_unknown_version(snapdir):
    older = json.loads(cli("inspect", snapdir / "checkpoint.bin", "--version", "v00000001", "--json").stdout)
    assert older["meta"]["step"] == 1
    result = cli("inspect", snapdir / "checkpoint.bin", "--version", "v00000042")
    assert result.exit_code == 2
    assert "no version 'v00000042'" in result.stderr and "v00000003, v00000002, v00000001" in result.stderr
    assert cli("verify", snapdir / "checkpoint.bin", "-v", "v00000042").exit_code == 2
    assert cli("export", snapdir / "checkpoint.bin", snapdir / "x.pt", "-v", "v00000042").exit_code == 2


# -- verify --------------------------------------------------------------------------------

def test_verify_intact_snapshot_exit_0_and_counts_every_byte(snapdir):
    result = cli("verify", snapdir / "checkpoint.bin", "--all", "--json")
    assert result.exit_code == 0, result.output
    report = json.loads(result.stdout)
    assert report["ok"] and [v["version"] for v in report["versions"]] == ["v00000003", "v00000002", "v00000001"]
    snap = pyckpt.Snapshot.open(snapdir / "checkpoint.bin")
    expected = sum(t.nbytes for t in snap.manifest.tensors)
    assert report["versions"][0]["bytes"] == expected
    seen = []
    assert verify(snap, lambda n, name: seen.append(n)) == expected
    assert sum(seen) == expected  # the progress callback accounts for every byte


def test_verify_flipped_byte_exit_1_names_file_and_tensor(snapdir):
    data = flip_byte_in_tensor(snapdir / "checkpoint.bin", "objects.model.2.weight")
    result = cli("verify", snapdir / "checkpoint.bin", "--json")
    assert result.exit_code == 1
    bad = json.loads(result.stdout)["versions"][0]
    assert not bad["ok"] and bad["file"] == data and bad["tensor"] == "objects.model.2.weight"
    human = cli("verify", snapdir / "checkpoint.bin")
    assert human.exit_code == 1
    assert "CORRUPT" in human.stdout and "data-0.bin" in human.stdout and "objects.model.2.weight" in human.stdout
    # older versions are intact: verify says so for each
    older = cli("verify", snapdir / "checkpoint.bin", "-v", "v00000002", "-v", "v00000001")
    assert older.exit_code == 0, older.output


def test_verify_truncated_data_file_exit_1(snapdir):
    data = pyckpt.Snapshot.open(snapdir / "checkpoint.bin").file_path(0)
    os.truncate(data, os.path.getsize(data) - 7)
    result = cli("verify", snapdir / "checkpoint.bin")
    assert result.exit_code == 1
    assert "truncated" in result.stdout and "data-0.bin" in result.stdout


def test_verify_subprocess_exit_codes_and_no_tracebacks(snapdir, tmp_path):
    path = snapdir / "checkpoint.bin"
    ok = run_cli("verify", path, "--no-progress")
    assert ok.returncode == 0, ok.stderr
    assert "OK" in ok.stdout
    flip_byte_in_tensor(path, "objects.optimizer.state.0.exp_avg")
    bad = run_cli("verify", path)
    assert bad.returncode == 1
    assert "objects.optimizer.state.0.exp_avg" in bad.stdout and "Traceback" not in bad.stderr + bad.stdout
    missing = run_cli("verify", tmp_path / "missing.bin")
    assert missing.returncode == 2
    assert "no snapshot at" in missing.stderr and "Traceback" not in missing.stderr


def test_verify_foreign_file_and_usage(tmp_path):
    foreign = tmp_path / "foreign.bin"
    foreign.write_bytes(b"\x80\x02 a pickle, not a pyckpt commit record")
    not_ours = cli("verify", foreign)
    assert not_ours.exit_code == 1 and "not a pyckpt snapshot" in not_ours.stderr
    assert runner.invoke(app, ["verify"]).exit_code == 2


def test_console_script_is_installed():
    script = os.path.join(os.path.dirname(sys.executable), "pyckpt")
    assert os.path.exists(script), "pip install -e . should install the pyckpt console script"
    done = subprocess.run([script, "--help"], capture_output=True, text=True, timeout=60)
    assert done.returncode == 0
    for command in ("ls", "inspect", "verify", "gc", "export", "doctor", "config"):
        assert command in done.stdout


# -- gc ------------------------------------------------------------------------------------

def test_gc_keeps_newest_and_removes_stages(snapdir):
    path = snapdir / "checkpoint.bin"
    root = snapdir / "checkpoint.bin.pyckpt"
    (root / "v00000007.stage-aaaaaaaaaaaa").mkdir()
    (root / "v00000005").mkdir()  # an unlisted leftover
    dry = cli("gc", snapdir, "--keep", "1", "--dry-run", "--json")
    assert dry.exit_code == 0
    assert json.loads(dry.stdout)["paths"][0]["removed"] == [
        "v00000001", "v00000002", "v00000005", "v00000007.stage-aaaaaaaaaaaa"]
    assert len(os.listdir(root)) == 6  # dry run removed nothing (3 versions, 2 leftovers, .lock)
    result = cli("gc", path, "--keep", "1", "--json")
    assert result.exit_code == 0, result.output
    assert sorted(json.loads(result.stdout)["paths"][0]["removed"]) == [
        "v00000001", "v00000002", "v00000005", "v00000007.stage-aaaaaaaaaaaa"]
    assert sorted(e for e in os.listdir(root) if e.startswith("v")) == ["v00000003"]
    rows = json.loads(cli("ls", path, "--json").stdout)
    assert [(r["version"], r["status"]) for r in rows] == [("v00000003", "current")]
    assert cli("verify", path).exit_code == 0
    # --keep 1 again: the newest complete version is never removed
    assert cli("gc", path, "--keep", "1").exit_code == 0
    assert pyckpt.Snapshot.open(path).ref.name == "v00000003"


def test_gc_keep_2_trims_history(snapdir):
    path = snapdir / "checkpoint.bin"
    assert cli("gc", path, "--keep", "2").exit_code == 0
    assert [r["version"] for r in json.loads(cli("ls", path, "--json").stdout)] == ["v00000003", "v00000002"]


def test_gc_waits_for_no_live_writer(snapdir):
    """A writer holds the path's lock (PosixStore.locked, as the coordinator does while it writes):
    gc must not remove its stage."""
    path = snapdir / "checkpoint.bin"
    store = PosixStore(path)
    with store.locked():
        name, stage = store.begin()  # exactly what a live writer has on disk
        result = cli("gc", path, "--keep", "1")
        assert result.exit_code == 1
        assert "busy" in result.stdout and "nothing removed" in result.stdout
        assert os.path.isdir(stage)
        assert len([e for e in os.listdir(store.root) if e.startswith("v")]) == 4
    assert cli("gc", path, "--keep", "1").exit_code == 0  # the writer is gone: its stage is a leftover now
    assert not os.path.exists(stage)


def test_gc_removes_the_spare_files_kept_for_reuse(tmp_path):
    path = tmp_path / "checkpoint.bin"
    runtime = pyckpt.TrainingRuntime(capture_rng=False)
    runtime.register_model(torch.nn.Linear(64, 64))
    with pyckpt.DistributedCoordinator(pyckpt.load_config(environ={}), keep_last=1, reuse_files=True) as c:
        c.snapshot(path, runtime)
        c.snapshot(path, runtime)
    spare = tmp_path / "checkpoint.bin.pyckpt" / ".spare"
    assert os.listdir(spare) == ["data-0.bin"]          # the dropped version's file, kept for reuse
    dry = json.loads(cli("gc", path, "--keep", "1", "--dry-run", "--json").stdout)
    assert dry["paths"][0]["removed"] == [".spare"] and spare.exists()
    result = cli("gc", path, "--keep", "1", "--json")
    assert result.exit_code == 0, result.output
    assert json.loads(result.stdout)["paths"][0]["removed"] == [".spare"]
    assert not spare.exists()
    assert cli("verify", path).exit_code == 0           # the committed version kept its own links


def test_gc_keep_must_be_positive(snapdir):
    assert cli("gc", snapdir, "--keep", "0").exit_code == 2
    assert runner.invoke(app, ["gc", str(snapdir)]).exit_code == 2  # --keep is required


# -- export --------------------------------------------------------------------------------

def test_export_safetensors_model_round_trip(snapdir, pristine, tmp_path):
    from safetensors.torch import load_file

    out = tmp_path / "model.safetensors"
    result = cli("export", snapdir / "checkpoint.bin", out, "--object", "model", "--json")
    assert result.exit_code == 0, result.output
    loaded = load_file(str(out))
    expected = pristine[1]["model"]
    assert loaded.keys() == expected.keys()
    for key, value in expected.items():
        assert loaded[key].dtype == value.dtype and torch.equal(loaded[key], value)
    model = torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.ReLU(), torch.nn.Linear(16, 4))
    model.register_buffer("counts", torch.zeros(6, dtype=torch.int64))
    model.load_state_dict(loaded)  # keys are the model's own state_dict keys
    assert not [p for p in os.listdir(tmp_path) if ".tmp-" in p or ".scratch-" in p]


def test_export_safetensors_everything_with_metadata(snapdir, tmp_path):
    from safetensors import safe_open

    out = tmp_path / "all.safetensors"
    assert cli("export", snapdir / "checkpoint.bin", out).exit_code == 0
    with safe_open(str(out), framework="pt") as f:
        keys = set(f.keys())
        meta = f.metadata()
    assert "objects.model.0.weight" in keys and "objects.optimizer.state.0.exp_avg" in keys
    state = json.loads(meta["pyckpt_state"])
    assert state["progress"] == {"epoch": 1, "step": 3}
    assert state["objects"]["optimizer"]["param_groups"][0]["lr"] == 1e-3


def test_export_torch_round_trip_weights_only(snapdir, pristine, tmp_path):
    out = tmp_path / "state.pt"
    result = cli("export", snapdir / "checkpoint.bin", out)
    assert result.exit_code == 0, result.output
    loaded = torch.load(out, weights_only=True)
    reference = pyckpt.load(snapdir / "checkpoint.bin")
    assert loaded["progress"] == reference["progress"] == {"epoch": 1, "step": 3}
    for key, value in pristine[1]["model"].items():
        assert torch.equal(loaded["objects"]["model"][key], value)
    opt = loaded["objects"]["optimizer"]
    assert opt["param_groups"] == pristine[1]["optimizer"]["param_groups"]
    for index, state in pristine[1]["optimizer"]["state"].items():
        for name, value in state.items():
            assert torch.equal(opt["state"][index][name], value)
    model_only = tmp_path / "model.pth"
    assert cli("export", snapdir / "checkpoint.bin", model_only, "--object", "model").exit_code == 0
    assert torch.load(model_only, weights_only=True).keys() == pristine[1]["model"].keys()
    assert not [p for p in os.listdir(tmp_path) if ".tmp-" in p or ".scratch-" in p]


def test_export_of_corrupted_snapshot_fails_and_leaves_nothing(snapdir, tmp_path):
    flip_byte_in_tensor(snapdir / "checkpoint.bin", "objects.model.0.bias")
    for name in ("m.safetensors", "m.pt"):
        result = cli("export", snapdir / "checkpoint.bin", tmp_path / name)
        assert result.exit_code == 1
        assert "objects.model.0.bias" in result.stderr
    assert os.listdir(tmp_path) == ["snapshots"]


def test_export_usage_errors(snapdir, tmp_path):
    path = snapdir / "checkpoint.bin"
    assert cli("export", path, tmp_path / "state.bin").exit_code == 2            # format unknown
    assert cli("export", path, tmp_path / "x", "--format", "onnx").exit_code == 2
    existing = tmp_path / "exists.pt"
    existing.write_bytes(b"keep me")
    result = cli("export", path, existing)
    assert result.exit_code == 2 and "--force" in result.stderr
    assert existing.read_bytes() == b"keep me"
    assert cli("export", path, existing, "--force").exit_code == 0
    missing_object = cli("export", path, tmp_path / "o.pt", "--object", "scheduler")
    assert missing_object.exit_code == 1 and "objects: model, optimizer" in missing_object.stderr


BIG_TENSORS, BIG_MIB = 8, 32


def test_export_safetensors_streams_with_bounded_memory(tmp_path):
    """256 MiB of tensors exported with peak RSS well below their size (one batch of <= 64 MiB at a time).

    The snapshot is written by one subprocess; the export runs in a fresh one, and its peak RSS is
    compared with a baseline process that imports the same modules and opens the snapshot."""
    path = tmp_path / "big.bin"
    writer = f"""
import torch
from pyckpt import DistributedCoordinator, TrainingRuntime, load_config
class Blob:
    def __init__(self): self.t = {{f"t{{i}}": torch.full(({BIG_MIB} << 18,), float(i)) for i in range({BIG_TENSORS})}}
    def state_dict(self): return self.t
    def load_state_dict(self, s): pass
rt = TrainingRuntime(capture_rng=False); rt.register("blob", Blob())
DistributedCoordinator(load_config(environ={{}}, config_dir={str(tmp_path)!r})).snapshot({str(path)!r}, rt)
"""
    subprocess.run([sys.executable, "-c", writer], check=True, timeout=300)
    measure = """
import resource, sys
import torch, safetensors, pyckpt.cli, pyckpt.inspect
from pyckpt.reader import Snapshot
snap = Snapshot.open(sys.argv[1])
if sys.argv[2] != "-":
    from pyckpt.inspect import export_safetensors
    export_safetensors(snap, sys.argv[2], "blob")
print(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024)
"""
    out = tmp_path / "big.safetensors"
    base = int(subprocess.run([sys.executable, "-c", measure, str(path), "-"], check=True, capture_output=True,
                              text=True, timeout=300).stdout)
    peak = int(subprocess.run([sys.executable, "-c", measure, str(path), str(out)], check=True,
                              capture_output=True, text=True, timeout=300).stdout)
    total = BIG_TENSORS * BIG_MIB << 20
    assert os.path.getsize(out) > total
    assert peak - base < 96 << 20, f"export grew RSS by {(peak - base) >> 20} MiB for {total >> 20} MiB of tensors"
    from safetensors import safe_open

    with safe_open(str(out), framework="pt") as f:
        assert float(f.get_tensor("t5")[123]) == 5.0


def test_config_validate_keeps_its_contract(tmp_path):
    """The Ansible cluster_config role calls `pyckpt config validate --file F`: 0 valid, 1 invalid."""
    good = tmp_path / "distributed.single.env"
    good.write_text("DISTRIBUTED_MODE=single\nWORLD_SIZE=1\nBACKEND=gloo\n")
    assert run_cli("config", "validate", "--file", good).returncode == 0
    bad = tmp_path / "bad.env"
    bad.write_text("DISTRIBUTED_MODE=single\nMASTER_PORT=http\n")
    done = run_cli("config", "validate", "--file", bad)
    assert done.returncode == 1 and "MASTER_PORT" in done.stderr and "Traceback" not in done.stderr


def test_config_validate_does_not_import_torch(tmp_path):
    """Ansible runs it on every node: importing torch would add over a second to each call."""
    good = tmp_path / "distributed.single.env"
    good.write_text("DISTRIBUTED_MODE=single\nWORLD_SIZE=1\nBACKEND=gloo\n")
    done = subprocess.run([sys.executable, "-X", "importtime", "-m", "pyckpt.cli", "config", "validate", "--file",
                           str(good)], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-2000:]
    imported = {line.rsplit("|", 1)[-1].strip() for line in done.stderr.splitlines() if line.startswith("import time:")}
    assert "pyckpt.config" in imported
    assert "torch" not in imported


@pytest.fixture(autouse=True)
def _no_leftover_copies(tmp_path):
    yield
    shutil.rmtree(tmp_path, ignore_errors=True)


def test_human_output_prints_paths_literally(snapdir, tmp_path):
    """Paths and messages are data: rich must not read "[red]" in a directory name as markup."""
    odd = tmp_path / "[red]runs"
    shutil.copytree(snapdir, odd)
    listing = cli("ls", odd)
    assert listing.exit_code == 0 and f"snapshots in {odd}" in listing.stdout
    checked = cli("verify", odd / "checkpoint.bin")
    assert checked.exit_code == 0 and str(odd / "checkpoint.bin") in checked.stdout
