"""Batching Encoded samples: pad token-aligned fields to the longest row, concatenate pixel inputs."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch

from mixtune.data.encode import IGNORE_INDEX, Encoded


@dataclass
class PadCollator:
    pad_token_id: int
    collate_media: Callable[[list[dict]], dict] | None = None  # the family's, when shapes vary per sample

    def __call__(self, batch: list[Encoded]) -> dict[str, torch.Tensor]:
        length = max(len(e) for e in batch)

        def pad(rows, value):
            out = torch.full((len(rows), length), value, dtype=rows[0].dtype)
            for i, row in enumerate(rows):
                out[i, : row.shape[0]] = row
            return out

        inputs = {
            "input_ids": pad([e.input_ids for e in batch], self.pad_token_id),
            "labels": pad([e.labels for e in batch], IGNORE_INDEX),
            "attention_mask": pad([torch.ones_like(e.input_ids) for e in batch], 0),
        }
        for key in batch[0].token_fields:
            inputs[key] = pad([e.token_fields[key] for e in batch], 0)
        if self.collate_media is not None:
            inputs.update(self.collate_media([e.media for e in batch]))
            return inputs
        media_keys = {k for e in batch for k in e.media}
        for key in media_keys:
            inputs[key] = torch.cat([e.media[key] for e in batch if key in e.media], dim=0)
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
