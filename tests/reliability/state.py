"""Identifiable snapshot content for the reliability tests: everything is derived from the step number.

make_state(step) is bit-for-bit reproducible, so a restored snapshot can be compared with the
reference of the step it claims to be, and any mix of two snapshots (one tensor from step s, another
from s+1, or rank 1's private state from another version) shows up as a mismatch.
"""
from __future__ import annotations

import numpy as np
import torch

DEFAULT_SIZE = 2 << 20   # bytes of tensor data per snapshot (a snapshot takes some ms: kills land inside it)


def make_state(step: int, size: int = DEFAULT_SIZE) -> dict:
    g = torch.Generator().manual_seed(step)
    return {
        "f32": torch.randn(size // 2 // 4, generator=g),
        "i64": torch.randint(-(2 ** 62), 2 ** 62, (size // 4 // 8,), generator=g),
        "bf16": torch.randn(size // 4 // 2, generator=g).to(torch.bfloat16).reshape(-1, 64),
        "small": torch.full((3,), float(step), dtype=torch.float64),
        "np": np.random.RandomState(step % (2 ** 32)).randint(0, 255, size=(97,), dtype=np.uint8),
        "step": step,
        "size": size,
    }


def reference_for(saved: dict) -> dict:
    """The reference of the step (and size) a loaded blob claims to be."""
    size = saved.get("size") if isinstance(saved, dict) else None
    size = size if isinstance(size, int) and 0 < size <= 64 << 20 else DEFAULT_SIZE
    return make_state(saved["step"] if isinstance(saved, dict) and isinstance(saved.get("step"), int) else -1, size)


def rng_seed(step: int, rank: int) -> int:
    return step * 1000 + rank


def loss(step: int, rank: int) -> float:
    return step * 10.0 + rank


class Blob:
    """A registered object whose state_dict is make_state(step); load_state_dict keeps what it gets."""

    def __init__(self, step: int = 0, size: int = DEFAULT_SIZE):
        self.size = size
        self.state = make_state(step, size)
        self.loaded: dict | None = None

    def set_step(self, step: int, in_place: bool = False) -> None:
        new = make_state(step, self.size)
        if in_place:  # overwrite the same tensors: an async snapshot must have copied them already
            for key, value in new.items():
                if isinstance(value, torch.Tensor):
                    self.state[key].copy_(value)
                elif isinstance(value, np.ndarray):
                    self.state[key][...] = value
                else:
                    self.state[key] = value
        else:
            self.state = new

    def state_dict(self) -> dict:
        return self.state

    def load_state_dict(self, state: dict) -> None:
        self.loaded = state


def same(a, b) -> bool:
    """Bit-exact equality of two state trees (dtype, shape and bytes)."""
    if isinstance(a, torch.Tensor):
        return (isinstance(b, torch.Tensor) and a.dtype == b.dtype and a.shape == b.shape
                and torch.equal(a.view(torch.uint8) if a.numel() else a, b.view(torch.uint8) if b.numel() else b))
    if isinstance(a, np.ndarray):
        return isinstance(b, np.ndarray) and a.dtype == b.dtype and a.shape == b.shape and a.tobytes() == b.tobytes()
    if isinstance(a, dict):
        return isinstance(b, dict) and a.keys() == b.keys() and all(same(a[k], b[k]) for k in a)
    if isinstance(a, (list, tuple)):
        return type(a) is type(b) and len(a) == len(b) and all(same(x, y) for x, y in zip(a, b))
    return type(a) is type(b) and a == b
