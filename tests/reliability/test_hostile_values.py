"""Hostile but correctly checksummed snapshot content, and what the command line prints about it.

A hostile author (or a bug elsewhere) can write any JSON into the manifest and the commit record and
fix the checksums to match. Every field read from disk must then be refused with IntegrityError
naming the file, never reach other code as a value of the wrong type, size or range; the commands
print data literally (never as rich markup) and turn anything unexpected into one line and an exit
code. The writer refuses at snapshot time what the reader would refuse, so a snapshot that was
written can always be read back.
"""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import tempfile
import tracemalloc
from contextlib import contextmanager

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from typer.testing import CliRunner

import pyckpt
from helpers import copy_snapshot, current_dir, manifest_json, worker_env, write_manifest
from pyckpt import DistributedCoordinator, IntegrityError, PyckptError, TrainingRuntime, load_config
from pyckpt.cli import app
from pyckpt.manifest import Manifest, checksum

pytestmark = pytest.mark.reliability
runner = CliRunner()
EXIT_BUG = 3    # pyckpt.cli.EXIT_BUG: the exit code of a bug in pyckpt


class Holder:
    """A registered object whose state is a plain dict."""

    def __init__(self, state: dict):
        self.state = state

    def state_dict(self) -> dict:
        return self.state

    def load_state_dict(self, loaded: dict) -> None:
        self.state = loaded


def rich_state() -> dict:
    """Every node kind the format has: tensors, a numpy array, a dtype, plain values, tuples, int keys."""
    return {"w": torch.arange(12, dtype=torch.float32).reshape(3, 4), "ids": np.arange(5, dtype=np.int64),
            "dtype": torch.bfloat16, "lr": 0.1, "name": "run", "flag": True, "none": None,
            "pair": (1, torch.ones(2, dtype=torch.int64)), "groups": {0: {"params": [0, 1]}, 1: []}}


def snapshot(path: str, state: dict, steps: int = 1, loss: float | None = None) -> None:
    runtime = TrainingRuntime(capture_rng=False)
    runtime.register("holder", Holder(state))
    config = load_config(environ={}, config_dir=os.path.dirname(path), cuda_available=lambda: False)
    with DistributedCoordinator(config) as coordinator:
        for step in range(1, steps + 1):
            runtime.set_step(step)
            runtime.set_epoch(step // 2)
            runtime.set_loss(0.5 / step if loss is None else loss)
            coordinator.snapshot(path, runtime)


@pytest.fixture(scope="module")
def base(tmp_path_factory) -> str:
    path = str(tmp_path_factory.mktemp("hostile-values") / "src" / "checkpoint.bin")
    os.makedirs(os.path.dirname(path))
    snapshot(path, rich_state(), steps=2)
    return path


def edit_manifest(path: str, edit) -> str:
    """Apply edit(body) to the current manifest and fix the record to match (a hostile author)."""
    body = manifest_json(path)
    edit(body)
    write_manifest(path, body, recompute_record=True)
    return os.path.join(current_dir(path), "manifest.json")


def write_record_body(path: str, body: dict) -> None:
    """Write a commit record with any body, checksummed and laid out exactly as pyckpt writes one."""
    text = json.dumps(body, sort_keys=True, separators=(",", ":"))
    with open(path, "wb") as f:
        f.write(json.dumps({"body": body, "xxh3": checksum(text.encode())}, sort_keys=True, indent=1).encode())


def record_body(path: str) -> dict:
    with open(path, "rb") as f:
        return json.loads(f.read())["body"]


def cli(*args: str):
    """The command in-process: an exception other than the command's own exit is a traceback."""
    result = runner.invoke(app, [str(a) for a in args])
    assert result.exception is None or isinstance(result.exception, SystemExit), \
        f"pyckpt {' '.join(map(str, args))} raised {result.exception!r}\n{result.output}"
    assert result.exit_code != EXIT_BUG, f"pyckpt {' '.join(map(str, args))}: {result.output}"
    return result


def tree_node(body: dict, *keys):
    """The replicated tree node at objects -> holder -> keys..."""
    node = body["replicated"]
    for key in ("objects", "holder") + keys:
        node = dict(node["D"])[key]
    return node


# ---------------------------------------------------------------------------------------------
# Hostile tree nodes and meta fields: IntegrityError naming the manifest, everywhere
# ---------------------------------------------------------------------------------------------

def _set_tree(key, node):
    def edit(body):
        for item in tree_node(body)["D"]:
            if item[0] == key:
                item[1] = node
    return edit


def _set_meta(key, value):
    def edit(body):
        body["meta"][key] = value
    return edit


def _numpy_as_torch(body):
    # The numpy array's record referenced as a torch tensor ("T" instead of "N").
    node = tree_node(body, "ids")
    node["T"] = node.pop("N")


HOSTILE_MANIFESTS = {
    "dtype-list": _set_tree("dtype", {"dtype": []}),
    "dtype-object": _set_tree("dtype", {"dtype": {"a": 1}}),
    "dtype-unknown": _set_tree("dtype", {"dtype": "complex32"}),
    "value-list": _set_tree("lr", {"V": [1, 2]}),
    "value-object": _set_tree("lr", {"V": {"x": 1}}),
    "numpy-as-torch": _numpy_as_torch,
    "format-version-true": lambda body: body.update(format_version=True),
    "meta-created-string": _set_meta("created", "yesterday"),
    "meta-created-nan": _set_meta("created", float("nan")),
    "meta-created-huge": _set_meta("created", 1e300),
    "meta-created-negative": _set_meta("created", -86400.0),
    "meta-step-float": _set_meta("step", 1.5),
    "meta-loss-string": _set_meta("loss", "low"),
    "meta-host-list": _set_meta("host", ["a"]),
    "meta-torch-long": _set_meta("torch", "2" * 5000),
    "meta-extra-nested": _set_meta("extra", [[1]]),
}


@pytest.mark.parametrize("case", sorted(HOSTILE_MANIFESTS))
def test_hostile_manifest_fields_are_integrity_errors(base, tmp_path, case):
    path = copy_snapshot(base, str(tmp_path / "snap"))
    where = edit_manifest(path, HOSTILE_MANIFESTS[case])
    with pytest.raises(IntegrityError) as caught:
        pyckpt.load(path)
    assert caught.value.file == where
    for args in (("inspect", path), ("verify", path, "--no-progress"),
                 ("export", path, tmp_path / "out.safetensors", "--no-progress")):
        result = cli(*args)
        assert result.exit_code == 1 and "manifest.json" in result.output, (args, result.output)
    listing = cli("ls", path, "--json")
    assert listing.exit_code == 1
    rows = json.loads(listing.stdout)
    assert rows[0]["status"] == "broken" and "manifest.json" in rows[0]["error"]
    assert not os.path.exists(tmp_path / "out.safetensors")


@pytest.mark.parametrize("created", [float("nan"), float("inf"), 1e300, -1.0])
def test_hostile_record_times_are_integrity_errors(base, tmp_path, created):
    """The record's own copy of the time (what `ls` shows first) is checked like every other field."""
    path = copy_snapshot(base, str(tmp_path / "snap"))
    body = record_body(path)
    body["versions"][0]["created"] = created
    write_record_body(path, body)
    with pytest.raises(IntegrityError) as caught:
        pyckpt.load(path)
    assert caught.value.file == path and "created" in str(caught.value)
    listing = cli("ls", os.path.dirname(path))
    assert listing.exit_code == 1 and "broken" in listing.output and "created" in listing.output


@pytest.mark.parametrize("host,shown_as", [
    ("[bold red]node[/bold red] [link=file:///etc/passwd]x[/link]", None),
    ("node\ud800x", "node\\ud800x"),       # valid JSON, not UTF-8: shown escaped
])
def test_inspect_and_ls_print_data_literally(base, tmp_path, host, shown_as):
    """Markup or a lone surrogate in a host name, a stage from the year 2400: printed as they are."""
    path = copy_snapshot(base, str(tmp_path / "snap"))
    edit_manifest(path, _set_meta("host", host))
    shown = cli("inspect", path)
    # rich wraps long lines at spaces: compare without whitespace (the tmp path's length varies)
    assert shown.exit_code == 0 and "".join((shown_as or host).split()) in "".join(shown.stdout.split()), shown.stdout
    stage = os.path.join(path + ".pyckpt", "v00000009.stage-0123456789ab")
    os.mkdir(stage)
    os.utime(stage, (13582598400, 13582598400))   # 2400-06-01 (ext4 stores up to 2446)
    listing = cli("ls", path)
    assert listing.exit_code == 0 and "2400-0" in listing.stdout and "v00000009" in listing.stdout


def test_json_output_is_strict_json_with_a_diverged_loss(tmp_path):
    """A NaN loss is a real state (a diverged run): shown as nan, and as null in --json (jq, Ansible)."""
    path = str(tmp_path / "checkpoint.bin")
    snapshot(path, {"w": torch.ones(2)}, loss=float("nan"))

    def strict(text):
        return json.loads(text, parse_constant=lambda constant: pytest.fail(f"{constant} in --json output"))

    assert [row["loss"] for row in strict(cli("ls", path, "--json").stdout)] == [None]
    assert strict(cli("inspect", path, "--json").stdout)["meta"]["loss"] is None
    assert "nan" in cli("ls", path).stdout and "loss nan" in cli("inspect", path).stdout


# ---------------------------------------------------------------------------------------------
# The writer refuses what the reader would refuse (nothing is left behind)
# ---------------------------------------------------------------------------------------------

def _nested(depth: int):
    node: dict = {"leaf": 1}
    for _ in range(depth):
        node = {"x": node}
    return node


REFUSED_AT_SNAPSHOT = {   # name -> (the value, the error snapshot() raises)
    "int-over-4300-digits": (lambda: 10 ** 5000, TypeError),
    "int-key-over-4300-digits": (lambda: {10 ** 5000: 1}, TypeError),
    "nested-70-deep": (lambda: _nested(70), TypeError),
    "longdouble-scalar": (lambda: np.longdouble(1) / 3, TypeError),
    "unsupported-dtype-value": (lambda: torch.complex32, TypeError),
    "mostly-empty-lists": (lambda: [[] for _ in range(200_000)], pyckpt.SnapshotError),
}


@pytest.mark.parametrize("case", sorted(REFUSED_AT_SNAPSHOT))
def test_snapshot_refuses_what_a_restore_would_refuse(tmp_path, case):
    make, expected = REFUSED_AT_SNAPSHOT[case]
    value = make()
    path = str(tmp_path / "checkpoint.bin")
    snapshot(path, {"ok": torch.ones(3)})
    before = sorted(os.listdir(path + ".pyckpt"))
    with pytest.raises(expected) as caught:
        snapshot(path, {"ok": torch.ones(3), "bad": value})
    assert "['bad']" in str(caught.value) or expected is pyckpt.SnapshotError, str(caught.value)[:300]
    assert sorted(os.listdir(path + ".pyckpt")) == before     # no stage, no orphan left
    restored = pyckpt.load(path)["objects"]["holder"]
    assert list(restored) == ["ok"] and torch.equal(restored["ok"], torch.ones(3))


# ---------------------------------------------------------------------------------------------
# Memory of loading a manifest is bounded by its size
# ---------------------------------------------------------------------------------------------

def test_manifest_padded_with_empty_nodes_is_refused_before_decoding(base, tmp_path):
    # pyckpt's own densest encodings (dicts of plain values by int key, lists of small ints) still read back.
    dense = str(tmp_path / "dense" / "checkpoint.bin")
    os.makedirs(os.path.dirname(dense))
    state = {"by_id": {i: 0 for i in range(50_000)}, "ids": list(range(50_000)), "few_empty": [[], {}, ()]}
    snapshot(dense, state)
    assert pyckpt.load(dense)["objects"]["holder"] == state
    path = copy_snapshot(base, str(tmp_path / "snap"))
    where = edit_manifest(path, _set_tree("name", {"L": [{"L": []}] * 1_000_000}))
    data = open(where, "rb").read()
    tracemalloc.start()
    try:
        with pytest.raises(IntegrityError) as caught:
            Manifest.from_json(data, where)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert caught.value.file == where and "JSON objects/lists" in str(caught.value)
    assert peak < 2 * len(data), f"refusing {len(data)} bytes took {peak} bytes"    # nothing was decoded
    with pytest.raises(IntegrityError):
        pyckpt.load(path)


# ---------------------------------------------------------------------------------------------
# safetensors export: names that a safetensors file cannot hold apart
# ---------------------------------------------------------------------------------------------

@pytest.mark.parametrize("state,named", [
    ({"a.b": torch.ones(2), "a": {"b": torch.zeros(2)}}, ["['a.b']", "['a']['b']"]),
    ({1: torch.ones(2), "1": torch.zeros(2)}, ["[1]", "['1']"]),
    ({"__metadata__": torch.ones(2)}, ["['__metadata__']", "reserves"]),
])
def test_safetensors_export_refuses_colliding_names(tmp_path, state, named):
    path = str(tmp_path / "checkpoint.bin")
    snapshot(path, state)
    out = tmp_path / "out.safetensors"
    result = cli("export", path, out, "--object", "holder", "--no-progress")
    assert result.exit_code == 1 and all(n in result.output for n in named) and ".pt" in result.output, result.output
    assert sorted(os.listdir(tmp_path)) == ["checkpoint.bin", "checkpoint.bin.pyckpt"]   # no file, no tmp
    # The torch format keeps the nesting: the same snapshot exports there, every tensor apart.
    pt = tmp_path / "out.pt"
    assert cli("export", path, pt, "--object", "holder", "--no-progress").exit_code == 0
    loaded = torch.load(pt, weights_only=True)
    assert json.dumps(loaded, default=lambda t: t.tolist(), sort_keys=False) == \
        json.dumps(state, default=lambda t: t.tolist(), sort_keys=False)


# ---------------------------------------------------------------------------------------------
# A bug is one line and exit 3, a traceback only on request
# ---------------------------------------------------------------------------------------------

BUGGY_CLI = """
import sys
import pyckpt.inspect
def broken(snap):
    raise ZeroDivisionError("boom in tensors")
pyckpt.inspect.tensors = broken
from pyckpt.cli import main
sys.argv = ["pyckpt", "inspect", sys.argv[1]]
main()
"""


def test_cli_reports_a_bug_in_one_line_and_traceback_on_request(base):
    plain = subprocess.run([sys.executable, "-c", BUGGY_CLI, base], capture_output=True, text=True, timeout=120,
                           env=worker_env())
    assert plain.returncode == EXIT_BUG, plain.stderr
    assert "Traceback" not in plain.stderr and len(plain.stderr.strip().splitlines()) == 1, plain.stderr
    assert base in plain.stderr and "internal error" in plain.stderr and "ZeroDivisionError: boom in tensors" \
        in plain.stderr and "PYCKPT_DEBUG=1" in plain.stderr, plain.stderr
    debug = subprocess.run([sys.executable, "-c", BUGGY_CLI, base], capture_output=True, text=True, timeout=120,
                           env=worker_env(PYCKPT_DEBUG="1"))
    assert debug.returncode != 0 and "Traceback" in debug.stderr and "ZeroDivisionError" in debug.stderr


# ---------------------------------------------------------------------------------------------
# Fuzz: any JSON value anywhere in the manifest or the record, checksums fixed
# ---------------------------------------------------------------------------------------------

def _paths(node, prefix=(), leaves=False):
    """Every place in a JSON document where a value can be replaced (with leaves=True: plain values only)."""
    if not leaves or not isinstance(node, (dict, list)):
        yield prefix
    if isinstance(node, dict):
        for key, value in node.items():
            yield from _paths(value, prefix + (key,), leaves)
    elif isinstance(node, list):
        for i, value in enumerate(node):
            yield from _paths(value, prefix + (i,), leaves)


def _replace(doc, path, value):
    if not path:
        return value
    parent = doc
    for key in path[:-1]:
        parent = parent[key]
    parent[path[-1]] = value
    return doc


ODD_VALUES = [None, True, False, 0, -1, 1, 2 ** 63, -(2 ** 64), 10 ** 4000, 1.5, float("nan"), float("inf"),
              -float("inf"), 1e300, -1e-300, "", "[red]x[/]", "v00000001", "data-0.bin", "../x", "float32",
              "numpy:<f4", "numpy:O", "0" * 16, [], {}, [[]], {"": None}, {"V": 1}, {"L": []}, {"D": [[1, 2]]},
              {"T": 0}, {"N": 0}, {"dtype": "float32"}, [0, 1], [1] * 40, "\ud800"]
_scalars = st.one_of(st.integers(), st.floats(), st.text(max_size=8))
json_values = st.one_of(st.sampled_from(ODD_VALUES), st.sampled_from(ODD_VALUES), _scalars, st.recursive(
    _scalars, lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=6), inner, max_size=3),
    max_leaves=6))


@contextmanager
def deadline(seconds: int, what: str):
    def hung(signum, frame):
        raise AssertionError(f"{what} did not finish within {seconds} s")
    previous = signal.signal(signal.SIGALRM, hung)
    signal.alarm(seconds)
    try:
        yield
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, previous)


_FUZZ: dict = {}


@pytest.fixture(scope="module")
def fuzz_base(base):
    manifest, record = manifest_json(base), record_body(base)
    leaves = list(_paths(manifest, leaves=True))
    # Each region as likely as the others: plain values of the record, of what the commands show and
    # of the state trees, and any place at all (whole objects and lists replaced).
    _FUZZ.update(path=base, manifest=manifest, record=record, places={
        "record": [("record", p) for p in _paths(record, leaves=True)],
        "meta": [("manifest", p) for p in leaves if p[:1] == ("meta",)],
        "tree": [("manifest", p) for p in leaves if p[:1] in (("replicated",), ("per_rank",))],
        "anywhere": [("manifest", p) for p in _paths(manifest)] + [("record", p) for p in _paths(record)]})
    return _FUZZ


@pytest.mark.timeout(900)
@settings(max_examples=int(os.environ.get("PYCKPT_FUZZ_EXAMPLES", "100")), deadline=None, derandomize=True,
          suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])
@given(data=st.data())
def test_fuzz_checksummed_manifest_and_record(fuzz_base, data):
    with tempfile.TemporaryDirectory() as tmp:
        path = copy_snapshot(fuzz_base["path"], os.path.join(tmp, "snap"))
        manifest = json.loads(json.dumps(fuzz_base["manifest"]))
        record = json.loads(json.dumps(fuzz_base["record"]))
        for _ in range(data.draw(st.integers(1, 3), label="edits")):
            region = data.draw(st.sampled_from(sorted(fuzz_base["places"])), label="region")
            doc, where = data.draw(st.sampled_from(fuzz_base["places"][region]), label="where")
            value = data.draw(json_values, label="value")
            try:
                if doc == "record":
                    record = _replace(record, where, value)
                else:
                    manifest = _replace(manifest, where, value)
            except (KeyError, IndexError, TypeError):   # an earlier edit removed that place
                pass
        try:
            encoded = json.dumps(manifest, separators=(",", ":")).encode("utf-8", "surrogatepass")
        except ValueError:    # e.g. an int too long for json itself: not a file anyone can write
            return
        with open(os.path.join(current_dir(path), "manifest.json"), "wb") as f:
            f.write(encoded)
        if isinstance(record, dict) and isinstance(record.get("versions"), list) and record["versions"] \
                and isinstance(record["versions"][0], dict):
            record["versions"][0]["manifest_xxh3"] = checksum(encoded)   # the checksum layer passes
            record["versions"][0]["manifest_size"] = len(encoded)
        try:
            write_record_body(path, record)
        except ValueError:
            return
        with deadline(60, "pyckpt.load"):
            try:
                pyckpt.load(path)
            except PyckptError:
                pass
        out = os.path.join(tmp, "out")
        for args in (("ls", path), ("ls", path, "--json"), ("inspect", path), ("inspect", path, "--json"),
                     ("verify", path, "--no-progress", "--all"), ("export", path, out + ".pt", "--no-progress"),
                     ("export", path, out + ".safetensors", "--no-progress")):
            with deadline(60, f"pyckpt {args[0]}"):
                assert cli(*args).exit_code in (0, 1, 2)
