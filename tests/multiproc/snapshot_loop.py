"""Test helper: snapshot a ~`--mib` MiB state stamped with the step number, forever or N times.

Run under torchrun (or alone). Every tensor of snapshot k is filled with k, so a restored snapshot
shows exactly which step it is and whether it mixes two steps. --sharded: the tensors are DTensors
sharded over all ranks (Shard(0) on a CPU mesh), as FSDP2 holds parameters.
"""
import argparse
import sys

import torch
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.tensor import Shard, distribute_tensor

from pyckpt import DistributedCoordinator, TrainingRuntime, load_config


class Stamped:
    def __init__(self, mib: int, mesh=None):
        self.tensors = {f"t{i}": torch.zeros(mib * (1 << 18) // 8) for i in range(8)}
        if mesh is not None:
            self.tensors = {k: distribute_tensor(t, mesh, [Shard(0)]) for k, t in self.tensors.items()}

    def fill(self, value: float) -> None:
        for t in self.tensors.values():
            t.fill_(value)

    def state_dict(self):
        return dict(self.tensors)

    def load_state_dict(self, state):
        for k, v in state.items():
            self.tensors[k].copy_(v)


def main() -> int:
    p = argparse.ArgumentParser()
    p.add_argument("path")
    p.add_argument("--mib", type=int, default=64)
    p.add_argument("--count", type=int, default=1000000)
    p.add_argument("--async-snapshots", action="store_true")
    p.add_argument("--sharded", action="store_true")
    args = p.parse_args()
    with DistributedCoordinator(load_config()) as coordinator:
        mesh = init_device_mesh("cpu", (coordinator.world_size,)) if args.sharded else None
        state = Stamped(args.mib, mesh)
        runtime = TrainingRuntime()
        runtime.register("stamped", state)
        for step in range(1, args.count + 1):
            state.fill(float(step))
            runtime.set_step(step)
            result = coordinator.snapshot(args.path, runtime, blocking=not args.async_snapshots)
            if args.async_snapshots:
                result.result()
            if coordinator.rank == 0:
                print(f"committed {step}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
