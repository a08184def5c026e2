"""The processes of test_gpu_sharded.py. save_cpu: 2 gloo ranks snapshot an FSDP2 model on a CPU mesh
(after an AdamW step). on_device: one rank (nccl on CUDA; gloo on the CPU when asked, which is how this
is checked on machines without a GPU) snapshots the same model as FSDP2 on a 1-rank mesh of the
device, restores it into a fresh model and a fresh optimizer, and restores the 2-rank CPU snapshot
(resharded 2 -> 1, CPU -> device). Each writes the xxh3 of every full tensor it saw to <base>/*.json.
"""
from __future__ import annotations

import json
import os
from datetime import timedelta

import torch
import torch.distributed as dist
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.fsdp import fully_shard
from torch.distributed.tensor import DTensor
from xxhash import xxh3_64_hexdigest

import pyckpt


class Net(torch.nn.Module):
    """Uneven rows over 2 ranks (13), a bf16 layer, a 1-row weight, an int buffer."""

    def __init__(self, seed: int):
        super().__init__()
        torch.manual_seed(seed)
        self.a = torch.nn.Linear(7, 13)
        self.b = torch.nn.Linear(13, 6, dtype=torch.bfloat16)
        self.c = torch.nn.Linear(6, 1)
        self.register_buffer("count", torch.arange(5))

    def forward(self, x):
        h = torch.relu(self.a(x))
        return self.c(torch.relu(self.b(h.bfloat16()).float()))


def build(seed: int, device: str):
    mesh = init_device_mesh(device, (dist.get_world_size(),))
    model = Net(seed).to(device)
    for layer in (model.a, model.b, model.c):
        fully_shard(layer, mesh=mesh)
    fully_shard(model, mesh=mesh)
    return model, torch.optim.AdamW(model.parameters(), lr=0.01, weight_decay=0.1)


def step(model, optimizer, device: str) -> None:
    """One AdamW step on the global batch (each rank its rows; FSDP2 averages the gradients)."""
    world, rank = dist.get_world_size(), dist.get_rank()
    gen = torch.Generator().manual_seed(5)
    x, y = torch.randn(8, 7, generator=gen), torch.randn(8, 1, generator=gen)
    lo, hi = 8 * rank // world, 8 * (rank + 1) // world
    ((model(x[lo:hi].to(device)) - y[lo:hi].to(device)) ** 2).mean().backward()
    optimizer.step()
    optimizer.zero_grad()


def digest(tensor: torch.Tensor) -> str:
    tensor = tensor.detach().cpu().contiguous()
    return f"{tensor.dtype}{tuple(tensor.shape)}:" + xxh3_64_hexdigest(tensor.view(-1).view(torch.uint8).numpy())


def digests(model, optimizer) -> dict[str, str]:
    """xxh3 of every full tensor of the model and the optimizer state, and where the sharded ones live."""
    out = {}
    full = {f"model.{k}": v for k, v in model.state_dict().items()}
    for pid, entry in optimizer.state_dict()["state"].items():
        full.update({f"optimizer.{pid}.{k}": v for k, v in entry.items()})
    for key, value in sorted(full.items()):
        if isinstance(value, DTensor):
            out[f"{key}@device"] = value.to_local().device.type
            value = value.full_tensor()
        out[key] = digest(value)
    return out


def _runtime(model, optimizer) -> pyckpt.TrainingRuntime:
    runtime = pyckpt.TrainingRuntime()
    runtime.register_model(model)
    runtime.register_optimizer(optimizer)
    return runtime


def save_cpu(rank: int, port: int, base: str) -> None:
    os.environ["OMP_NUM_THREADS"] = "1"
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=2,
                            timeout=timedelta(seconds=120))
    with pyckpt.DistributedCoordinator(pyckpt.load_config(environ={"BACKEND": "gloo"})) as coordinator:
        model, optimizer = build(0, "cpu")
        step(model, optimizer, "cpu")
        coordinator.snapshot(f"{base}/cpu2/ck.bin", _runtime(model, optimizer))
        saved = digests(model, optimizer)
    if rank == 0:
        with open(f"{base}/cpu2.json", "w") as f:
            json.dump(saved, f)
    dist.destroy_process_group()


def on_device(_: int, base: str, device: str) -> None:
    """World size 1 on `device` ("cuda": nccl; "cpu": gloo)."""
    os.environ["OMP_NUM_THREADS"] = "1"
    backend = "nccl" if device == "cuda" else "gloo"
    result = {}
    with pyckpt.DistributedCoordinator(pyckpt.load_config(environ={"BACKEND": backend})) as coordinator:
        model, optimizer = build(0, device)
        step(model, optimizer, device)
        coordinator.snapshot(f"{base}/{device}1/ck.bin", _runtime(model, optimizer))
        result["saved"] = digests(model, optimizer)
        fresh, fresh_optimizer = build(1, device)
        result["fresh_before"] = digests(fresh, fresh_optimizer)
        coordinator.restore(f"{base}/{device}1/ck.bin", _runtime(fresh, fresh_optimizer))
        result["restored"] = digests(fresh, fresh_optimizer)
        resharded, resharded_optimizer = build(2, device)
        coordinator.restore(f"{base}/cpu2/ck.bin", _runtime(resharded, resharded_optimizer))
        result["resharded"] = digests(resharded, resharded_optimizer)
        result["backend"] = dist.get_backend()
    with open(f"{base}/{device}1.json", "w") as f:
        json.dump(result, f)


if __name__ == "__main__":   # the CPU stand-in: python -m tests.gpu.gpu_worker <base>
    import sys

    import torch.multiprocessing as mp

    from tests.conftest import free_port
    mp.spawn(save_cpu, args=(free_port(), sys.argv[1]), nprocs=2, join=True)
    mp.spawn(on_device, args=(sys.argv[1], "cpu"), nprocs=1, join=True)
