"""The ranks of the sharded-state tests (test_sharded.py): FSDP2, HSDP and FSDP2 + tensor parallel on a
CPU device mesh over gloo. One job per world size W, all side by side: each trains a few steps and
snapshots on W ranks (also with DCP, the reference), waits until every job has saved, then restores
every saved snapshot on its W ranks, into fresh models and optimizers that have not stepped, and trains
on. Each rank writes what it saw to <base>/<save|restore>-<W>-<rank>.json; the test compares.
"""
from __future__ import annotations

import json
import os
import sys
import time
from datetime import timedelta

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.fsdp import fully_shard
from torch.distributed.tensor import DTensor
from torch.distributed.tensor.parallel import ColwiseParallel, RowwiseParallel, parallelize_module
from xxhash import xxh3_64_hexdigest

import pyckpt
import pyckpt.reader
import pyckpt.shards

STEPS, MORE = 3, 3       # steps before the snapshot, and after it
BATCH = 12               # global batch: divisible by 1, 2, 3 and 4 ranks
SMALL_PIECE = 4096       # pieces of the sharded tensors, so that bytes read can be bounded tightly


class Net(torch.nn.Module):
    """Uneven rows over 3 and 4 ranks (13, 4097), a bf16 layer, a 1-row weight (empty shards), an int
    buffer (plain, replicated)."""

    def __init__(self, seed: int):
        super().__init__()
        torch.manual_seed(seed)
        self.a = torch.nn.Linear(7, 13)
        self.b = torch.nn.Linear(13, 6, dtype=torch.bfloat16)
        self.wide = torch.nn.Linear(6, 4097)
        self.c = torch.nn.Linear(4097, 1)
        self.register_buffer("count", torch.arange(5))

    def forward(self, x):
        h = torch.relu(self.a(x))
        h = torch.relu(self.b(h.bfloat16()).float())
        return self.c(torch.tanh(self.wide(h)))


class TPNet(torch.nn.Module):
    def __init__(self, seed: int):
        super().__init__()
        torch.manual_seed(seed)
        self.up = torch.nn.Linear(7, 10)
        self.down = torch.nn.Linear(10, 3)

    def forward(self, x):
        return self.down(torch.relu(self.up(x))).sum(-1, keepdim=True)


def build(kind: str, seed: int):
    """A model, its optimizer (no state yet), and the mesh used."""
    world = dist.get_world_size()
    if kind == "tp":
        mesh = init_device_mesh("cpu", (2, world // 2), mesh_dim_names=("dp", "tp"))
        model = TPNet(seed)
        parallelize_module(model, mesh["tp"], {"up": ColwiseParallel(), "down": RowwiseParallel()})
        fully_shard(model, mesh=mesh["dp"])
    else:
        model = Net(seed)
        if kind in ("fsdp", "hsdp"):
            mesh = init_device_mesh("cpu", (world,)) if kind == "fsdp" else \
                init_device_mesh("cpu", (2, world // 2), mesh_dim_names=("replicate", "shard"))
            for layer in (model.a, model.b, model.wide, model.c):
                fully_shard(layer, mesh=mesh)
            fully_shard(model, mesh=mesh)
    return model, torch.optim.AdamW(model.parameters(), lr=0.01, weight_decay=0.1)


def train(model, optimizer, kind: str, first: int, steps: int) -> list[float]:
    """Global-batch losses of steps first.. (each rank its slice of the batch; sums, so that the
    gradient is the batch's whatever the world size)."""
    world, rank = dist.get_world_size(), dist.get_rank()
    dp = world // 2 if kind == "tp" else world
    dp_rank = rank // 2 if kind == "tp" else rank
    losses = []
    for step in range(first, first + steps):
        gen = torch.Generator().manual_seed(1000 + step)
        x, y = torch.randn(BATCH, 7, generator=gen), torch.randn(BATCH, 1, generator=gen)
        lo, hi = BATCH * dp_rank // dp, BATCH * (dp_rank + 1) // dp
        loss = ((model(x[lo:hi]) - y[lo:hi]) ** 2).sum()
        (loss * (dp if kind in ("fsdp", "hsdp", "tp") else 1) / BATCH).backward()
        if kind == "ddp":   # plain model on every rank: average the gradients as DDP would
            for p in model.parameters():
                dist.all_reduce(p.grad)
                p.grad /= world
        optimizer.step()
        optimizer.zero_grad()
        total = loss.detach().clone()
        dist.all_reduce(total)
        losses.append(total.item() / BATCH / (2 if kind == "tp" else 1))
    return losses


def full(value):
    return value.full_tensor() if isinstance(value, DTensor) else value


def digests(model, optimizer) -> dict[str, str]:
    """xxh3 of every full tensor of the model and optimizer state (a collective for sharded ones)."""
    out = {}
    for key, value in model.state_dict().items():
        out[f"model.{key}"] = _digest(full(value))
    for pid, entry in sorted(optimizer.state_dict()["state"].items()):
        for name, value in sorted(entry.items()):
            out[f"optimizer.{pid}.{name}"] = _digest(full(value))
    return out


def _digest(tensor: torch.Tensor) -> str:
    tensor = tensor.detach().contiguous()
    return f"{tensor.dtype}{tuple(tensor.shape)}:" + xxh3_64_hexdigest(tensor.view(-1).view(torch.uint8).numpy())


def runtime_of(model, optimizer) -> pyckpt.TrainingRuntime:
    runtime = pyckpt.TrainingRuntime()
    runtime.register_model(model)
    runtime.register_optimizer(optimizer)
    return runtime


def save_round(base: str, coordinator) -> dict:
    world = dist.get_world_size()
    kinds = ["fsdp"] + (["ddp"] if world == 2 else []) + (["hsdp", "tp"] if world == 4 else [])
    result = {}
    derived, tables = [], []
    real_derive, real_rows = pyckpt.capture._derive, pyckpt.commit._chunk_rows
    pyckpt.capture._derive = lambda *args: derived.append(1) or real_derive(*args)
    pyckpt.commit._chunk_rows = lambda *args: tables.append(1) or real_rows(*args)
    for kind in kinds:
        model, optimizer = build(kind, seed=0)
        before = train(model, optimizer, kind, 0, STEPS)
        runtime = runtime_of(model, optimizer)
        info = coordinator.snapshot(f"{base}/{kind}{world}/ck.bin", runtime)
        saved = digests(model, optimizer)
        if kind == "fsdp":
            state, optim = get_state_dict(model, optimizer)
            dcp.save({"model": state, "optim": optim}, checkpoint_id=f"{base}/dcp{world}")
        after = train(model, optimizer, kind, STEPS, MORE)
        # the same runtime again, trained on: the capture's derived work and the leader's table are kept
        derives, built = len(derived), len(tables)
        coordinator.snapshot(f"{base}/{kind}{world}-again/ck.bin", runtime)
        result[kind] = {"digests": saved, "losses": before + after, "written": info.bytes_written,
                        "again": digests(model, optimizer), "again_derived": len(derived) - derives,
                        "again_tables": len(tables) - built, "tables": built}
    pyckpt.capture._derive, pyckpt.commit._chunk_rows = real_derive, real_rows
    return result


def restore_round(base: str, coordinator, saved_worlds: list[int]) -> dict:
    world = dist.get_world_size()
    read = []
    real_start = pyckpt.reader.ShardRead.start   # (run() starts and waits)

    def counted(self, *args, **kwargs):
        read.append(self.bytes_read)
        return real_start(self, *args, **kwargs)
    pyckpt.reader.ShardRead.start = counted
    result = {}
    cases = [(f"fsdp{n}", "fsdp") for n in saved_worlds] + [("ddp2", "fsdp"), ("fsdp4", "ddp"), ("fsdp3", "ddp")]
    if world == 4:
        cases += [("hsdp4", "hsdp"), ("hsdp4", "fsdp"), ("tp4", "tp")]
    if world == 2:
        cases += [("tp4", "tp"), ("tp4", "ddp_tp")]
    for name, kind in cases:
        model, optimizer = build("tp" if kind == "tp" else kind, seed=1) if kind != "ddp_tp" else \
            (TPNet(1), None)
        if optimizer is None:
            optimizer = torch.optim.AdamW(model.parameters(), lr=0.01, weight_decay=0.1)
            kind = "ddp"
        del read[:]
        coordinator.restore(f"{base}/{name}/ck.bin", runtime_of(model, optimizer))
        entry = {"digests": digests(model, optimizer), "read": sum(read), "needed": _needed(model, optimizer)}
        if name.startswith("fsdp") and kind == "fsdp":
            entry["losses"] = train(model, optimizer, kind, STEPS, MORE)
            reference, ref_optimizer = build(kind, seed=2)
            state, optim = get_state_dict(reference, ref_optimizer)
            dcp.load({"model": state, "optim": optim}, checkpoint_id=f"{base}/dcp{name[4:]}")
            set_state_dict(reference, ref_optimizer, model_state_dict=state, optim_state_dict=optim)
            entry["dcp_losses"] = train(reference, ref_optimizer, kind, STEPS, MORE)
        result[f"{name}->{kind}"] = entry
    pyckpt.reader.ShardRead.start = real_start
    return result


def _needed(model, optimizer) -> int:
    """Bytes of sharded state this rank holds (what a restore must read at least)."""
    total = 0
    for value in list(model.state_dict().values()) + [v for e in optimizer.state_dict()["state"].values()
                                                        for v in e.values()]:
        if isinstance(value, DTensor):
            total += value.to_local().nbytes
    return total


def _wait_for_saves(base: str, worlds: list[int], timeout: float = 600) -> None:
    """Until the jobs of every world size have saved (they run side by side, each its own group)."""
    deadline = time.monotonic() + timeout
    while not all(os.path.exists(f"{base}/saved-{w}") for w in worlds):
        if time.monotonic() > deadline:
            raise TimeoutError(f"the other jobs did not save within {timeout} s")
        time.sleep(0.5)


def main(rank: int, world: int, port: int, base: str, worlds: list[int]) -> None:
    """Save on this world size, wait for the jobs of the other sizes to save, restore all of them."""
    os.environ["OMP_NUM_THREADS"] = "1"
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world,
                            timeout=timedelta(seconds=600))
    pyckpt.shards.SHARD_PIECE = SMALL_PIECE
    with pyckpt.DistributedCoordinator(pyckpt.load_config(environ={}), keep_last=2) as coordinator:
        for round_ in ("save", "restore"):
            result = save_round(base, coordinator) if round_ == "save" else restore_round(base, coordinator, worlds)
            with open(f"{base}/{round_}-{world}-{rank}.json", "w") as f:
                json.dump(result, f)
            dist.barrier()
            if round_ == "save":
                if rank == 0:
                    open(f"{base}/saved-{world}", "w").close()
                _wait_for_saves(base, worlds)
    dist.destroy_process_group()


if __name__ == "__main__":
    import torch.multiprocessing as mp
    world_, port_, base_ = int(sys.argv[1]), int(sys.argv[2]), sys.argv[3]
    mp.spawn(main, args=(world_, port_, base_, [int(w) for w in sys.argv[4].split(",")]), nprocs=world_, join=True)
