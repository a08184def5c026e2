"""The synthetic training states every library is measured on: a model plus its Adam state after a step."""
from __future__ import annotations

import math

import torch
import xxhash


class Stack(torch.nn.Module):
    """`layers` square Linear layers (weights + biases): few, large tensors."""

    def __init__(self, layers: int, dim: int):
        super().__init__()
        self.layers = torch.nn.ModuleList(torch.nn.Linear(dim, dim) for _ in range(layers))

    def forward(self, x):
        for layer in self.layers:
            x = torch.tanh(layer(x))
        return x


class Many(torch.nn.Module):
    """`count` small parameters: real models have many small tensors (norms, biases, embeddings)."""

    def __init__(self, count: int, numel: int):
        super().__init__()
        self.params = torch.nn.ParameterList(torch.nn.Parameter(torch.randn(numel) * 0.01) for _ in range(count))

    def forward(self, x):
        return sum((p * x[: p.numel()]).sum() for p in self.params)


def build(kind: str, total_bytes: int, seed: int = 0, small_tensors: int = 20_000
          ) -> tuple[torch.nn.Module, torch.optim.Optimizer]:
    """A model + Adam after one step whose state (params, exp_avg, exp_avg_sq) is ~total_bytes.

    kind "large": 8 square Linear layers. kind "small": small_tensors/4 parameters, so with Adam's
    exp_avg, exp_avg_sq and step tensors the state holds `small_tensors` tensors of the same total bytes.
    """
    torch.manual_seed(seed)
    param_bytes = total_bytes // 3          # params + exp_avg + exp_avg_sq
    if kind == "large":
        layers = 8
        dim = max(8, int(math.sqrt(param_bytes / 4 / layers)))
        model: torch.nn.Module = Stack(layers, dim)
    elif kind == "small":
        count = max(1, small_tensors // 4)
        numel = max(1, param_bytes // 4 // count)
        model = Many(count, numel)
    else:
        raise ValueError(kind)
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-3)
    with torch.no_grad():  # one "step": gradients set directly, cheaper than a backward pass at GiB sizes
        for p in model.parameters():
            p.grad = torch.randn_like(p) * 1e-3
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    return model, optimizer


def state_tensors(model: torch.nn.Module, optimizer: torch.optim.Optimizer) -> list[torch.Tensor]:
    out = list(model.state_dict().values())
    for per_param in optimizer.state_dict()["state"].values():
        out.extend(v for v in per_param.values() if isinstance(v, torch.Tensor))
    return out


def state_bytes(model, optimizer) -> int:
    return sum(t.numel() * t.element_size() for t in state_tensors(model, optimizer))


def flat_tensors(model, optimizer) -> dict[str, torch.Tensor]:
    """{name: tensor} for libraries that store a flat dict of tensors (safetensors)."""
    flat = {f"model.{k}": v for k, v in model.state_dict().items()}
    for pid, per_param in optimizer.state_dict()["state"].items():
        for key, value in per_param.items():
            flat[f"optim.{pid}.{key}"] = value if value.dim() else value.reshape(1)
    return flat


def load_flat(model, optimizer, flat: dict[str, torch.Tensor]) -> None:
    """Put a flat dict (as written by flat_tensors) back into the model and optimizer."""
    model.load_state_dict({k[len("model."):]: v for k, v in flat.items() if k.startswith("model.")})
    sd = optimizer.state_dict()
    state: dict = {}
    for pid, per_param in sd["state"].items():
        state[pid] = {key: flat[f"optim.{pid}.{key}"].reshape(value.shape) for key, value in per_param.items()}
    optimizer.load_state_dict({"state": state, "param_groups": sd["param_groups"]})


def fingerprint(model, optimizer) -> list[str]:
    """xxh3 of every state tensor: a restore is checked bit-exact without a second copy in memory."""
    return [xxhash.xxh3_64_hexdigest(t.contiguous().view(-1).view(torch.uint8).numpy())
            for t in state_tensors(model, optimizer)]


def assert_equal(model, optimizer, ref: list[str], who: str) -> None:
    """The restored state must be bit-identical to what was saved (each library is checked)."""
    if fingerprint(model, optimizer) != ref:
        raise AssertionError(f"{who}: restored state differs from the saved state")


def scramble(model, optimizer) -> None:
    """Overwrite the live state so a restore that does nothing cannot pass the equality check."""
    with torch.no_grad():
        for t in state_tensors(model, optimizer):
            t.zero_()
