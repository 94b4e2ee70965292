"""task: kto through TRL's KTOTrainer on tiny Qwen2-VL checkpoints: unpaired data, KL rows, reference, LoRA."""

from __future__ import annotations

import json

import pytest
import torch

from mixtune.config import build_config
from mixtune.errors import ConfigError, DataError

pytest.importorskip("trl")

COLOURS = {"red": (220, 30, 30), "blue": (40, 60, 220)}
QUESTION = "<image>What colour is it?"


def kto_config(model_dir, data, out, **extra) -> dict:
    return {"model_name_or_path": model_dir, "task": "kto", "output_dir": str(out), "overwrite_output_dir": True,
            "dataset": {"train": [{"name": "unpaired", "data_files": data}]}, "per_device_train_batch_size": 4,
            "learning_rate": 1e-3, "logging_steps": 1, "save_strategy": "no", "disable_tqdm": True,
            "max_length": 256, "seed": 0, **extra}


@pytest.fixture(scope="module")
def colour_replies(tmp_path_factory):
    """Two one-colour images; desirable: the colour word alone, undesirable: a sentence (LLaMA-Factory's
    kto_tag shape: the reply is the last turn)."""
    from PIL import Image

    root = tmp_path_factory.mktemp("kto")
    records = []
    for i, (name, rgb) in enumerate(COLOURS.items()):
        Image.new("RGB", (56, 56), rgb).save(root / f"{i}.png")
        for reply, label in ((name, True), (f"The colour of it is {name}.", False)):
            records.append({"messages": [{"role": "user", "content": QUESTION}, {"role": "assistant", "content": reply}],
                            "label": label, "images": [f"{i}.png"]})
    (root / "kto.json").write_text(json.dumps(records))
    return root


def test_kto_raises_the_desirable_over_undesirable_margin(tiny_model_dir, colour_replies, tmp_path):
    from mixtune.train.run import train

    out = tmp_path / "out"
    train(build_config(kto_config(tiny_model_dir("qwen2_vl"), str(colour_replies / "kto.json"), out, max_steps=4)))
    history = json.loads((out / "metrics.json").read_text())["log_history"]
    margins = [h["rewards/margins"] for h in history if "rewards/margins" in h]
    print("KTO margins", margins, [h.get("kl") for h in history if "kl" in h])
    assert len(margins) == 4
    assert margins[0] == 0.0  # step 1: the policy is the reference
    assert min(margins[1:]) > 0.1
