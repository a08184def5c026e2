"""The `pyckpt` command line: what Ansible and operators call to check what was built."""
from __future__ import annotations

import functools
import gc
import json
import math
import os
import posixpath
import time
import warnings
from pathlib import Path
from typing import Callable, Optional

import typer
from typer.exceptions import TyperException

from .config import load_config
from .errors import IntegrityError, PyckptError, SnapshotLockedError, SnapshotNotFoundError
from .paths import is_s3

# Exit codes: 0 everything fine, 1 a check failed (corrupted snapshot, failing doctor check, a writer
# holds the lock), 2 usage error (bad options, no such path), 3 a bug in pyckpt (an unexpected
# exception: one line asking for a report; PYCKPT_DEBUG=1 shows its traceback). Every failure prints
# one message, never a traceback.
EXIT_OK, EXIT_FAILED, EXIT_USAGE, EXIT_BUG = 0, 1, 2, 3

app = typer.Typer(help="pyckpt: snapshots for torch.distributed training, and checks of the cluster config.",
                  no_args_is_help=True, pretty_exceptions_enable=False)
config_app = typer.Typer(help="Check the cluster config file (config/distributed.<mode>.env).", no_args_is_help=True)
app.add_typer(config_app, name="config")


def fail(message: str, code: int = 1) -> None:
    typer.secho(f"error: {_printable(message)}", fg=typer.colors.RED, err=True)
    raise typer.Exit(code)


def _printable(text) -> str:
    """Text from disk as it can be printed: a lone surrogate (valid in JSON, not in UTF-8) is escaped."""
    return str(text).encode("utf-8", "backslashreplace").decode("utf-8")


def expected_errors(command: Callable) -> Callable:
    """Turn every failure into one line and an exit code instead of a traceback: the ones a user can
    cause say what to do; anything else is a bug in pyckpt, reported as such (EXIT_BUG)."""

    @functools.wraps(command)
    def wrapper(*args, **kwargs):
        try:
            return command(*args, **kwargs)
        except SnapshotNotFoundError as exc:
            fail(str(exc), EXIT_USAGE)
        except PyckptError as exc:
            fail(str(exc), EXIT_FAILED)
        except (FileNotFoundError, NotADirectoryError) as exc:
            fail(f"{exc.filename or ''}: {exc.strerror}", EXIT_USAGE)
        except OSError as exc:
            fail(f"{exc.filename + ': ' if exc.filename else ''}{exc.strerror or exc}", EXIT_FAILED)
        except KeyboardInterrupt:
            fail("interrupted", 130)
        except (typer.Exit, typer.Abort, TyperException):   # typer's own exits and usage errors
            raise
        except Exception as exc:  # a bug in pyckpt: one line to report, the traceback on request
            if os.environ.get("PYCKPT_DEBUG") == "1":
                raise
            target = kwargs.get("snapshot") or kwargs.get("path")
            fail(f"{f'{_shown(target)}: ' if target else ''}internal error in pyckpt "
                 f"({type(exc).__name__}: {str(exc)[:300]}); please report it with the command that failed, "
                 "and run it again with PYCKPT_DEBUG=1 for the traceback", EXIT_BUG)

    return wrapper


@config_app.command("validate")
@expected_errors
def config_validate(
    file: Optional[Path] = typer.Option(None, "--file", "-f", help="config file; default: found like load_config()"),
    as_json: bool = typer.Option(False, "--json", help="print the resolved config as JSON"),
) -> None:
    """Parse and validate a config file together with this environment; exit 1 on any error."""
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        try:
            config = load_config(file)
        except PyckptError as exc:
            fail(str(exc))
    for warning in caught:
        typer.secho(f"warning: {warning.message}", fg=typer.colors.YELLOW, err=True)
    resolved = config.as_env()
    if as_json:
        typer.echo(json.dumps({"file": config.source_file, "config": resolved,
                               "warnings": [str(w.message) for w in caught]}, indent=2))
        return
    typer.echo(f"# {config.source_file or 'built-in defaults'}: valid")
    for key, value in resolved.items():
        typer.echo(f"{key}={value}")


def _console(stderr: bool = False):
    from rich.console import Console

    import sys

    stream = sys.stderr if stderr else sys.stdout
    # Piped output keeps whole lines (rich would cut tables to 80 columns).
    return Console(stderr=stderr, highlight=False, width=None if stream.isatty() else 200)


def _esc(text) -> str:
    """Paths, tensor names and messages are data, not rich markup."""
    from rich.markup import escape

    return escape(_printable(text))


def _when(epoch: float | None) -> str:
    """Local time of a Unix time; never fails (a stage's mtime is whatever the filesystem says)."""
    try:
        return time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(epoch)) if epoch else "-"
    except (OverflowError, OSError, ValueError):
        return f"{epoch!r} (not a valid time)"


def _finite(value):
    """value with NaN/infinite floats (a diverged run's loss) as null: --json output is strict JSON."""
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, dict):
        return {key: _finite(item) for key, item in value.items()}
    if isinstance(value, (list, tuple)):
        return [_finite(item) for item in value]
    return value


def _size(n: int | None) -> str:
    if n is None:
        return "-"
    value = float(n)
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if value < 1024 or unit == "TiB":
            return f"{int(value)} B" if unit == "B" else f"{value:.1f} {unit}"
        value /= 1024
    return str(n)


def _opt(value) -> str:
    if value is None:
        return "-"
    return f"{value:.4g}" if isinstance(value, float) else str(value)


def _shown(path: str) -> str:
    """A snapshot path as messages show it: an s3:// URL as given, a file path absolute."""
    return path if is_s3(path) else os.path.abspath(path)


def _relative(paths: list[str], where: str) -> tuple[str, list[str]]:
    """The directory (or S3 prefix) that snapshot paths share, and each path relative to it."""
    if is_s3(where):
        base = "s3://" + posixpath.commonpath([posixpath.dirname(p[5:]) for p in paths]) if paths else where
        return base, [p[len(base):].lstrip("/") for p in paths]
    base = os.path.commonpath([os.path.dirname(p) for p in paths]) if paths else os.path.abspath(where)
    return base, [os.path.relpath(p, base) for p in paths]


def _open(snapshot: str, version: str | None):
    """Snapshot.open, with an unknown --version reported as a usage error (exit 2)."""
    from .reader import Snapshot
    from .stores import open_store

    if version is not None:
        names = [v.name for v in open_store(snapshot).read_commit().versions]
        if version not in names:
            fail(f"{_shown(snapshot)}: no version {version!r}; committed versions: {', '.join(names)}",
                 EXIT_USAGE)
    return Snapshot.open(snapshot, version)


def _progress():
    from rich.progress import (BarColumn, DownloadColumn, Progress, TextColumn, TimeRemainingColumn,
                               TransferSpeedColumn)

    return Progress(TextColumn("{task.description}"), BarColumn(), DownloadColumn(binary_units=True),
                    TransferSpeedColumn(), TimeRemainingColumn(), console=_console(stderr=True), transient=True)


# ---------------------------------------------------------------------------------------------
# Snapshots
# ---------------------------------------------------------------------------------------------

@app.command("ls")
@expected_errors
def ls(
    path: str = typer.Argument(..., help="a snapshot path (e.g. /shared/snapshots/checkpoint.bin or "
                                          "s3://bucket/snapshots/checkpoint.bin), a directory or an S3 prefix"),
    as_json: bool = typer.Option(False, "--json", help="machine-readable output"),
) -> None:
    """List snapshot versions: committed ones and stages left by crashed writers. Exit 1 if one is broken."""
    from .inspect import iter_rows

    rows = list(iter_rows(path))
    broken = [r for r in rows if r.status == "broken"]
    if as_json:
        typer.echo(json.dumps(_finite([r.as_dict() for r in rows]), indent=2))
    else:
        from rich.table import Table

        base, relative = _relative([r.path for r in rows], path)
        table = Table(title=f"snapshots in {_esc(base)}", title_justify="left")
        for column in ("path", "version", "status", "step", "epoch", "loss", "world", "size", "time"):
            table.add_column(column, justify="right" if column in ("step", "epoch", "loss", "world", "size")
                             else "left")
        for r, shown in zip(rows, relative):
            status = {"current": "[green]current[/]", "committed": "committed",
                      "stage": "[yellow]incomplete (stage)[/]", "orphan": "[yellow]incomplete (orphan)[/]",
                      "broken": "[red]broken[/]"}[r.status]
            table.add_row(_esc(shown), r.version, status,
                          _opt(r.step), _opt(r.epoch), _opt(r.loss), _opt(r.world_size), _size(r.bytes),
                          _when(r.created))
        console = _console()
        if rows:
            console.print(table)
        else:
            console.print(f"no snapshots in {_esc(path)}")
        for r in broken:
            console.print(f"[red]broken:[/] {_esc(r.path)} {r.version}: {_esc(r.error)}")
        if any(r.status in ("stage", "orphan") for r in rows):
            console.print("incomplete versions are leftovers of interrupted writers; the next snapshot "
                          "or `pyckpt gc` removes them")
    if broken:
        raise typer.Exit(EXIT_FAILED)


@app.command("inspect")
@expected_errors
def inspect_cmd(
    snapshot: str = typer.Argument(..., help="the snapshot path (a file path or s3://bucket/key)"),
    version: Optional[str] = typer.Option(None, "--version", "-v", help="a committed version (default: current)"),
    as_json: bool = typer.Option(False, "--json", help="machine-readable output"),
    chunks: bool = typer.Option(False, "--chunks", help="also list each box of the sharded tensors and its ranks"),
) -> None:
    """Show a snapshot's metadata and its tensors (name, dtype, global shape, bytes, files, and how
    sharded tensors were laid out)."""
    from .inspect import tensors

    snap = _open(snapshot, version)
    infos = tensors(snap)
    summary = {"path": snap.store.path, "version": snap.ref.name, "world_size": snap.manifest.world_size,
               "format_version": snap.manifest.format_version, "bytes": snap.manifest.total_bytes,
               "files": [{"name": f.name, "size": f.size} for f in snap.manifest.files],
               "meta": snap.meta, "tensors": [t.as_dict() for t in infos]}
    if as_json:
        typer.echo(json.dumps(_finite(summary), indent=2, default=str))
        return
    console = _console()
    meta = snap.meta
    console.print(f"[bold]{_esc(snap.store.path)}[/] version {snap.ref.name}: step {_opt(meta.get('step'))}, epoch "
                  f"{_opt(meta.get('epoch'))}, loss {_opt(meta.get('loss'))}, world size {snap.manifest.world_size}, "
                  f"{_size(snap.manifest.total_bytes)} in {len(snap.manifest.files)} file(s), "
                  f"written {_when(meta.get('created'))}"
                  + (f" on {_esc(meta['host'])} (torch {_esc(meta.get('torch'))})" if meta.get("host") else ""))
    sharded = any(t.sharding for t in infos)
    columns = ("#", "tensor", "dtype", "shape", "bytes", "files") + (("sharding",) if sharded else ())
    rows = []
    for t in infos:
        layout = f"{t.sharding}, {len(t.chunks)} chunk(s)" if t.sharding else ""
        rows.append((str(t.index), t.name, t.dtype, "x".join(map(str, t.shape)) or "scalar", _size(t.nbytes),
                     ",".join(map(str, t.ranks)) or "-", *([layout] if sharded else [])))
        for c in t.chunks if chunks else ():
            box = ", ".join(f"{o}:{o + n}" for o, n in zip(c["offsets"], c["sizes"]))
            rows.append(("", f"  [{box}]", "", "x".join(map(str, c["sizes"])), "", "",
                         f"ranks {','.join(map(str, c['ranks']))}"))
    _table(console, columns, ("#", "bytes"), rows)


# rich lays out every cell (~0.6 ms a row: a 20,000-tensor inspect took 12 s): longer tables are
# printed as plain aligned columns, the same text without the frame.
_RICH_ROWS = 1000


def _table(console, columns: tuple[str, ...], right: tuple[str, ...], rows: list[tuple[str, ...]]) -> None:
    if len(rows) <= _RICH_ROWS:
        from rich.table import Table

        table = Table(show_lines=False)
        for column in columns:
            table.add_column(column, justify="right" if column in right else "left")
        for row in rows:
            table.add_row(*map(_esc, row))
        console.print(table)
        return
    rows = [tuple(map(_printable, row)) for row in rows]
    widths = [max(len(column), *(len(row[i]) for row in rows)) for i, column in enumerate(columns)]

    def line(cells) -> str:
        return "  ".join(cell.rjust(w) if column in right else cell.ljust(w)
                         for cell, w, column in zip(cells, widths, columns)).rstrip()
    console.file.write("\n".join([line(columns), *map(line, rows)]) + "\n")


@app.command("verify")
@expected_errors
def verify_cmd(
    snapshot: str = typer.Argument(..., help="the snapshot path (a file path or s3://bucket/key)"),
    version: Optional[list[str]] = typer.Option(None, "--version", "-v",
                                                help="version(s) to check (default: current)"),
    all_versions: bool = typer.Option(False, "--all", help="check every committed version"),
    as_json: bool = typer.Option(False, "--json", help="machine-readable output"),
    progress: bool = typer.Option(True, "--progress/--no-progress", help="progress bar on stderr"),
) -> None:
    """Read every byte and check every checksum. Exit 0 if intact, 1 naming the bad file and tensor."""
    from .inspect import verify
    from .reader import Snapshot
    from .stores import open_store

    record = open_store(snapshot).read_commit()
    committed = [v.name for v in record.versions]
    names = committed if all_versions else (version or [record.current.name])
    unknown = [n for n in names if n not in committed]
    if unknown:
        fail(f"{_shown(snapshot)}: no version {', '.join(unknown)}; committed versions: "
             f"{', '.join(committed)}", EXIT_USAGE)
    results = []
    for name in names:
        start = time.perf_counter()
        result = {"path": _shown(snapshot), "version": name, "ok": False, "bytes": 0, "tensors": 0,
                  "seconds": 0.0, "error": None, "file": None, "tensor": None}
        try:
            snap = Snapshot.open(snapshot, name)
            total = sum(t.nbytes for t in snap.manifest.tensors)
            result["tensors"] = len(snap.manifest.tensors)
            if progress:
                with _progress() as bar:
                    task = bar.add_task(f"verify {name}", total=total)
                    result["bytes"] = verify(snap, lambda n, _t: bar.advance(task, n))
            else:
                result["bytes"] = verify(snap)
            result["ok"] = True
        except IntegrityError as exc:
            result.update(error=str(exc), file=exc.file, tensor=exc.tensor)
        result["seconds"] = round(time.perf_counter() - start, 3)
        results.append(result)
    ok = all(r["ok"] for r in results)
    if as_json:
        typer.echo(json.dumps({"ok": ok, "versions": results}, indent=2))
    else:
        console = _console()
        for r in results:
            if r["ok"]:
                console.print(f"[green]OK[/] {_esc(r['path'])} {r['version']}: {r['tensors']} tensors, "
                              f"{_size(r['bytes'])} verified in {r['seconds']:.2f}s")
            else:
                where = " ".join(x for x in (f"file {r['file']}" if r["file"] else "",
                                             f"tensor {r['tensor']}" if r["tensor"] else "") if x)
                console.print(f"[red]CORRUPT[/] {_esc(r['path'])} {r['version']}: {_esc(where)}\n  {_esc(r['error'])}")
    if not ok:
        raise typer.Exit(EXIT_FAILED)


@app.command("gc")
@expected_errors
def gc_cmd(
    path: str = typer.Argument(..., help="a snapshot path or a directory (or S3 prefix) of snapshots"),
    keep: int = typer.Option(..., "--keep", "-k", min=1, help="committed versions to keep per path (>= 1)"),
    dry_run: bool = typer.Option(False, "--dry-run", "-n", help="only show what would be removed"),
    as_json: bool = typer.Option(False, "--json", help="machine-readable output"),
) -> None:
    """Remove versions beyond --keep, stages of crashed writers and spare data files kept for
    reuse_files; never the newest complete one.

    Takes the writer's lock: exit 1 (nothing removed) while a snapshot is being written. Exit 1 also
    when a path cannot be cleaned (its error is shown; the other paths are still cleaned)."""
    from .inspect import snapshot_paths
    from .stores import open_store

    report = []
    for snapshot_path in snapshot_paths(path):
        entry = {"path": snapshot_path, "removed": [], "busy": False, "error": None}
        try:
            entry["removed"] = open_store(snapshot_path).gc(keep, spares=True, dry_run=dry_run)
        except SnapshotLockedError as exc:
            entry.update(busy=True, error=str(exc))
        except PyckptError as exc:
            entry["error"] = str(exc)
        report.append(entry)
    if as_json:
        typer.echo(json.dumps({"dry_run": dry_run, "keep": keep, "paths": report}, indent=2))
    else:
        console = _console()
        verb = "would remove" if dry_run else "removed"
        for entry in report:
            if entry["busy"]:
                console.print(f"[yellow]busy[/] {_esc(entry['path'])}: nothing removed, run gc again later "
                              f"({_esc(entry['error'])})")
            elif entry["error"]:
                console.print(f"[red]error[/] {_esc(entry['path'])}: {_esc(entry['error'])}")
            else:
                console.print(f"{_esc(entry['path'])}: {verb} {', '.join(entry['removed']) or 'nothing'}")
    if any(entry["error"] for entry in report):
        raise typer.Exit(EXIT_FAILED)


@app.command("export")
@expected_errors
def export_cmd(
    snapshot: str = typer.Argument(..., help="the snapshot path (a file path or s3://bucket/key)"),
    out: Path = typer.Argument(..., help="output file: .pt/.pth (torch) or .safetensors"),
    version: Optional[str] = typer.Option(None, "--version", "-v", help="a committed version (default: current)"),
    obj: Optional[str] = typer.Option(None, "--object", "-o",
                                      help="export one registered object (e.g. model): its own state_dict keys"),
    fmt: str = typer.Option("auto", "--format", "-f", help="auto (from OUT's suffix), torch or safetensors"),
    force: bool = typer.Option(False, "--force", help="replace OUT if it exists"),
    as_json: bool = typer.Option(False, "--json", help="machine-readable output"),
    progress: bool = typer.Option(True, "--progress/--no-progress", help="progress bar on stderr"),
) -> None:
    """Write a single-file state dict for use outside the cluster, verifying every byte on the way.

    Streams: memory holds about one tensor (or 64 MiB) at a time. torch files load with
    torch.load(OUT, weights_only=True); safetensors with safetensors.torch.load_file(OUT)."""
    from .inspect import export_safetensors, export_torch

    kind = fmt.lower()
    if kind == "auto":
        suffix = out.suffix.lower()
        kind = {".pt": "torch", ".pth": "torch", ".safetensors": "safetensors"}.get(suffix, "")
        if not kind:
            fail(f"cannot tell the format from {out.name!r}: name it .pt/.pth or .safetensors, or pass --format",
                 EXIT_USAGE)
    if kind not in ("torch", "safetensors"):
        fail(f"--format {fmt!r}: use auto, torch or safetensors", EXIT_USAGE)
    if out.exists() and not force:
        fail(f"{out} exists; pass --force to replace it", EXIT_USAGE)
    if not out.parent.is_dir():
        fail(f"{out.parent} is not a directory", EXIT_USAGE)
    snap = _open(snapshot, version)
    write = export_torch if kind == "torch" else export_safetensors
    start = time.perf_counter()
    if progress:
        from .inspect import _tensor_keys, export_selection

        total = sum(snap.manifest.tensors[i].nbytes for i, _ in _tensor_keys(export_selection(snap, obj)))
        with _progress() as bar:
            task = bar.add_task(f"export {snap.ref.name}", total=total)
            result = write(snap, str(out), obj, lambda n, _t: bar.advance(task, n))
    else:
        result = write(snap, str(out), obj)
    result.update(path=snap.store.path, version=snap.ref.name, out=str(out), format=kind, object=obj,
                  seconds=round(time.perf_counter() - start, 3))
    if as_json:
        typer.echo(json.dumps(result, indent=2))
    else:
        _console().print(f"wrote {_esc(out)} ({kind}): {result['tensors']} tensors, {_size(result['bytes'])} from "
                         f"{_esc(snap.store.path)} {snap.ref.name} in {result['seconds']:.2f}s")


# ---------------------------------------------------------------------------------------------
# Doctor
# ---------------------------------------------------------------------------------------------

@app.command("doctor")
@expected_errors
def doctor_cmd(
    file: Optional[Path] = typer.Option(None, "--file", "-f", help="config file; default: found like load_config()"),
    cluster_subnet: Optional[str] = typer.Option(None, "--cluster-subnet",
                                                 help="the nodes' subnet (CIDR), to judge the firewall rules"),
    expect_listener: bool = typer.Option(False, "--expect-listener",
                                         help="training runs: MASTER_PORT must accept connections"),
    port_timeout: float = typer.Option(3.0, "--port-timeout", min=0.1, help="seconds to wait for MASTER_PORT"),
    rdzv_port: Optional[int] = typer.Option(None, "--rdzv-port", min=1, max=65535,
                                            help="elastic mode: also check torchrun's c10d rendezvous port on "
                                                 "MASTER_ADDR, like MASTER_PORT"),
    share_user: Optional[str] = typer.Option(None, "--share-user",
                                             help="check that this user (the cluster user) can write the share; "
                                                  "needs root when it is not you"),
    as_json: bool = typer.Option(False, "--json", help="machine-readable output"),
) -> None:
    """Check this host against the spec's troubleshooting list; exit 1 if any check fails.

    Config, MASTER_ADDR/PORT (and the rendezvous port with --rdzv-port), firewall, backend vs hardware,
    shared filesystem, NFS export."""
    from .doctor import exit_code, run_doctor

    checks, facts = run_doctor(str(file) if file else None, cluster_subnet=cluster_subnet,
                               expect_listener=expect_listener, port_timeout=port_timeout, share_user=share_user,
                               rdzv_port=rdzv_port)
    code = exit_code(checks)
    if as_json:
        typer.echo(json.dumps({"ok": code == 0, "host": facts, "checks": [c.as_dict() for c in checks]},
                              indent=2, default=str))
    else:
        console = _console()
        style = {"pass": "green", "warn": "yellow", "fail": "red", "skip": "dim"}
        for c in checks:
            console.print(f"[{style[c.status]}]{c.status.upper():4}[/] {c.name:16} {_esc(c.message)}")
            if c.hint and c.status != "pass":
                console.print(f"     {'':16} fix: {_esc(c.hint)}")
        counts = {s: sum(1 for c in checks if c.status == s) for s in style}
        console.print(", ".join(f"{n} {s}" for s, n in counts.items() if n))
    raise typer.Exit(code)


def main() -> None:
    gc.disable()   # one short command: a 20,000-tensor manifest is ~10^5 objects, none in cycles (2-3x slower with GC)
    app()


if __name__ == "__main__":
    main()
