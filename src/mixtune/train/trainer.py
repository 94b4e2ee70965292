"""mixtune's Trainer: transformers' own, with four changes.

1. Resume repair. transformers 5 saves checkpoints of several VLM families (Qwen2-VL among them) under their original
hub key names (`visual.*`, `model.layers.*`) while the live model uses `model.visual.*`,
`model.language_model.*`. The stock resume path loads the raw state dict non-strictly, so resuming
silently keeps the *untrained* weights. Loading through `from_pretrained` applies the key conversion;
we then copy the weights in strictly, so any mismatch is an error instead of lost training.
2. With several eval entries, the overall `eval_loss` beside each entry's.
3. `group_by_length` from the lengths our datasets measured before training.
4. Per-part learning rates (train/optim.py) when `part_rates` is set.
"""

from __future__ import annotations

import os

from transformers import Trainer
from transformers.trainer_pt_utils import LengthGroupedSampler


class MixTrainer(Trainer):
    part_rates = None  # train.optim.PartRates: vision_lr / projector_lr / language_lr

    def create_optimizer(self, model=None):
        if self.optimizer is None and self.part_rates is not None:
            from mixtune.train.optim import create_part_optimizer

            self.optimizer = create_part_optimizer(self, self.model if model is None else model, self.part_rates)
        return super().create_optimizer(model)

    def _load_from_checkpoint(self, resume_from_checkpoint: str, model=None) -> None:
        model = model if model is not None else self.model
        full_weights = os.path.isfile(os.path.join(resume_from_checkpoint, "config.json")) and any(
            f.startswith("model") and f.endswith(".safetensors") for f in os.listdir(resume_from_checkpoint))
        if not full_weights or self.is_fsdp_enabled or self.is_deepspeed_enabled or not hasattr(model,
                                                                                                  "from_pretrained"):
            return super()._load_from_checkpoint(resume_from_checkpoint, model)
        loaded = type(model).from_pretrained(resume_from_checkpoint, dtype=model.dtype)
        model.load_state_dict(loaded.state_dict(), strict=True)
        del loaded

    def evaluate(self, eval_dataset=None, ignore_keys=None, metric_key_prefix: str = "eval"):
        """With several eval entries the Trainer reports `eval_<name>_loss` for each; add the overall
        `eval_loss`: the per-entry losses weighted by sample count, which is the mean the Trainer would
        report over all their batches (it weights each batch's loss by its size)."""
        datasets = eval_dataset if eval_dataset is not None else self.eval_dataset
        metrics = super().evaluate(eval_dataset, ignore_keys, metric_key_prefix)
        if isinstance(datasets, dict):
            sizes = {name: len(ds) for name, ds in datasets.items() if len(ds)}
            overall = sum(metrics[f"{metric_key_prefix}_{name}_loss"] * n for name, n in sizes.items())
            metrics[f"{metric_key_prefix}_loss"] = overall / max(sum(sizes.values()), 1)
            self.log({f"{metric_key_prefix}_loss": metrics[f"{metric_key_prefix}_loss"]})
        return metrics

    def _get_train_sampler(self, train_dataset=None):
        # group_by_length: take the lengths our datasets measured before training instead of the Trainer
        # encoding every sample again (which it cannot do for our Encoded samples anyway)
        dataset = train_dataset if train_dataset is not None else self.train_dataset
        if self.args.train_sampling_strategy == "group_by_length" and hasattr(dataset, "lengths"):
            return LengthGroupedSampler(self.args.train_batch_size * self.args.gradient_accumulation_steps,
                                        lengths=dataset.lengths())
        return super()._get_train_sampler(train_dataset)
