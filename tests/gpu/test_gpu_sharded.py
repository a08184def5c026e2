"""Sharded state on a real GPU (skipped without CUDA; scripts/gpu-check.sh runs it): one rank with nccl
holds an FSDP2 model on a 1-rank CUDA mesh, takes an AdamW step, snapshots; the snapshot restores into
a fresh model and a fresh optimizer (on the GPU, as DTensors), loads in a plain process, and a 2-rank
CPU/gloo snapshot of the same model restores into the 1-rank CUDA model (2 -> 1, CPU -> GPU).

Oracle: xxh3 of every full tensor of the model and the optimizer state at save (gpu_worker.py); the
CPU stand-in of the same flow (`python -m tests.gpu.gpu_worker <dir>`: gloo on the CPU) is how the
worker was checked on machines without a GPU."""
from __future__ import annotations

import json

import pytest
import torch
import torch.multiprocessing as mp

import pyckpt
from tests.conftest import free_port
from tests.gpu.gpu_worker import digest, on_device, save_cpu

pytestmark = [pytest.mark.gpu,
              pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU (scripts/gpu-check.sh)")]


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    base = tmp_path_factory.mktemp("gpu")
    mp.spawn(save_cpu, args=(free_port(), str(base)), nprocs=2, join=True)
    mp.spawn(on_device, args=(str(base), "cuda"), nprocs=1, join=True)
    return base, json.loads((base / "cuda1.json").read_text()), json.loads((base / "cpu2.json").read_text())


def _values(entries: dict) -> dict:
    return {k: v for k, v in entries.items() if not k.endswith("@device")}


def test_a_cuda_fsdp2_snapshot_restores_into_a_fresh_model_and_optimizer(runs):
    """Proves: the nccl/CUDA path saves the shards (copied off the GPU) and reads them back into CUDA
    DTensors of a fresh model and of an optimizer that never stepped, bit-exact."""
    _, gpu, _ = runs
    assert gpu["backend"] == "nccl"
    assert _values(gpu["fresh_before"]) != _values(gpu["saved"])
    assert gpu["restored"] == gpu["saved"]
    placed = {k: v for k, v in gpu["restored"].items() if k.endswith("@device")}
    assert placed and set(placed.values()) == {"cuda"}, placed
    assert any(k.startswith("optimizer.") and k.endswith("exp_avg@device") for k in placed)


def test_a_plain_process_loads_the_cuda_snapshot(runs):
    """Proves: a process without a group or GPU tensors gets the full tensors saved from the GPU."""
    base, gpu, _ = runs
    state = pyckpt.load(str(base / "cuda1" / "ck.bin"))["objects"]
    got = {f"model.{k}": digest(v) for k, v in state["model"].items()}
    got.update({f"optimizer.{pid}.{k}": digest(v) for pid, entry in state["optimizer"]["state"].items()
                for k, v in entry.items()})
    assert got == _values(gpu["saved"])
    assert all(v.device.type == "cpu" for v in state["model"].values())


def test_a_two_rank_cpu_snapshot_restores_into_the_one_rank_cuda_model(runs):
    """Proves: resharding 2 -> 1 across devices: the CPU ranks' chunks land in the CUDA shards."""
    _, gpu, cpu = runs
    assert _values(gpu["resharded"]) == _values(cpu)
    assert set(v for k, v in cpu.items() if k.endswith("@device")) == {"cpu"}
    assert set(v for k, v in gpu["resharded"].items() if k.endswith("@device")) == {"cuda"}
