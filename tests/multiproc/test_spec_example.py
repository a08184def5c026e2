"""Issue 18: the spec followed by hand, as a new user does it.

- Its fine-tuning example (spec_example.py, only the imports changed) runs as one process and under
  torchrun with 2 gloo ranks, and each resumes the other's snapshot.
- Its launch, `NODE_RANK=k python train.py` on each node with a hand-written config file (the spec's
  PHYSICAL_NODES address list and SHARED_FS_PATH, no distributed.env link, no DISTRIBUTED_MODE), trains
  the whole cluster and writes SHARED_FS_PATH/checkpoint.bin. Two processes on this machine stand in
  for two nodes (loopback addresses, docker mode: physical mode refuses a loopback master).
"""
from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest

import pyckpt
from tests.conftest import REPO, TRAIN, clean_env, free_port, run

pytestmark = pytest.mark.multiproc
EXAMPLE = Path(__file__).with_name("spec_example.py")
SPEC_PATH = '"/shared/snapshots/checkpoint.bin"'


def copy_example(tmp_path: Path) -> tuple[Path, Path]:
    """The example with its snapshot path pointed into tmp_path: the one change the test makes (this
    machine has no /shared). It runs from tmp_path, which has no config/: single mode's defaults, or
    torchrun's variables."""
    snapshot = tmp_path / "shared/snapshots/checkpoint.bin"
    snapshot.parent.mkdir(parents=True)
    text = EXAMPLE.read_text()
    assert text.count(SPEC_PATH) == 3
    script = tmp_path / "example.py"
    script.write_text(text.replace(SPEC_PATH, f'"{snapshot}"'))
    return script, snapshot


def run_example(script: Path, nproc: int) -> None:
    env = clean_env(PYTHONPATH=str(REPO))  # this checkout's pyckpt
    launcher = [] if nproc == 1 else ["-m", "torch.distributed.run", f"--nproc_per_node={nproc}", "--nnodes=1",
                                      "--master_addr=127.0.0.1", f"--master_port={free_port()}"]
    run([sys.executable, *launcher, str(script)], env, cwd=script.parent)


def progress(snapshot: Path) -> tuple[int, int, int, int]:
    """(epoch, step, ranks that saved it, newest version number) of the committed snapshot."""
    state = pyckpt.load(snapshot)
    versions = [int(p.name[1:]) for p in Path(f"{snapshot}.pyckpt").iterdir() if re.fullmatch(r"v\d+", p.name)]
    return state["progress"]["epoch"], state["progress"]["step"], len(state["per_rank"]), max(versions)


def test_spec_example_runs_as_one_process_then_resumes(tmp_path):
    script, snapshot = copy_example(tmp_path)
    run_example(script, 1)
    # 256 samples, batches of 16: steps 0..15 an epoch, a snapshot at steps 0, 4, 8, 12 of 3 epochs.
    assert progress(snapshot) == (2, 12, 1, 12)
    run_example(script, 1)  # restores epoch 2 and redoes it (the spec resumes by epoch): 4 snapshots more
    assert progress(snapshot) == (2, 12, 1, 16)


def test_spec_example_under_torchrun_then_in_one_process(tmp_path):
    script, snapshot = copy_example(tmp_path)
    run_example(script, 2)
    # 2 ranks share the 256 samples: steps 0..7 an epoch, snapshots at steps 0 and 4.
    assert progress(snapshot) == (2, 4, 2, 6)
    run_example(script, 1)  # the 2-rank snapshot restores in one process, which redoes epoch 2
    assert progress(snapshot) == (2, 12, 1, 10)


def test_spec_launch_with_a_hand_written_config_and_no_mode(tmp_path):
    shared = tmp_path / "shared/snapshots"  # the spec's SHARED_FS_PATH: the directory of the snapshots
    config_dir = tmp_path / "config"
    config_dir.mkdir()
    (config_dir / "distributed.single.env").write_text("DISTRIBUTED_MODE=single\n")  # as in the repo
    (config_dir / "distributed.docker.env").write_text(
        f"DISTRIBUTED_MODE=docker\nWORLD_SIZE=2\nMASTER_ADDR=127.0.0.1\nMASTER_PORT={free_port()}\nBACKEND=gloo\n"
        f"SHARED_FS_PATH={shared}\nSHARED_FS_TYPE=local\nPHYSICAL_NODES=127.0.0.1,127.0.0.2\nINIT_TIMEOUT_S=60\n")
    procs = [subprocess.Popen([sys.executable, str(TRAIN), "--steps", "40", "--checkpoint-interval", "20",
                               "--config-dir", str(config_dir)], env=clean_env(NODE_RANK=str(k)),
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for k in (0, 1)]
    outputs = [p.communicate(timeout=180) for p in procs]
    assert [p.returncode for p in procs] == [0, 0], outputs
    assert "mode=docker world_size=2" in outputs[0][0], outputs[0]
    state = pyckpt.load(shared / "checkpoint.bin")
    assert state["progress"]["step"] == 40 and len(state["per_rank"]) == 2
    assert not (shared / "snapshots").exists()
