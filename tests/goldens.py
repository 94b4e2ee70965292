"""The golden fixtures (tests/golden/<model>/golden.npz, made from PaddleMIX's own implementations): weights are
stored as int8 x scale + offset under the published key names ("w:KEY", "scale:KEY", "offset:KEY")."""

from __future__ import annotations

import os
import shutil

import numpy as np
import torch
from safetensors.torch import save_file


def decode_weights(data, prefix: str = "", skip: str | None = None) -> dict[str, torch.Tensor]:
    """fp32 tensors of every stored weight whose key starts with `prefix` (dropped from the name) and not with
    `skip`, by their published key names."""
    state = {}
    for name in data.files:
        if not name.startswith("w:"):
            continue
        key = name[2:]
        if not key.startswith(prefix) or (skip and key.startswith(skip)):
            continue
        value = data[f"offset:{key}"] + data[name].astype(np.float32) * data[f"scale:{key}"]
        state[key[len(prefix):]] = torch.from_numpy(np.ascontiguousarray(value, dtype=np.float32))
    return state


def write_checkpoint(state: dict[str, torch.Tensor], golden_dir: str, folder) -> str:
    """A checkpoint folder as published: the fixture's config.json beside model.safetensors."""
    save_file(state, os.path.join(folder, "model.safetensors"), metadata={"format": "pt"})
    shutil.copy(os.path.join(golden_dir, "config.json"), os.path.join(folder, "config.json"))
    return str(folder)
