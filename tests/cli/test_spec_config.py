"""Issue 18: the spec's config/distributed.physical.env, copied as the spec writes it, through the real
`pyckpt config validate` command (a subprocess, as a user or the cluster_config role runs it)."""
from __future__ import annotations

import subprocess
import sys
from pathlib import Path

from ..conftest import REPO, SPEC_PHYSICAL_ENV, clean_env
from .conftest import run_cli

SPEC_BLOCK = SPEC_PHYSICAL_ENV


def spec_config_dir(tmp_path: Path) -> Path:
    config = tmp_path / "config"
    config.mkdir()
    (config / "distributed.physical.env").write_text(SPEC_BLOCK)
    return config


def resolved(stdout: str) -> dict[str, str]:
    return dict(line.split("=", 1) for line in stdout.splitlines() if "=" in line and not line.startswith("#"))


def test_the_spec_block_passes_config_validate(tmp_path):
    path = spec_config_dir(tmp_path) / "distributed.physical.env"
    done = run_cli("config", "validate", "--file", path)
    assert done.returncode == 0, done.stderr
    assert done.stderr == ""  # no warnings either
    values = resolved(done.stdout)
    assert values["PHYSICAL_NODES"] == "192.168.1.100,192.168.1.101,192.168.1.102,192.168.1.103"
    assert (values["WORLD_SIZE"], values["SHARED_FS_PATH"], values["BACKEND"]) == ("4", "/shared/snapshots", "gloo")


def test_config_validate_prints_the_snapshot_path(tmp_path):
    """SNAPSHOT_PATH: unset, SHARED_FS_PATH/checkpoint.bin; set in the file (an s3:// URL), that; a relative
    path is refused naming the file's line and the fix."""
    path = spec_config_dir(tmp_path) / "distributed.physical.env"
    done = run_cli("config", "validate", "--file", path)
    assert resolved(done.stdout)["SNAPSHOT_PATH"] == "/shared/snapshots/checkpoint.bin"
    path.write_text(SPEC_BLOCK + "SNAPSHOT_PATH=s3://ckpt/run1/checkpoint.bin\n")
    done = run_cli("config", "validate", "--file", path)
    assert done.returncode == 0 and done.stderr == "", done.stderr
    assert resolved(done.stdout)["SNAPSHOT_PATH"] == "s3://ckpt/run1/checkpoint.bin"
    path.write_text(SPEC_BLOCK + "SNAPSHOT_PATH=run1/checkpoint.bin\n")
    done = run_cli("config", "validate", "--file", path)
    assert done.returncode == 1 and "Traceback" not in done.stderr
    assert f"{path}:9: SNAPSHOT_PATH='run1/checkpoint.bin' is not a snapshot path (a relative path" in done.stderr
    assert "use an absolute path or an s3://BUCKET/KEY URL" in done.stderr


def test_config_validate_finds_the_spec_file_for_a_node_told_its_rank(tmp_path):
    """No --file, no DISTRIBUTED_MODE, no distributed.env link: NODE_RANK=2 picks the one cluster file."""
    config = spec_config_dir(tmp_path)
    done = run_cli("config", "validate", NODE_RANK="2", PYCKPT_CONFIG_DIR=str(config))
    assert done.returncode == 0, done.stderr
    assert done.stdout.startswith(f"# {config / 'distributed.physical.env'}: valid")
    assert (resolved(done.stdout)["RANK"], resolved(done.stdout)["WORLD_SIZE"]) == ("2", "4")


def test_config_validate_refuses_an_ambiguous_choice_and_says_how_to_choose(tmp_path):
    config = spec_config_dir(tmp_path)
    (config / "distributed.docker.env").write_text("DISTRIBUTED_MODE=docker\nPHYSICAL_NODES=2\n")
    done = run_cli("config", "validate", NODE_RANK="1", PYCKPT_CONFIG_DIR=str(config))
    assert done.returncode == 1 and "Traceback" not in done.stderr
    assert "distributed.docker.env" in done.stderr and "distributed.physical.env" in done.stderr
    assert "DISTRIBUTED_MODE=<mode>" in done.stderr


def test_the_readme_quotes_the_real_error(tmp_path):
    """README's Configuration section quotes `pyckpt config validate` on the spec's block with a bad port:
    the quote must be what the command prints."""
    readme = (REPO / "README.md").read_text()
    quoted = next(line for line in readme.splitlines() if line.startswith("error: ") and "MASTER_PORT=" in line)
    spec_config_dir(tmp_path)
    path = tmp_path / "config/distributed.physical.env"
    path.write_text(SPEC_BLOCK.replace("MASTER_PORT=29500", "MASTER_PORT=abc"))
    # From the directory holding config/, as a user runs it (PYTHONPATH: this checkout's pyckpt).
    done = subprocess.run([sys.executable, "-m", "pyckpt.cli", "config", "validate"], cwd=tmp_path, text=True,
                          capture_output=True, timeout=120, env=clean_env(PYTHONPATH=str(REPO)))
    assert done.returncode == 1
    assert done.stderr.strip() == quoted


def test_make_setup_says_to_install_python3_venv_when_it_is_missing(tmp_path):
    """A bare Debian has python3 without venv's ensurepip (package python3-venv). Stand-in: a `python3`
    first on PATH that fails that import, as Debian's does; the script must stop before making a venv."""
    stub = tmp_path / "bin/python3"
    stub.parent.mkdir()
    stub.write_text("#!/bin/sh\necho \"ModuleNotFoundError: No module named 'ensurepip'\" >&2\nexit 1\n")
    stub.chmod(0o755)
    venv = tmp_path / "venv"
    done = subprocess.run(["bash", str(REPO / "scripts/setup-venv.sh")], capture_output=True, text=True, timeout=60,
                          env=clean_env(PATH=f"{stub.parent}:/usr/bin:/bin", VENV=str(venv)))
    assert done.returncode == 1
    assert "apt-get install -y python3-venv" in done.stderr and str(venv) in done.stderr
    assert not venv.exists()
