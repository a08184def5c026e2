"""Where the job is in its data, as a global sample position that survives a change of world size.

torch's DistributedSampler gives rank r the samples perm[r::world_size]; a per-rank offset saved at one
world size means other samples at another, so an elastic job that shrinks or grows would train some
samples twice and skip others. ElasticSampler keeps (epoch, samples consumed) for the whole job: every
global step takes the next world_size x batch_size samples of the epoch's permutation, rank r the r-th
block of them. Register it with the runtime (it is the same on every rank, stored once); after a restore
on any world size the next step starts at the first sample no step has trained.
"""
from __future__ import annotations

import torch


class ElasticSampler:
    """This rank's batches of a seeded per-epoch shuffle of `samples` indices, resumable on any world size.

    The tail of an epoch smaller than one global batch is dropped (as DistributedSampler's drop_last=True),
    so which samples that is depends on the world size at the epoch's end."""

    def __init__(self, samples: int, *, batch_size: int, rank: int, world_size: int, seed: int = 0,
                 shuffle: bool = True):
        if samples < batch_size * world_size:
            raise ValueError(f"{samples} samples give no full global batch of {batch_size} x {world_size} ranks")
        self.samples, self.batch_size, self.seed, self.shuffle = samples, batch_size, seed, shuffle
        self.rank, self.world_size = rank, world_size
        self.epoch = 0
        self.position = 0          # samples of this epoch consumed by the steps taken so far, all ranks together
        self._order: tuple[int, torch.Tensor] | None = None

    def next_batch(self) -> list[int]:
        """The sample indices of this rank's part of the next global step; counts the step as taken."""
        step = self.batch_size * self.world_size
        if self.samples - self.position < step:   # the epoch's tail: dropped
            self.epoch, self.position = self.epoch + 1, 0
        start = self.position + self.rank * self.batch_size
        batch = self._permutation()[start:start + self.batch_size].tolist()
        self.position += step
        return batch

    def _permutation(self) -> torch.Tensor:
        if self._order is None or self._order[0] != self.epoch:
            if self.shuffle:
                order = torch.randperm(self.samples, generator=torch.Generator().manual_seed(self.seed + self.epoch))
            else:
                order = torch.arange(self.samples)
            self._order = (self.epoch, order)
        return self._order[1]

    # The job's position only: the rank and the world size are this run's, not the snapshot's.
    def state_dict(self) -> dict:
        return {"samples": self.samples, "seed": self.seed, "shuffle": self.shuffle,
                "epoch": self.epoch, "position": self.position}

    def load_state_dict(self, state: dict) -> None:
        saved = {key: state.get(key) for key in ("samples", "seed", "shuffle")}
        current = {"samples": self.samples, "seed": self.seed, "shuffle": self.shuffle}
        if saved != current:
            changed = ", ".join(f"{k}: snapshot {saved[k]!r} vs now {current[k]!r}" for k in saved if saved[k] != current[k])
            raise ValueError(f"the snapshot's data order does not match this sampler's ({changed}): resume with "
                             "the dataset and seed the snapshot was taken with")
        epoch, position = int(state["epoch"]), int(state["position"])
        if epoch < 0 or not 0 <= position <= self.samples:
            raise ValueError(f"the snapshot's data position (epoch {epoch}, sample {position}) is out of range "
                             f"for {self.samples} samples")
        self.epoch, self.position = epoch, position
