"""The sharded states of the sharded bench: the bench's models under FSDP2 on a CPU mesh, AdamW after a step.

Every rank builds the whole model from the same seed, then `fully_shard` keeps its shards; the "step"
sets each gradient from its parameter (elementwise), so the global state is bit-identical whatever
the number of ranks: a snapshot of N ranks restored on M ranks is checked against M's own build.
"""
from __future__ import annotations

import math

import torch
import xxhash

from . import state as st


def uneven(n: int) -> int:
    """The first n' >= n divisible by neither 3 nor 4 (4097 rows do not split evenly on 3 or 4 ranks)."""
    n = max(n, 13)
    while n % 3 == 0 or n % 4 == 0:
        n += 1
    return n


def build(kind: str, total_bytes: int, mesh, small_tensors: int = 20_000):
    """(model, optimizer): kind "large" (8 Linear layers, each sharded) or "small" (small_tensors
    tensors in all, counting AdamW's state), ~total_bytes of params + exp_avg + exp_avg_sq."""
    from torch.distributed.fsdp import fully_shard
    torch.manual_seed(0)
    param_bytes = total_bytes // 3
    if kind == "large":
        model: torch.nn.Module = st.Stack(8, uneven(int(math.sqrt(param_bytes / 4 / 8))))
        for layer in model.layers:
            fully_shard(layer, mesh=mesh)
    elif kind == "small":
        count = max(1, small_tensors // 4)
        model = st.Many(count, uneven(param_bytes // 4 // count))
    else:
        raise ValueError(kind)
    fully_shard(model, mesh=mesh)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3, weight_decay=0.1)
    with torch.no_grad():
        for p in model.parameters():
            p.grad = p.detach() * 1e-3 + 1e-4
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    return model, optimizer


def named_state(model, optimizer) -> dict[str, torch.Tensor]:
    """{name: tensor (DTensor where sharded)} of the model and optimizer state."""
    out = {f"model.{k}": v for k, v in model.state_dict().items()}
    for pid, entry in optimizer.state_dict()["state"].items():
        for name, value in entry.items():
            if isinstance(value, torch.Tensor):
                out[f"optimizer.{pid}.{name}"] = value
    return out


def local(t: torch.Tensor) -> torch.Tensor:
    from torch.distributed.tensor import DTensor
    return t.to_local() if isinstance(t, DTensor) else t


def local_tensors(model, optimizer) -> list[torch.Tensor]:
    """This rank's part of the state: the local shards of the sharded tensors, the others whole."""
    return [local(t) for t in named_state(model, optimizer).values()]


def local_bytes(model, optimizer) -> int:
    return sum(t.numel() * t.element_size() for t in local_tensors(model, optimizer))


def digest(t: torch.Tensor) -> str:
    t = t.detach().contiguous()
    return f"{t.dtype}{tuple(t.shape)}:" + xxhash.xxh3_64_hexdigest(t.view(-1).view(torch.uint8).numpy())


def local_digests(model, optimizer) -> list[str]:
    """xxh3 of this rank's local tensors: compared with the same rank's build, bit-exact and cheap."""
    return [digest(t) for t in local_tensors(model, optimizer)]


def full_digests(model, optimizer) -> dict[str, str]:
    """xxh3 of every full tensor (a collective: each sharded tensor is gathered once)."""
    from torch.distributed.tensor import DTensor
    return {k: digest(v.full_tensor() if isinstance(v, DTensor) else v)
            for k, v in named_state(model, optimizer).items()}


def plain_digests(state: dict) -> dict[str, str]:
    """The same names and digests from pyckpt.load's result (full tensors in a plain process)."""
    out = {f"model.{k}": digest(v) for k, v in state["objects"]["model"].items()}
    for pid, entry in state["objects"]["optimizer"]["state"].items():
        for name, value in entry.items():
            if isinstance(value, torch.Tensor):
                out[f"optimizer.{pid}.{name}"] = digest(value)
    return out


def scramble(model, optimizer) -> None:
    with torch.no_grad():
        for t in local_tensors(model, optimizer):
            t.zero_()
