"""mixtune's Trainer: transformers' own, with one repair.

transformers 5 saves checkpoints of several VLM families (Qwen2-VL among them) under their original
hub key names (`visual.*`, `model.layers.*`) while the live model uses `model.visual.*`,
`model.language_model.*`. The stock resume path loads the raw state dict non-strictly, so resuming
silently keeps the *untrained* weights. Loading through `from_pretrained` applies the key conversion;
we then copy the weights in strictly, so any mismatch is an error instead of lost training.
"""

from __future__ import annotations

import os

from transformers import Trainer


class MixTrainer(Trainer):
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
