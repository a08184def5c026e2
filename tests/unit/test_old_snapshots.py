"""Snapshots written by pyckpt before sharded state (commit 223ad33, format_version 1, no chunks) still
restore, verify and inspect with today's code; and today's code still writes format_version 1 when a
snapshot has no sharded tensor, so that an older pyckpt reads it.

tests/data/pre-sharding/ was written by make_snapshot.py there, run with the 223ad33 code on the path;
expected.json holds the xxh3 of every tensor it saved (the oracle)."""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import torch
from typer.testing import CliRunner
from xxhash import xxh3_64_hexdigest

import pyckpt
from pyckpt import DistributedCoordinator, TrainingRuntime, load_config
from pyckpt.cli import app

DATA = Path(__file__).resolve().parents[1] / "data" / "pre-sharding"


def _digest(tensor: torch.Tensor) -> str:
    tensor = tensor.detach().contiguous()
    return f"{tensor.dtype}{tuple(tensor.shape)}:" + xxh3_64_hexdigest(tensor.view(-1).view(torch.uint8).numpy())


def _fresh():
    torch.manual_seed(123)      # other values than the saved ones: a restore that does nothing fails
    model = torch.nn.Linear(5, 3)
    optimizer = torch.optim.AdamW(model.parameters(), lr=0.01)
    scheduler = torch.optim.lr_scheduler.StepLR(optimizer, step_size=1, gamma=0.5)
    runtime = TrainingRuntime(capture_rng=False)
    runtime.register_model(model)
    runtime.register_optimizer(optimizer)
    runtime.register("scheduler", scheduler)
    return model, optimizer, scheduler, runtime


def _digests(model, optimizer) -> dict:
    out = {f"model.{k}": _digest(v) for k, v in model.state_dict().items()}
    for pid, entry in optimizer.state_dict()["state"].items():
        out.update({f"optimizer.{pid}.{k}": _digest(v) for k, v in entry.items()})
    return out


def _copy(tmp_path: Path) -> Path:
    shutil.copy(DATA / "checkpoint.bin", tmp_path)
    shutil.copytree(DATA / "checkpoint.bin.pyckpt", tmp_path / "checkpoint.bin.pyckpt")
    return tmp_path / "checkpoint.bin"


def test_a_pre_sharding_snapshot_restores_exactly_into_a_fresh_runtime(tmp_path):
    """Proves: the v1 manifest (pieces, no chunks) is read by today's reader and fitted into a model,
    an AdamW that never stepped and an LR scheduler, every tensor bit-exact to the saved one."""
    expected = json.loads((DATA / "expected.json").read_text())
    path = _copy(tmp_path)
    assert pyckpt.Snapshot.open(str(path)).manifest.format_version == 1
    model, optimizer, scheduler, runtime = _fresh()
    assert _digests(model, optimizer)["model.weight"] != expected["model.weight"]
    with DistributedCoordinator(load_config(environ={})) as coordinator:
        coordinator.restore(str(path), runtime)
    got = _digests(model, optimizer)
    assert got == {k: v for k, v in expected.items() if k in got} and len(got) == 8
    assert scheduler.state_dict()["last_epoch"] == expected["scheduler.last_epoch"] and runtime.step == 1
    state = pyckpt.load(str(path))      # a plain process
    assert {f"model.{k}": _digest(v) for k, v in state["objects"]["model"].items()} == \
        {k: v for k, v in expected.items() if k.startswith("model.")}


def test_verify_and_inspect_accept_a_pre_sharding_snapshot(tmp_path):
    """Proves: `pyckpt verify` checks every byte of the old snapshot (exit 0) and `inspect` lists its
    tensors with their plain (unsharded) layout."""
    path = _copy(tmp_path)
    runner = CliRunner()
    verified = runner.invoke(app, ["verify", str(path), "--json"], catch_exceptions=False)
    assert verified.exit_code == 0, verified.output
    assert json.loads(verified.stdout)["ok"] is True
    inspected = runner.invoke(app, ["inspect", str(path), "--json"], catch_exceptions=False)
    assert inspected.exit_code == 0, inspected.output
    info = json.loads(inspected.stdout)
    assert info["format_version"] == 1 and info["world_size"] == 1
    assert {t["name"]: t["shape"] for t in info["tensors"]}["objects.model.weight"] == [3, 5]


def test_a_snapshot_without_sharded_tensors_is_still_written_as_format_version_1(tmp_path):
    """Proves: today's writer keeps the v1 format (readable by pyckpt before sharded state, which
    refuses any other version) unless a snapshot holds chunked tensors."""
    model, optimizer, _, runtime = _fresh()
    model(torch.randn(2, 5)).sum().backward()
    optimizer.step()
    path = tmp_path / "checkpoint.bin"
    with DistributedCoordinator(load_config(environ={})) as coordinator:
        coordinator.snapshot(str(path), runtime)
    snap = pyckpt.Snapshot.open(str(path))
    assert snap.manifest.format_version == 1
    raw = json.loads(Path(snap.file_path(0)).with_name("manifest.json").read_text())
    assert raw["format_version"] == 1 and all("chunks" not in t for t in raw["tensors"])
