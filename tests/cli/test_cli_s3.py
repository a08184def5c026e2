"""`pyckpt ls / inspect / verify / gc / export` on s3:// paths (the CLI app in-process, CliRunner).

Server: moto's standalone S3 server (tests/s3server.py), an emulator over real HTTP (not atomic
conditional writes, no faults); the snapshots are written through the public API."""
from __future__ import annotations

import json

import pytest
import torch
from typer.testing import CliRunner

import pyckpt
from pyckpt.cli import app
from pyckpt.s3_store import S3Store, client
from tests.s3server import new_bucket

from .conftest import write_snapshots

runner = CliRunner()


def cli(*args):
    return runner.invoke(app, [str(a) for a in args], catch_exceptions=False)


@pytest.fixture
def snapshot(tmp_path) -> tuple[str, dict]:
    url = f"s3://{new_bucket()}/snapshots/checkpoint.bin"
    return url, write_snapshots(url, steps=3, config_dir=tmp_path)


def test_ls_lists_the_versions_of_a_url_and_of_its_prefix(snapshot):
    url, _ = snapshot
    rows = json.loads(cli("ls", url, "--json").stdout)
    assert [(r["path"], r["status"], r["step"]) for r in rows] == \
        [(url, "current", 3), (url, "committed", 2), (url, "committed", 1)]
    prefix = url.rsplit("/", 1)[0]
    for listing in (prefix, prefix + "/"):
        assert json.loads(cli("ls", listing, "--json").stdout) == rows
    table = cli("ls", prefix)
    assert table.exit_code == 0 and f"snapshots in {prefix}" in table.stdout and "checkpoint.bin" in table.stdout
    missing = cli("ls", prefix + "/nothing.bin")
    assert missing.exit_code == 2 and "no such snapshot path" in missing.stderr


def test_inspect_and_export_read_from_s3(snapshot, tmp_path):
    url, state = snapshot
    summary = json.loads(cli("inspect", url, "--json").stdout)
    assert summary["path"] == url and summary["meta"]["step"] == 3
    out = tmp_path / "model.pt"
    assert cli("export", url, out, "--object", "model", "--no-progress").exit_code == 0
    exported = torch.load(out, weights_only=True)
    assert all(torch.equal(exported[k], v) for k, v in state["model"].items())


def test_verify_passes_then_names_the_flipped_object_and_tensor(snapshot):
    url, _ = snapshot
    result = cli("verify", url, "--all", "--json", "--no-progress")
    assert result.exit_code == 0 and [v["ok"] for v in json.loads(result.stdout)["versions"]] == [True] * 3
    snap = pyckpt.Snapshot.open(url)
    name, index = next((n, i) for i, n in snap.manifest.tensor_names().items() if n.endswith("0.weight"))
    piece = snap.manifest.tensors[index].pieces[0]
    store, key = S3Store(url), snap.file_path(piece.file)[len(f"s3://{S3Store(url).bucket}/"):]
    data = bytearray(client().get_object(Bucket=store.bucket, Key=key)["Body"].read())
    data[piece.offset + piece.length // 2] ^= 0xFF
    client().put_object(Bucket=store.bucket, Key=key, Body=bytes(data))
    bad = cli("verify", url, "--json", "--no-progress")
    report = json.loads(bad.stdout)["versions"][0]
    assert bad.exit_code == 1 and report["file"] == snap.file_path(piece.file) and report["tensor"] == name


def test_gc_trims_versions_and_removes_a_crashed_writers_stage(snapshot):
    url, _ = snapshot
    store = S3Store(url)
    with store.locked():
        stage = store.begin()               # a writer that dies before publishing
    assert [r["status"] for r in json.loads(cli("ls", url, "--json").stdout)][0] == "stage"
    dry = json.loads(cli("gc", url, "--keep", "1", "--dry-run", "--json").stdout)["paths"][0]
    assert dry["removed"] == ["v00000001", "v00000002", stage.name]
    assert len(json.loads(cli("ls", url, "--json").stdout)) == 4
    result = cli("gc", url, "--keep", "1")
    assert result.exit_code == 0 and "removed v00000001, v00000002, v00000004" in result.stdout
    rows = json.loads(cli("ls", url, "--json").stdout)
    assert [(r["version"], r["status"]) for r in rows] == [("v00000003", "current")]
    assert pyckpt.load(url)["progress"]["step"] == 3
