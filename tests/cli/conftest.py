"""Snapshots for the CLI tests, written through pyckpt's public API (one process, world size 1)."""
from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from pyckpt import DistributedCoordinator, TrainingRuntime, load_config

from ..conftest import clean_env


def make_model(seed: int = 0) -> tuple[torch.nn.Module, torch.optim.Optimizer]:
    torch.manual_seed(seed)
    model = torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.ReLU(), torch.nn.Linear(16, 4))
    model.register_buffer("counts", torch.arange(6, dtype=torch.int64))
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-3)
    return model, optimizer


def write_snapshots(path: Path, steps: int = 3, keep_last: int = 5, config_dir: Path | None = None) -> dict:
    """`steps` committed versions at `path`; returns the model/optimizer state of the last one."""
    model, optimizer = make_model()
    config = load_config(environ={}, config_dir=str(config_dir or path.parent))
    runtime = TrainingRuntime()
    runtime.register_model(model)
    runtime.register_optimizer(optimizer)
    with DistributedCoordinator(config, keep_last=keep_last) as coordinator:
        for step in range(1, steps + 1):
            loss = model(torch.randn(4, 8)).pow(2).mean()
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            runtime.set_step(step)
            runtime.set_epoch(step // 2)
            runtime.set_loss(loss.item())
            coordinator.snapshot(path, runtime)
    return {"model": {k: v.clone() for k, v in model.state_dict().items()}, "optimizer": optimizer.state_dict()}


@pytest.fixture(scope="session")
def pristine(tmp_path_factory) -> tuple[Path, dict]:
    """One directory with snapshots/checkpoint.bin (3 versions), written once per session."""
    root = tmp_path_factory.mktemp("pristine")
    (root / "snapshots").mkdir()
    state = write_snapshots(root / "snapshots" / "checkpoint.bin")
    return root / "snapshots", state


@pytest.fixture
def snapdir(pristine, tmp_path) -> Path:
    """A private copy of the pristine snapshot directory (tests may corrupt it)."""
    copy = tmp_path / "snapshots"
    shutil.copytree(pristine[0], copy)
    return copy


def run_cli(*args: str, timeout: float = 120, **env: str) -> subprocess.CompletedProcess:
    """The real command line in a subprocess (exit codes, stderr without tracebacks)."""
    return subprocess.run([sys.executable, "-m", "pyckpt.cli", *map(str, args)], capture_output=True, text=True,
                          timeout=timeout, env=clean_env(**env))
