"""Mixing dataset entries: concatenation by default, or per-entry `ratio` / `repeat`, seeded per epoch.

An entry of n samples contributes round(weight * n) samples to each epoch, where weight is its `ratio`
(a sampling weight relative to its size: 0.5 = half its samples, 2.0 = each sample twice on average) or
its `repeat` (each sample exactly that many times). The whole part of the weight repeats every sample;
the fraction picks distinct samples at random, seeded by (seed, epoch), so every epoch draws anew and
the epoch's length stays fixed. The Trainer shuffles the mixture as usual.
"""

from __future__ import annotations

import numpy as np
import torch


class MixDataset(torch.utils.data.Dataset):
    def __init__(self, parts: list, names: list[str], weights: list[float | None] | None = None, seed: int = 0):
        self.parts, self.names = parts, names
        self.weights = weights or [None] * len(parts)
        self.seed = seed
        self.epoch = -1
        self.set_epoch(0)

    def counts(self) -> list[int]:
        """Samples each part contributes per epoch."""
        return [len(p) if w is None else int(round(w * len(p))) for p, w in zip(self.parts, self.weights)]

    def set_epoch(self, epoch: int) -> None:
        if epoch == self.epoch:
            return
        self.epoch = epoch
        rng = np.random.default_rng([self.seed, epoch])
        which, index = [], []
        for p, (part, w) in enumerate(zip(self.parts, self.weights)):
            n = len(part)
            if w is None or n == 0:
                picked = np.arange(n)
            else:
                whole = int(w)
                extra = int(round(w * n)) - whole * n
                picked = np.concatenate([np.tile(np.arange(n), whole),
                                         rng.choice(n, size=extra, replace=False)]).astype(np.int64)
            which.append(np.full(len(picked), p, dtype=np.int64))
            index.append(picked)
        self.which = np.concatenate(which) if which else np.zeros(0, np.int64)
        self.index = np.concatenate(index) if index else np.zeros(0, np.int64)
        self._lengths = None

    def __len__(self) -> int:
        return len(self.which)

    def __getitem__(self, i: int):
        return self.parts[self.which[i]][int(self.index[i])]

    def lengths(self) -> list[int]:
        """Token length of each sample of the current epoch, image tokens included (from the cached scan)."""
        if self._lengths is None:
            per_part = [np.asarray(p.lengths(), dtype=np.int64) for p in self.parts]
            out = np.zeros(len(self), dtype=np.int64)
            for p, lengths in enumerate(per_part):
                mask = self.which == p
                out[mask] = lengths[self.index[mask]]
            self._lengths = out.tolist()
        return self._lengths

    @property
    def skipped(self) -> list[dict]:
        return [r for p in self.parts for r in p.skipped]

    def by_entry(self) -> dict:
        """{entry name: dataset}, for the Trainer's per-entry evaluation (eval_<name>_loss)."""
        return dict(zip(self.names, self.parts))


def redraws_each_epoch(dataset) -> bool:
    """Whether set_epoch gives this dataset other samples or rows per epoch: MixToken re-packs, and a ratio
    with a fractional part draws a different subset of its entry."""
    if hasattr(dataset, "packs"):
        return True
    return any(w is not None and float(w) != int(w) for w in getattr(dataset, "weights", ()))


def check_persistent_workers(args, dataset) -> None:
    """Persistent loader workers keep the dataset copy they were started with, so an epoch's redraw would
    silently never reach them: every epoch would train the first epoch's draw."""
    from mixtune.errors import ConfigError

    if args.dataloader_persistent_workers and args.dataloader_num_workers > 0 and redraws_each_epoch(dataset):
        raise ConfigError("cannot be used with MixToken or a fractional sampling ratio: the workers would keep the "
                          "first epoch's rows and mixture instead of each epoch's redraw; set it false",
                          key="dataloader_persistent_workers")


def epoch_callback(dataset):
    """A TrainerCallback calling `dataset.set_epoch` at each epoch: a MixDataset redraws its mixture, a
    PackedDataset redraws and re-packs (the loader workers, re-created per epoch unless
    `dataloader_persistent_workers`, get the new draw)."""
    from transformers import TrainerCallback

    class SetEpoch(TrainerCallback):
        def on_epoch_begin(self, args, state, control, **kwargs):
            dataset.set_epoch(int(state.epoch + 1e-6))  # state.epoch is fractional when resuming mid-epoch

    return SetEpoch()
