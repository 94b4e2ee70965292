"""Building the train and eval sets from the config's `dataset` block.

Files are parsed up front (cheap: JSON only); images are decoded and samples encoded lazily, in
`__getitem__`, which runs in the data-loader workers.
"""

from __future__ import annotations

import difflib
import os
from dataclasses import dataclass, field
from functools import partial
from typing import Any

import torch

from mixtune.data.conversation import Conversation
from mixtune.data.encode import Encoded, encode_with_processor
from mixtune.data.formats import get_reader
from mixtune.data.images import load_image
from mixtune.data.templates import make_renderer
from mixtune.errors import ConfigError, DataError

ENTRY_KEYS = {"name", "data_files", "chat_template"}


@dataclass
class DatasetEntry:
    name: str
    data_files: Any
    chat_template: str | None = None
    base_dir: str = "."
    options: dict = field(default_factory=dict)  # reader-specific keys

    @classmethod
    def from_config(cls, raw: Any, base_dir: str, where: str) -> "DatasetEntry":
        if not isinstance(raw, dict):
            raise ConfigError(f"each entry must be a mapping, got {raw!r}", key=where)
        for key in ("name", "data_files"):
            if key not in raw:
                raise ConfigError(f"missing '{key}'", key=where)
        unknown = set(raw) - ENTRY_KEYS
        if unknown:
            key = sorted(unknown)[0]
            close = difflib.get_close_matches(key, sorted(ENTRY_KEYS), n=1)
            hint = f"; did you mean '{close[0]}'?" if close else f"; known: {sorted(ENTRY_KEYS)}"
            raise ConfigError(f"unknown key '{key}'{hint}", key=where)
        template = raw.get("chat_template")
        if template and not os.path.isabs(template):
            template = os.path.join(base_dir, template)
        return cls(name=raw["name"], data_files=raw["data_files"], chat_template=template, base_dir=base_dir)


class SFTDataset(torch.utils.data.Dataset):
    """Conversations of one dataset entry, encoded on access."""

    def __init__(self, conversations: list[Conversation], encode, max_length: int):
        self.conversations = conversations
        self.encode = encode
        self.max_length = max_length

    def __len__(self) -> int:
        return len(self.conversations)

    def __getitem__(self, i: int) -> Encoded:
        conv = self.conversations[i]
        try:
            images = [load_image(ref) for ref in conv.images]
        except DataError as e:
            raise DataError(e.reason, file=conv.file, index=conv.index, line=conv.line, field=e.field) from None
        enc = self.encode(conv, images)
        if len(enc) > self.max_length:
            raise conv.error(f"sample has {len(enc)} tokens (image tokens included), over max_length "
                             f"{self.max_length}; raise max_length or shorten the sample")
        return enc


def read_entry(entry: DatasetEntry) -> list[Conversation]:
    conversations = get_reader(entry.name)(entry)
    for conv in conversations:
        conv.validate()
    return conversations


def build_split(raw_entries: list, split: str, processor, family, max_length: int,
                base_dir: str) -> torch.utils.data.Dataset | None:
    if not raw_entries:
        return None
    if not isinstance(raw_entries, list):
        raise ConfigError("must be a list of dataset entries", key=f"dataset.{split}")
    parts = []
    for i, raw in enumerate(raw_entries):
        entry = DatasetEntry.from_config(raw, base_dir, f"dataset.{split}[{i}]")
        render = (make_renderer(processor, entry.chat_template, family.image_placeholder,
                                family.default_chat_template)
                  if family.uses_chat_template else None)
        encode = family.encode or encode_with_processor
        parts.append(SFTDataset(read_entry(entry), partial(_encode, encode, processor=processor, render=render),
                                max_length))
    return parts[0] if len(parts) == 1 else torch.utils.data.ConcatDataset(parts)


def _encode(encode, conv, images, processor, render):
    # a module-level function keeps the dataset picklable for data-loader worker processes
    return encode(conv, images, processor, render)
