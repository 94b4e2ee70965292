"""Dataset plumbing the non-chat tasks share: entries read into plain samples, one lazily prepared list per
entry, mixed by data/mix.py with the entries' ratio / repeat, bad samples counted or raised as configured."""

from __future__ import annotations

import logging
from collections.abc import Callable

import torch

from mixtune.data.badsamples import BadSamples
from mixtune.data.dataset import ENTRY_DEFAULT_KEYS, parse_entries, unique_names
from mixtune.data.formats import get_reader
from mixtune.data.mix import MixDataset
from mixtune.errors import ConfigError, DataError

log = logging.getLogger("mixtune")


class SampleList(torch.utils.data.Dataset):
    """One entry's samples; `prepare` decodes a sample (its image) when the loader asks for it."""

    def __init__(self, samples: list, prepare: Callable, name: str, skipped: list[dict]):
        self.samples, self.prepare, self.name, self.skipped = samples, prepare, name, skipped

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, i: int):
        return self.prepare(self.samples[i])

    def lengths(self) -> list[int]:  # no token lengths: every sample is one image (group_by_length: no effect)
        return [1] * len(self.samples)


def reader_task(name: str) -> str:
    """Which task a dataset reader's samples serve: readers of labelled images say so; the rest give
    Conversations (chat, and contrastive pairs derived from them)."""
    return getattr(get_reader(name), "task", "chat")


# entry keys only chat SFT's encoding reads (tasks/chat.py): the other tasks render with the checkpoint's own
# template and size images with its processor, so a value here would be silently ignored
CHAT_ONLY_ENTRY_KEYS = ("chat_template", "min_pixels", "max_pixels")


def refuse_chat_only_keys(entry, where: str, task: str) -> None:
    for key in CHAT_ONLY_ENTRY_KEYS:
        if getattr(entry, key) is not None:
            raise ConfigError(f"is read by the chat task only; the {task} task would ignore it (remove it)",
                              key=f"{where}.{key}")


def build_sample_split(config, split: str, read: Callable, prepare: Callable, task: str,
                       raw: list | None = None, reads: str | None = None) -> MixDataset | None:
    """`read(entry, bad) -> samples` for each entry of `dataset.<split>` (or of `raw`), mixed; `reads`: the
    readers' kind the task takes (default: labelled images for classification, else conversations)."""
    mix = config.mix
    raw = mix.dataset.get(split) if raw is None else raw
    if not raw:
        return None
    entries = parse_entries(raw, split, config.base_dir, {k: getattr(mix, k) for k in ENTRY_DEFAULT_KEYS})
    parts = []
    for i, entry in enumerate(entries):
        wanted = reads or ("classification" if task == "classification" else "chat")
        if reader_task(entry.name) not in (wanted if isinstance(wanted, tuple) else (wanted,)):
            raise ConfigError(f"'{entry.name}' data does not fit the {task} task", key=f"dataset.{split}[{i}].name")
        refuse_chat_only_keys(entry, f"dataset.{split}[{i}]", task)
        bad = BadSamples(entry.on_bad_sample, entry=entry.label(), strict_fields=entry.strict_fields)
        samples = read(entry, bad)
        if entry.max_samples is not None:
            samples = samples[: entry.max_samples]
        log.info("dataset %s (%s): %d samples kept, %d bad skipped", entry.label(), entry.name, len(samples),
                 len(bad.records))
        parts.append(SampleList(samples, prepare, entry.label(), bad.records))
    names = unique_names([p.name for p in parts])
    for part, name in zip(parts, names):
        part.name = name
    seed = config.training.data_seed if config.training.data_seed is not None else config.training.seed
    mixed = MixDataset(parts, names, [e.weight for e in entries], seed=seed)
    if len(mixed) == 0:
        raise DataError(f"dataset.{split} has no samples left: {len(mixed.skipped)} were skipped",
                        file=", ".join(str(e.data_files) for e in entries))
    return mixed


def eval_argument(eval_set):
    """Several eval entries: the Trainer evaluates each (eval_<name>_...); one: the set itself."""
    return eval_set.by_entry() if eval_set is not None and len(eval_set.parts) > 1 else eval_set
