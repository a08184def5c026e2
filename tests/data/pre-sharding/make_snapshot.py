"""Writes the pre-sharding snapshot in this directory with pyckpt as of commit 223ad33 (before sharded
state): a 1-rank gloo group, Linear(5, 3) + AdamW after one step + a StepLR scheduler, and
expected.json with the xxh3 of every tensor of the model and the optimizer state.

    git archive 223ad33 | tar -x -C /tmp/old
    cd /tmp && PYTHONPATH=/tmp/old python <repo>/tests/data/pre-sharding/make_snapshot.py <repo>/tests/data/pre-sharding
"""
from __future__ import annotations

import json
import os
import socket
import sys

import torch
import torch.distributed as dist
from xxhash import xxh3_64_hexdigest

import pyckpt


def digest(tensor: torch.Tensor) -> str:
    tensor = tensor.detach().contiguous()
    return f"{tensor.dtype}{tuple(tensor.shape)}:" + xxh3_64_hexdigest(tensor.view(-1).view(torch.uint8).numpy())


def main(out: str) -> None:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=0, world_size=1)
    torch.manual_seed(0)
    model = torch.nn.Linear(5, 3)
    optimizer = torch.optim.AdamW(model.parameters(), lr=0.01)
    scheduler = torch.optim.lr_scheduler.StepLR(optimizer, step_size=1, gamma=0.5)
    model(torch.randn(4, 5)).square().sum().backward()
    optimizer.step()
    scheduler.step()
    runtime = pyckpt.TrainingRuntime(capture_rng=False)
    runtime.register_model(model)
    runtime.register_optimizer(optimizer)
    runtime.register("scheduler", scheduler)
    runtime.set_step(1)
    with pyckpt.DistributedCoordinator(pyckpt.load_config(environ={}), keep_last=1) as coordinator:
        coordinator.snapshot(os.path.join(out, "checkpoint.bin"), runtime)
    expected = {f"model.{k}": digest(v) for k, v in model.state_dict().items()}
    for pid, entry in optimizer.state_dict()["state"].items():
        expected.update({f"optimizer.{pid}.{k}": digest(v) for k, v in entry.items()})
    expected["scheduler.last_epoch"] = scheduler.state_dict()["last_epoch"]
    with open(os.path.join(out, "expected.json"), "w") as f:
        json.dump(expected, f, indent=1, sort_keys=True)
    dist.destroy_process_group()


if __name__ == "__main__":
    main(sys.argv[1])
