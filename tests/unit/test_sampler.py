"""ElasticSampler: a global data position that any world size resumes from, and clear errors."""
from __future__ import annotations

import pytest

from pyckpt import ElasticSampler


def _epoch(world: int, samples: int = 48, batch: int = 4) -> list[list[int]]:
    """Each rank's batches over one epoch at this world size."""
    ranks = [ElasticSampler(samples, batch_size=batch, rank=r, world_size=world, seed=7) for r in range(world)]
    return [[s.next_batch() for _ in range(samples // (batch * world))] for s in ranks]


def test_the_ranks_of_a_step_share_one_global_batch_whatever_the_world_size():
    one = [i for batch in _epoch(1)[0] for i in batch]
    four = _epoch(4)
    # Step k on 4 ranks takes the same 16 samples, in the same order, as steps 4k..4k+3 on one rank.
    for step in range(3):
        assert [i for rank in four for i in rank[step]] == one[16 * step:16 * (step + 1)]
    assert sorted(one) == list(range(48))


def test_a_position_saved_on_4_ranks_resumes_on_3_at_the_next_unseen_sample():
    first = [ElasticSampler(48, batch_size=4, rank=r, world_size=4, seed=7) for r in range(4)]
    taken = [i for s in first for i in s.next_batch()]          # one step: 16 samples
    state = first[0].state_dict()
    assert state == {"samples": 48, "seed": 7, "shuffle": True, "epoch": 0, "position": 16}
    rest = []
    for r in range(3):
        s = ElasticSampler(48, batch_size=4, rank=r, world_size=3, seed=7)
        s.load_state_dict(state)
        rest += s.next_batch() + s.next_batch() + s.next_batch()   # 32 left, 12 per step: 2 steps and a tail
    # The third next_batch() of each rank starts epoch 1: leave it out.
    epoch0 = taken + [i for r in range(3) for i in rest[12 * r:12 * r + 8]]
    assert len(epoch0) == len(set(epoch0)) == 40   # 16 + 2 x 12, none twice; the 8-sample tail is dropped


def test_another_dataset_or_seed_is_refused_naming_what_changed():
    s = ElasticSampler(48, batch_size=4, rank=0, world_size=1, seed=7)
    with pytest.raises(ValueError, match="samples: snapshot 40 vs now 48"):
        s.load_state_dict({"samples": 40, "seed": 7, "shuffle": True, "epoch": 0, "position": 0})
    with pytest.raises(ValueError, match="seed: snapshot 1 vs now 7"):
        s.load_state_dict({"samples": 48, "seed": 1, "shuffle": True, "epoch": 0, "position": 0})
    with pytest.raises(ValueError, match="out of range"):
        s.load_state_dict({"samples": 48, "seed": 7, "shuffle": True, "epoch": 0, "position": 49})


def test_fewer_samples_than_one_global_batch_is_refused():
    with pytest.raises(ValueError, match="no full global batch of 4 x 16 ranks"):
        ElasticSampler(48, batch_size=4, rank=0, world_size=16)
