"""The spec's "Example: Distributed Fine-tuning", kept as a user copies it.

Only the spec's three import lines are changed, from `src.*` to `pyckpt` (each keeps the spec's line
beside it). The spec leaves the model, the data and the loop's numbers to the reader: the block marked
"the reader's part" supplies the smallest ones that run on a CPU. tests/multiproc/test_spec_example.py
runs this file as `python spec_example.py` and as `torchrun --nproc_per_node=2 spec_example.py`.

Written from the spec's API lines as the project's design notes quote them (load_config, initialize,
DDP(model), register_model(model.module), restore when /shared/snapshots/checkpoint.bin exists,
runtime._epoch, set_epoch/set_step/set_loss, snapshot every N steps to the same path, shutdown); the
spec's full text was not at hand. Where the spec's own text differs, paste it below the reader's part
and keep the three pyckpt imports.
"""
import os

import torch
import torch.nn as nn
from torch.nn.parallel import DistributedDataParallel as DDP
from torch.utils.data import DataLoader, TensorDataset
from torch.utils.data.distributed import DistributedSampler

from pyckpt import DistributedCoordinator  # spec: from src.distributed.coordinator import DistributedCoordinator
from pyckpt import TrainingRuntime  # spec: from src.runtime.training_runtime import TrainingRuntime
from pyckpt import load_config  # spec: from src.distributed import load_config

# -- the reader's part ---------------------------------------------------------------------------------


def YourModel():  # noqa: N802 (the spec's name)
    return nn.Sequential(nn.Linear(16, 32), nn.ReLU(), nn.Linear(32, 1))


generator = torch.Generator().manual_seed(0)
dataset = TensorDataset(torch.randn(256, 16, generator=generator), torch.randn(256, 1, generator=generator))
num_epochs = 3
checkpoint_interval = 4

# -- the spec's example --------------------------------------------------------------------------------

# Load configuration
config = load_config()

# Initialize distributed environment
coordinator = DistributedCoordinator(config)
coordinator.initialize()

# Create model and wrap with DDP
model = YourModel()
model = DDP(model)
optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4)

# Create training runtime and register state
runtime = TrainingRuntime()
runtime.register_model(model.module)
runtime.register_optimizer(optimizer)

# Resume from the last snapshot if one exists
start_epoch = 0
if os.path.exists("/shared/snapshots/checkpoint.bin"):
    coordinator.restore("/shared/snapshots/checkpoint.bin", runtime)
    start_epoch = runtime._epoch

sampler = DistributedSampler(dataset)
train_loader = DataLoader(dataset, batch_size=16, sampler=sampler)

# Training loop
for epoch in range(start_epoch, num_epochs):
    sampler.set_epoch(epoch)
    for step, (inputs, targets) in enumerate(train_loader):
        optimizer.zero_grad()
        loss = nn.functional.mse_loss(model(inputs), targets)
        loss.backward()
        optimizer.step()

        runtime.set_epoch(epoch)
        runtime.set_step(step)
        runtime.set_loss(loss.item())

        # Snapshot every N steps
        if step % checkpoint_interval == 0:
            coordinator.snapshot("/shared/snapshots/checkpoint.bin", runtime)

coordinator.shutdown()
