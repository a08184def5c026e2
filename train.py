#!/usr/bin/env python3
"""Distributed fine-tuning example (the spec's), runnable on CPU.

    python train.py                                  # single process (DISTRIBUTED_MODE=single)
    torchrun --nproc_per_node=2 train.py             # several processes on one machine
    NODE_RANK=k python train.py                      # one process per node, config/distributed.<mode>.env

A small MLP on a synthetic regression set, DDP, a snapshot every --checkpoint-interval steps to the
same path, and a resume that continues at the exact step and the exact sample: an interrupted and
resumed run ends bit-identical to an uninterrupted one. The data position is global
(pyckpt.ElasticSampler), so a job resumed on another number of ranks (torchrun's elastic rendezvous
after a node is lost) trains every sample of the epoch once, none twice. `--parallel fsdp` shards
the model and optimizer with FSDP2 (`fully_shard`) over all ranks, `--parallel hsdp` replicates between
nodes and shards within one; pyckpt snapshots the shards and restores them on any world size.
"""
from __future__ import annotations

import argparse
import os
import random
import signal
import socket
import sys
import time
from pathlib import Path

import numpy as np
import torch
import xxhash
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.fsdp import fully_shard
from torch.distributed.tensor import DTensor
from torch.nn.parallel import DistributedDataParallel
import torch.distributed as dist
from torch.utils.data import TensorDataset

from pyckpt import DistributedCoordinator, ElasticSampler, TrainingRuntime, load_config


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--steps", type=int, default=200, help="total optimizer steps (default 200)")
    p.add_argument("--checkpoint-interval", type=int, default=20, help="snapshot every K steps (default 20)")
    p.add_argument("--snapshot-path", default=None,
                   help="default: the config's SNAPSHOT_PATH (a path or s3:// URL), else $SHARED_FS_PATH/checkpoint.bin")
    p.add_argument("--config-dir", default=os.environ.get("PYCKPT_CONFIG_DIR", str(Path(__file__).parent / "config")))
    p.add_argument("--seed", type=int, default=1234)
    p.add_argument("--batch-size", type=int, default=32,
                   help="per rank (default 32): a step takes batch-size x world-size samples")
    p.add_argument("--samples", type=int, default=4096, help="size of the synthetic dataset")
    p.add_argument("--hidden", type=int, default=128)
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--log-every", type=int, default=10)
    p.add_argument("--async-snapshots", action="store_true",
                   help="snapshot in the background (training blocks only for one copy of the state)")
    p.add_argument("--parallel", choices=("ddp", "fsdp", "hsdp"), default="ddp",
                   help="ddp (default): replicated model; fsdp: FSDP2 over all ranks; hsdp: FSDP2 within a node, "
                        "replicated between nodes")
    p.add_argument("--keep-last", type=int, default=2, help="committed versions to keep (default 2)")
    p.add_argument("--step-delay", type=float, default=0.0, help="sleep per step (to watch or interrupt a run)")
    p.add_argument("--sample-log", default=None,
                   help="append each step's sample indices to SAMPLE_LOG.rank<N> (to check the data order)")
    p.add_argument("--crash-at-step", type=int, default=None,
                   help="simulate a crash: SIGKILL this process right after this step (before its snapshot)")
    return p.parse_args(argv)


def synthetic_dataset(samples: int, seed: int) -> TensorDataset:
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(samples, 32, generator=g)
    w = torch.randn(32, 1, generator=g)
    y = torch.tanh(x @ w) + 0.05 * torch.randn(samples, 1, generator=g)
    return TensorDataset(x, y)


def build_model(hidden: int) -> torch.nn.Module:
    return torch.nn.Sequential(
        torch.nn.Linear(32, hidden), torch.nn.ReLU(), torch.nn.Dropout(0.1),
        torch.nn.Linear(hidden, hidden), torch.nn.ReLU(), torch.nn.Linear(hidden, 1),
    )


def param_digest(model: torch.nn.Module) -> str:
    """xxh3 of the full parameters (sharded ones gathered: a collective, so every rank calls it)."""
    h = xxhash.xxh3_64()
    for tensor in model.state_dict().values():
        if isinstance(tensor, DTensor):
            tensor = tensor.full_tensor()
        h.update(tensor.detach().cpu().contiguous().numpy().tobytes())
    return h.hexdigest()


def parallelize(model: torch.nn.Module, parallel: str, device: torch.device, world: int,
                per_node: int) -> torch.nn.Module:
    """The module to train: DDP (replicated), or the model itself sharded in place with FSDP2."""
    if parallel == "ddp":
        # DDP re-buckets gradients after its first iteration, which changes gloo's summation order for
        # more than 2 ranks; a resumed job's first iteration would then round differently. Without the
        # rebuild (find_unused_parameters=True) the layout is the same in every run: bit-exact resumes.
        return DistributedDataParallel(model, find_unused_parameters=True)   # initialize() made a group
    if parallel == "fsdp" or world % per_node:
        mesh = init_device_mesh(device.type, (world,))
    else:   # replicate between nodes, shard within one
        mesh = init_device_mesh(device.type, (world // per_node, per_node), mesh_dim_names=("replicate", "shard"))
    for layer in model:
        if isinstance(layer, torch.nn.Linear):
            fully_shard(layer, mesh=mesh)
    return fully_shard(model, mesh=mesh)


def announce_group(config, world: int) -> None:
    """One line per node (its first process) at every start: the group this run formed. With torchrun's
    elastic rendezvous the node ranks and the node count come from the rendezvous; status.yml reads it."""
    hosts = [socket.gethostname()]
    if world > 1:
        hosts = [None] * world
        dist.all_gather_object(hosts, socket.gethostname())
    members = list(dict.fromkeys(hosts))   # node-rank order: ranks are numbered node by node
    if config.local_rank == 0:
        print(f"group: world_size={world} nodes={len(members)} node_rank={config.node_rank} "
              f"restart={os.environ.get('TORCHELASTIC_RESTART_COUNT', '0')} members={','.join(members)}", flush=True)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    config = load_config(config_dir=args.config_dir)
    coordinator = DistributedCoordinator(config, keep_last=args.keep_last)
    coordinator.initialize()
    rank, world = coordinator.rank, coordinator.world_size
    device = torch.device(f"cuda:{config.local_rank}" if config.backend == "nccl" else "cpu")
    path = args.snapshot_path or config.snapshot_path
    if "://" not in path:   # a directory on the shared filesystem; object storage (s3://) has none to make
        os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)

    def say(message: str) -> None:
        if rank == 0:
            print(message, flush=True)

    torch.manual_seed(args.seed)
    model = build_model(args.hidden).to(device)
    net = parallelize(model, args.parallel, device, world, config.nproc_per_node)
    optimizer = torch.optim.AdamW(model.parameters(), lr=args.lr)
    scheduler = torch.optim.lr_scheduler.StepLR(optimizer, step_size=100, gamma=0.5)
    # Per-rank randomness (dropout) differs between ranks but is reproducible on resume.
    torch.manual_seed(args.seed + 1 + rank)
    random.seed(args.seed + rank)
    np.random.seed(args.seed + rank)

    dataset = synthetic_dataset(args.samples, args.seed)
    if args.samples < args.batch_size * world:
        raise SystemExit(f"--samples {args.samples} gives no full batch of {args.batch_size} on {world} ranks")
    sampler = ElasticSampler(args.samples, batch_size=args.batch_size, rank=rank, world_size=world, seed=args.seed)

    runtime = TrainingRuntime()
    runtime.register_model(model)
    runtime.register_optimizer(optimizer)
    runtime.register("lr_scheduler", scheduler)
    runtime.register("data", sampler)
    announce_group(config, world)
    # missing_ok rather than os.path.exists: the path may be in object storage (s3://)
    if coordinator.restore(path, runtime, missing_ok=True):
        digest = param_digest(model)   # what was restored, before a step changes it
        say(f"resumed from {path} at step {runtime.step} (epoch {sampler.epoch}, sample {sampler.position}) "
            f"version={runtime.restored_version} param_xxh3={digest}")
    else:
        say(f"no snapshot at {path}: starting from step 0")
    say(f"training: mode={config.mode} world_size={world} backend={config.backend} parallel={args.parallel} "
        f"steps={args.steps} "
        f"snapshot every {args.checkpoint_interval} to {path}")

    step = runtime.step
    loss_fn = torch.nn.MSELoss()
    started = time.perf_counter()
    sample_log = open(f"{args.sample_log}.rank{rank}", "a") if args.sample_log else None
    while step < args.steps:
        chosen = sampler.next_batch()
        if sample_log:
            print(f"step={step + 1} epoch={sampler.epoch} world={world} samples={','.join(map(str, chosen))}",
                  file=sample_log, flush=True)
        x, y = dataset[chosen]
        net.train()
        optimizer.zero_grad(set_to_none=True)
        loss = loss_fn(net(x.to(device)), y.to(device))
        loss.backward()
        optimizer.step()
        scheduler.step()
        step += 1
        runtime.set_step(step)
        runtime.set_epoch(sampler.epoch)
        runtime.set_loss(loss.item())
        if step % args.log_every == 0:
            say(f"step {step} epoch {sampler.epoch} loss {loss.item():.6f}")
        if args.crash_at_step == step:
            say(f"simulated crash at step {step} (SIGKILL)")
            os.kill(os.getpid(), signal.SIGKILL)
        if step % args.checkpoint_interval == 0 or step == args.steps:
            info = coordinator.snapshot(path, runtime, blocking=not args.async_snapshots)
            if not args.async_snapshots:
                say(f"snapshot {info.version} at step {step} ({info.seconds * 1000:.0f} ms)")
        if args.step_delay:
            time.sleep(args.step_delay)
    coordinator.wait()
    say(f"FINAL step={step} param_xxh3={param_digest(model)} seconds={time.perf_counter() - started:.1f}")
    coordinator.shutdown()
    return 0


if __name__ == "__main__":
    sys.exit(main())
