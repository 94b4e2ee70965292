"""Right- or left-padding of token rows into the tensors the native ports' processors return."""

from __future__ import annotations

import torch


def pad_rows(ids: list[list[int]], offsets: list | None, pad_id: int, left: bool) -> dict:
    """input_ids and attention_mask (and offset_mapping when offsets are given, (0, 0) at padding), each row
    padded to the longest with pad_id, on the left when `left` (generation) or else on the right."""
    width = max((len(x) for x in ids), default=0)
    out_ids, masks, out_offsets = [], [], []
    for i, row in enumerate(ids):
        fill = width - len(row)
        out_ids.append([pad_id] * fill + row if left else row + [pad_id] * fill)
        masks.append([0] * fill + [1] * len(row) if left else [1] * len(row) + [0] * fill)
        if offsets is not None:
            out_offsets.append([(0, 0)] * fill + offsets[i] if left else offsets[i] + [(0, 0)] * fill)
    data = {"input_ids": torch.tensor(out_ids, dtype=torch.long),
            "attention_mask": torch.tensor(masks, dtype=torch.long)}
    if offsets is not None:
        data["offset_mapping"] = torch.tensor(out_offsets, dtype=torch.long).reshape(len(ids), width, 2)
    return data
