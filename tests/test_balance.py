"""MixToken under data parallelism: every rank runs the same number of rows per step, the ranks' token counts
per step differ by at most one row's, and the world's step is the very step one process runs."""

from __future__ import annotations

import random
import types

import pytest
from accelerate.data_loader import BatchSamplerShard
from torch.utils.data import BatchSampler

from mixtune.data.balance import BalancedRowSampler, balanced_shares


def packed_rows(n_rows=23, seed=1):
    """A stand-in PackedDataset: rows of 1-4 samples; first-fit-decreasing's full rows and short leftovers."""
    rng = random.Random(seed)
    lengths, packs = [], []
    for _ in range(n_rows):
        pack = []
        for _ in range(rng.randint(1, 4)):
            pack.append(len(lengths))
            lengths.append(rng.randint(5, 120))
        packs.append(pack)
    return Packs(lengths=lengths, packs=packs)


class Packs(types.SimpleNamespace):
    def __len__(self):
        return len(self.packs)


def steps_per_rank(packed, world: int, batch: int, epoch: int = 0) -> list[list[list[int]]]:
    """What accelerate gives each rank, step by step, from the sampler (its own sharding, even batches)."""
    sampler = BalancedRowSampler(packed, batch, world, seed=7)
    sampler.set_epoch(epoch)
    per_rank = [list(BatchSamplerShard(BatchSampler(list(sampler), batch, drop_last=False), world, r))
                for r in range(world)]
    assert len({len(p) for p in per_rank}) == 1  # the same number of steps on every rank
    return [[per_rank[r][s] for r in range(world)] for s in range(len(per_rank[0]))]


@pytest.mark.parametrize("world,batch", [(2, 2), (3, 2), (4, 1), (2, 3)])
def test_ranks_get_equal_rows_and_tokens_balanced_within_one_row(world, batch):
    packed = packed_rows()
    tokens = [sum(packed.lengths[i] for i in pack) for pack in packed.packs]
    single = steps_per_rank(packed, 1, world * batch)
    steps = steps_per_rank(packed, world, batch)
    full_steps = len(tokens) // (world * batch)
    assert full_steps >= 3
    for s, shares in enumerate(steps):
        assert all(len(share) == batch for share in shares)  # no rank runs out first
        if s < full_steps:
            assert sorted(sum(shares, [])) == sorted(single[s][0])  # the world's step is one process's step
            counts = [sum(tokens[r] for r in share) for share in shares]
            assert max(counts) - min(counts) <= max(tokens[r] for share in shares for r in share)


def test_balancing_beats_plain_dealing_and_epochs_reshuffle():
    tokens = [200, 190, 180, 20, 15, 10]  # dealt in drawn order: 570 tokens on one rank, 45 on the other
    shares = balanced_shares(tokens, 2, 3)
    counts = sorted(sum(tokens[i] for i in share) for share in shares)
    assert counts == [235, 380]  # the best split with 3 rows each (two of the long rows share a rank)
    packed = packed_rows()
    assert steps_per_rank(packed, 2, 2, epoch=0) != steps_per_rank(packed, 2, 2, epoch=1)
    assert steps_per_rank(packed, 2, 2, epoch=1) == steps_per_rank(packed, 2, 2, epoch=1)


def test_mixtoken_training_draws_rows_through_the_balanced_sampler(tiny_model_dir, demo_data_dir, tmp_path):
    import os

    from conftest import write_config

    from mixtune.config import load_config
    from mixtune.train.run import build_trainer

    cfg = write_config(tmp_path, tiny_model_dir("qwen2_vl"), os.path.join(demo_data_dir, "train.json"),
                       mixtoken=True, max_length=256)
    trainer = build_trainer(load_config(cfg))
    loader = trainer.get_train_dataloader()
    sampler = loader.batch_sampler.sampler if hasattr(loader.batch_sampler, "sampler") else None
    assert isinstance(trainer._get_train_sampler(), BalancedRowSampler)
    assert isinstance(sampler, BalancedRowSampler) and sampler.packed is trainer.train_dataset
