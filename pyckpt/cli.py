"""The `pyckpt` command line: what Ansible and operators call to check what was built."""
from __future__ import annotations

import json
import warnings
from pathlib import Path
from typing import Optional

import typer

from .config import load_config
from .errors import PyckptError

app = typer.Typer(help="pyckpt: snapshots for torch.distributed training, and checks of the cluster config.",
                  no_args_is_help=True, pretty_exceptions_enable=False)
config_app = typer.Typer(help="Check the cluster config file (config/distributed.<mode>.env).", no_args_is_help=True)
app.add_typer(config_app, name="config")


def fail(message: str, code: int = 1) -> None:
    typer.secho(f"error: {message}", fg=typer.colors.RED, err=True)
    raise typer.Exit(code)


@config_app.command("validate")
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


def main() -> None:
    app()


if __name__ == "__main__":
    main()
