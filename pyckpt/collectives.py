"""The few collectives a snapshot or a restore needs, over pyckpt's own gloo group (or their
single-process equivalents), and which ranks share a machine."""
from __future__ import annotations

import os
import socket
from typing import Any

import torch.distributed as dist


class Comm:
    """broadcast / gather / all_gather of picklable objects among the job's ranks."""

    def __init__(self, group: Any = None, rank: int = 0, world_size: int = 1):
        self.group, self.rank, self.world_size = group, rank, world_size

    def broadcast(self, obj: Any) -> Any:
        if self.world_size == 1:
            return obj
        box = [obj]
        dist.broadcast_object_list(box, src=0, group=self.group)
        return box[0]

    def gather(self, obj: Any) -> list[Any] | None:
        if self.world_size == 1:
            return [obj]
        out = [None] * self.world_size if self.rank == 0 else None
        dist.gather_object(obj, out, dst=0, group=self.group)
        return out

    def all_gather(self, obj: Any) -> list[Any]:
        if self.world_size == 1:
            return [obj]
        out: list[Any] = [None] * self.world_size
        dist.all_gather_object(out, obj, group=self.group)
        return out


def process_space() -> str:
    """Which processes can read each other's memory by pid: those on one running kernel (the boot id,
    not the host name: containers share the host's kernel) and in one pid namespace (a pid means
    another process, or none, in another container)."""
    try:
        with open("/proc/sys/kernel/random/boot_id") as f:
            boot = f.read().strip()
    except OSError:
        boot = socket.gethostname()
    try:
        namespace = os.readlink("/proc/self/ns/pid")
    except OSError:
        namespace = f"host {socket.gethostname()}"   # unknown: do not share with anyone on another host
    return f"{boot} {namespace}"
