"""Seeding before anything random is created: LoRA adapters and any newly initialised head come from `seed`."""

from __future__ import annotations


def seed_everything(args) -> None:
    """What the Trainer does in its __init__, done earlier: build_trainer creates LoRA adapters (and loading may
    initialise missing weights) before the Trainer exists, so without this they differ from run to run."""
    from transformers.trainer_utils import enable_full_determinism, set_seed

    if args.full_determinism:
        enable_full_determinism(args.seed)
    else:
        set_seed(args.seed)
