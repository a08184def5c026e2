"""Test helper: under torchrun, `save` snapshots DDP-like state to an S3 URL (a model and its Adam
state, identical on every rank, plus a 24 MiB replicated buffer, with 5 MiB parts so every rank's
share is a multipart upload) and per-rank state (seeded by the rank); `restore` restores it into
zeroed objects. Both print "digest <rank> <name> <xxh3 of the bytes>" for what they hold."""
import argparse
import sys

import torch
from xxhash import xxh3_64_hexdigest

import pyckpt.s3_store as s3_store
from pyckpt import DistributedCoordinator, TrainingRuntime, load_config
from tests.conftest import StateHolder


def digest(tensor: torch.Tensor) -> str:
    return xxh3_64_hexdigest(tensor.detach().contiguous().reshape(-1).view(torch.uint8).numpy().tobytes())


def build(rank: int, filled: bool):
    torch.manual_seed(0)                          # the same model and step on every rank: replicated
    model = torch.nn.Sequential(torch.nn.Linear(64, 256), torch.nn.ReLU(), torch.nn.Linear(256, 8))
    optimizer = torch.optim.Adam(model.parameters(), lr=0.01)
    model(torch.randn(16, 64)).sum().backward()
    optimizer.step()
    g = torch.Generator().manual_seed(1)
    shared = {"buffer": torch.randn(6 << 20, generator=g)}
    mine = {"rng": torch.randint(0, 255, (1 << 20,), dtype=torch.uint8,
                                 generator=torch.Generator().manual_seed(100 + rank))}
    if not filled:
        with torch.no_grad():
            for p in model.parameters():
                p.zero_()
        optimizer = torch.optim.Adam(model.parameters(), lr=0.01)   # no state until restored
        shared = {k: torch.zeros_like(v) for k, v in shared.items()}
        mine = {k: torch.zeros_like(v) for k, v in mine.items()}
    runtime = TrainingRuntime()
    runtime.register_model(model)
    runtime.register_optimizer(optimizer)
    runtime.register("shared", StateHolder(shared))
    runtime.register("mine", StateHolder(mine), per_rank=True)
    return model, optimizer, shared, mine, runtime


def report(rank: int, model, optimizer, shared, mine) -> None:
    named = {f"model.{k}": v for k, v in model.state_dict().items()}
    for index, state in optimizer.state_dict()["state"].items():
        named.update({f"adam.{index}.{k}": v for k, v in state.items() if torch.is_tensor(v)})
    named.update({f"shared.{k}": v for k, v in shared.items()})
    named.update({f"mine.{k}": v for k, v in mine.items()})
    lines = "".join(f"digest {rank} {name} {digest(tensor)}\n" for name, tensor in sorted(named.items()))
    sys.stdout.write(lines)      # one write (< PIPE_BUF): the ranks' lines do not interleave
    sys.stdout.flush()


def main() -> int:
    p = argparse.ArgumentParser()
    p.add_argument("mode", choices=["save", "restore"])
    p.add_argument("url")
    args = p.parse_args()
    s3_store.PART_SIZE = 5 << 20
    with DistributedCoordinator(load_config(), keep_last=2) as coordinator:
        rank = coordinator.rank
        model, optimizer, shared, mine, runtime = build(rank, args.mode == "save")
        if args.mode == "save":
            runtime.set_step(5)
            coordinator.snapshot(args.url, runtime)
        else:
            assert coordinator.restore(args.url, runtime) and runtime.step == 5
        report(rank, model, optimizer, shared, mine)
    return 0


if __name__ == "__main__":
    sys.exit(main())
