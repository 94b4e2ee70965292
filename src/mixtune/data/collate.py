"""Batching Encoded samples: pad token-aligned fields to the longest row, concatenate pixel inputs."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from mixtune.data.encode import IGNORE_INDEX, Encoded


@dataclass
class PadCollator:
    pad_token_id: int

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
        media_keys = {k for e in batch for k in e.media}
        for key in media_keys:
            inputs[key] = torch.cat([e.media[key] for e in batch if key in e.media], dim=0)
        return inputs
