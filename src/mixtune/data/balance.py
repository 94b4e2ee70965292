"""MixToken rows dealt out to data-parallel ranks so that each rank's share of a step holds about as many
tokens as every other's.

accelerate cuts the train sampler's index stream into per-device batches and hands consecutive batches to
ranks 0, 1, ..., world-1, padding the last step by cycling from the start, so every rank already runs the
same number of rows per step. What it does not do is look at the rows: a step's full rows can all land on
one rank and its leftovers (the last packs first-fit-decreasing fills) on another, which then waits at every
gradient all-reduce. `BalancedRowSampler` orders each step's rows so that accelerate's dealing gives each
rank a token-balanced share:

- the rows of a step (world x per-device batch) are drawn by a seeded shuffle that does not depend on the
  world size, so one process with batch world x b sees exactly the same rows per step as world processes
  with batch b (the loss is normalised by the step's global label count: the same training);
- within a step, rows go longest first to the rank with the fewest tokens that still has room
  (largest-first greedy with equal row counts): the ranks' token counts then differ by at most one row's.

transformers' `BatchRebalanceSampler` balances by giving ranks different numbers of samples, which this
module avoids: packed rows are already near equal length, and equal row counts per rank keep MixToken's
steps those of one process.
"""

from __future__ import annotations

import torch


def balanced_shares(tokens: list[int], ranks: int, per_rank: int) -> list[list[int]]:
    """Positions 0..len(tokens)-1 split into `ranks` shares of `per_rank` each, balanced by token count."""
    shares: list[list[int]] = [[] for _ in range(ranks)]
    sums = [0] * ranks
    for i in sorted(range(len(tokens)), key=lambda i: -tokens[i]):  # stable: ties keep their drawn order
        r = min((r for r in range(ranks) if len(shares[r]) < per_rank), key=lambda r: sums[r])
        shares[r].append(i)
        sums[r] += tokens[i]
    return shares


class BalancedRowSampler(torch.utils.data.Sampler):
    """Row indices of a `PackedDataset`, step by step, each step's rows in rank order (see the module)."""

    def __init__(self, packed, per_device_batch: int, world: int, seed: int = 0):
        self.packed, self.per_device_batch, self.world, self.seed = packed, per_device_batch, world, seed
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:  # accelerate's loader calls this at each epoch
        self.epoch = epoch

    def __len__(self) -> int:
        return len(self.packed)

    def row_tokens(self) -> list[int]:
        return [sum(self.packed.lengths[i] for i in pack) for pack in self.packed.packs]

    def __iter__(self):
        tokens = self.row_tokens()
        generator = torch.Generator().manual_seed(self.seed + self.epoch)
        order = torch.randperm(len(tokens), generator=generator).tolist()
        step = self.per_device_batch * self.world
        for start in range(0, len(order), step):
            rows = order[start: start + step]
            if len(rows) < step:  # the last, short step: accelerate completes it from the start
                yield from rows
                continue
            for share in balanced_shares([tokens[r] for r in rows], self.world, self.per_device_batch):
                yield from (rows[i] for i in share)
