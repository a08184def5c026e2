"""The ranks of test_sharded_edges.py (2 gloo ranks, one spawn): sharded tensors of edge dtypes and
shapes snapshotted and restored into zeroed DTensors of the same layout; a Partial DTensor refused by
name; an FSDP1 model and its optimizer refused at registration. Each rank writes what it saw to
<out>.<rank> (JSON); the test compares with tensors it makes itself (full_values, the same seed).
"""
from __future__ import annotations

import json
import os
import warnings
from datetime import timedelta

import torch
import torch.distributed as dist
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.tensor import DTensor, Partial, Replicate, Shard, distribute_tensor

import pyckpt
from tests.conftest import StateHolder

# name: (shape, dtype, placement). distribute_tensor(src_data_rank=None) cuts each rank's shard from
# its own copy (the same seed everywhere): no collective, so gloo need not know float8.
LAYOUTS = {
    "bf16": ((6, 4), torch.bfloat16, Shard(0)),
    "fp16": ((5, 3), torch.float16, Shard(0)),                 # 3 + 2 rows
    "fp8": ((4, 8), torch.float8_e4m3fn, Shard(0)),
    "int64": ((7,), torch.int64, Shard(0)),                     # requires_grad=False
    "scalar": ((), torch.float32, Replicate()),                 # 0-d
    "one_row": ((1, 5), torch.float32, Shard(0)),               # rank 1's shard is empty
    "odd_cols": ((9, 7), torch.float64, Shard(1)),              # 4 + 3 columns: strided reads
    "big_replicated": ((300, 1000), torch.float32, Replicate()),  # 1.2 MB: split between the 2 holders
}


def full_values() -> dict[str, torch.Tensor]:
    """The full tensors every rank (and the test) makes from the same seed."""
    gen = torch.Generator().manual_seed(11)
    out = {}
    for name, (shape, dtype, _) in LAYOUTS.items():
        if dtype == torch.int64:
            out[name] = torch.randint(-2**62, 2**62, shape, generator=gen, dtype=torch.int64)
        else:   # random bits: every byte pattern of the dtype (NaNs included) must survive
            out[name] = torch.randint(0, 256, (*shape, dtype.itemsize), generator=gen, dtype=torch.uint8) \
                .view(dtype).reshape(shape)
    return out


class EdgeNet(torch.nn.Module):
    """Parameters that are DTensors on a 1-D mesh, holding `values` (or zeros), and a plain buffer
    that cannot be read in place (not contiguous: as a buffer on a GPU is not)."""

    def __init__(self, mesh, values: dict[str, torch.Tensor], zero: bool = False):
        super().__init__()
        self.register_buffer("strided", (torch.zeros(10) if zero else torch.arange(10.0))[::2])
        for name, (_, dtype, placement) in LAYOUTS.items():
            tensor = distribute_tensor(values[name], mesh, [placement], src_data_rank=None)
            grad = dtype.is_floating_point and dtype.itemsize > 1
            self.register_parameter(name, torch.nn.Parameter(tensor, requires_grad=grad))


def _bits(tensor: torch.Tensor) -> list[int]:
    return tensor.detach().contiguous().reshape(-1).view(torch.uint8).tolist()


def _expected_local(mesh, values) -> dict[str, list[int]]:
    return {name: _bits(distribute_tensor(values[name], mesh, [LAYOUTS[name][2]], src_data_rank=None).to_local())
            for name in LAYOUTS}


def _runtime(**objects) -> pyckpt.TrainingRuntime:
    runtime = pyckpt.TrainingRuntime(capture_rng=False)
    for name, obj in objects.items():
        if isinstance(obj, torch.nn.Module):
            runtime.register_model(obj, name)
        else:
            runtime.register(name, obj)
    return runtime


def refusals(mesh) -> dict[str, str]:
    """What registering FSDP1 and snapshotting a Partial DTensor say."""
    from torch.distributed.fsdp import FullyShardedDataParallel
    out = {}
    fsdp1 = FullyShardedDataParallel(torch.nn.Linear(3, 2), device_id=torch.device("cpu"))
    for what, call in (("fsdp1_model", lambda: pyckpt.TrainingRuntime().register_model(fsdp1)),
                       ("fsdp1_optimizer", lambda: pyckpt.TrainingRuntime().register_optimizer(
                           torch.optim.AdamW(fsdp1.parameters())))):
        try:
            call()
            out[what] = "accepted"
        except TypeError as exc:
            out[what] = f"TypeError: {exc}"
    return out


def main(rank: int, port: int, path: str, out: str) -> None:
    os.environ["OMP_NUM_THREADS"] = "1"
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=2,
                            timeout=timedelta(seconds=60))
    mesh = init_device_mesh("cpu", (2,))
    values = full_values()
    result = refusals(mesh)
    with pyckpt.DistributedCoordinator(pyckpt.load_config(environ={}), keep_last=2) as coordinator:
        partial = DTensor.from_local(torch.ones(3), mesh, [Partial()])
        try:
            coordinator.snapshot(path, _runtime(x=StateHolder({"p": partial})))
            result["partial"] = "accepted"
        except Exception as exc:
            result["partial"] = f"{type(exc).__name__}: {exc}"
            result["partial_cause"] = type(exc.__cause__).__name__
        saved = EdgeNet(mesh, values)
        coordinator.snapshot(path, _runtime(model=saved))
        zeroed = EdgeNet(mesh, {name: torch.zeros_like(v) for name, v in values.items()}, zero=True)
        before = {name: _bits(p.to_local()) for name, p in zeroed.named_parameters()}
        coordinator.restore(path, _runtime(model=zeroed))
        result["restored"] = {name: _bits(p.to_local()) for name, p in zeroed.named_parameters()}
        result["strided"] = zeroed.strided.tolist()
        result["expected"] = _expected_local(mesh, values)
        result["zeroed_differs"] = before != result["expected"]
        result["still_dtensors"] = all(isinstance(p, DTensor) for p in zeroed.parameters())
        changed = EdgeNet(mesh, {name: torch.zeros_like(v) for name, v in values.items()}, zero=True)
        changed.extra = torch.nn.Linear(2, 2)     # another structure: no sharded destinations, read whole
        with warnings.catch_warnings(record=True):
            coordinator.restore(path, _runtime(model=changed), strict=False)
        result["changed"] = {name: _bits(getattr(changed, name).to_local()) for name in LAYOUTS}
    with open(f"{out}.{rank}", "w") as f:
        json.dump(result, f)
    dist.destroy_process_group()
