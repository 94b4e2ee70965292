"""Batching Encoded samples: pad token-aligned fields to the longest row, concatenate pixel inputs."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch

from mixtune.data.encode import IGNORE_INDEX, Encoded


def pad_stack(rows: list[torch.Tensor], length: int, value) -> torch.Tensor:
    """1-D tensors -> one (len(rows), length) tensor, right-padded with `value`."""
    out = torch.full((len(rows), length), value, dtype=rows[0].dtype)
    for i, row in enumerate(rows):
        out[i, : row.shape[0]] = row
    return out


def concat_media(media: list[dict]) -> dict[str, torch.Tensor]:
    """Pixel inputs of several samples, in order, concatenated along dim 0 (fixed-shape families)."""
    return {key: torch.cat([m[key] for m in media if key in m], dim=0) for key in {k for m in media for k in m}}


@dataclass
class PadCollator:
    pad_token_id: int
    collate_media: Callable[[list[dict]], dict] | None = None  # the family's, when shapes vary per sample

    def __call__(self, batch: list[Encoded]) -> dict[str, torch.Tensor]:
        length = max(len(e) for e in batch)
        inputs = {
            "input_ids": pad_stack([e.input_ids for e in batch], length, self.pad_token_id),
            "labels": pad_stack([e.labels for e in batch], length, IGNORE_INDEX),
            "attention_mask": pad_stack([torch.ones_like(e.input_ids) for e in batch], length, 0),
        }
        for key in batch[0].token_fields:
            inputs[key] = pad_stack([e.token_fields[key] for e in batch], length, 0)
        inputs.update((self.collate_media or concat_media)([e.media for e in batch]))
        return inputs


def pad_and_concat(media: list[dict]) -> dict[str, torch.Tensor]:
    """Zero-pad every dim after the first to the batch's largest, then concatenate along dim 0.

    This is what the processors themselves do when given a batch: zero patches/tiles/images are
    padding that the model drops (LLaVA-NeXT unpads by `image_sizes`, Idefics3 skips all-zero images,
    Mllama masks tiles and images through `aspect_ratio_mask` and `cross_attention_mask`)."""
    out = {}
    for key in {k for m in media for k in m}:
        values = [m[key] for m in media if key in m]
        shape = [max(v.shape[d] for v in values) for d in range(1, values[0].dim())]
        padded = []
        for v in values:
            target = v.new_zeros((v.shape[0], *shape))
            target[tuple(slice(0, n) for n in v.shape)] = v
            padded.append(target)
        out[key] = torch.cat(padded, dim=0)
    return out
