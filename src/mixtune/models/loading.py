"""Loading a checkpoint as mixtune sees it: its family (from the checkpoint's own `model_type`), the model
through the family's transformers Auto class, and the processor. Training, merging, inference and serving
all load through here, so a model is read the same way everywhere."""

from __future__ import annotations

import torch

from mixtune.errors import MixtuneError
from mixtune.models.registry import family_for_checkpoint


def load_model_and_processor(model_name_or_path: str, attn_implementation: str | None = None,
                             dtype: torch.dtype = torch.float32, tp_size: int = 1):
    import transformers

    family = family_for_checkpoint(model_name_or_path)
    family.check_requires()
    auto = getattr(transformers, family.auto_class)
    kwargs = {"dtype": dtype}
    if attn_implementation:
        kwargs["attn_implementation"] = attn_implementation
    if tp_size > 1:  # tensor parallel: transformers splits the layers its tp_plan names across the ranks
        kwargs.update(tp_plan="auto", tp_size=tp_size)
    try:
        processor = transformers.AutoProcessor.from_pretrained(model_name_or_path)
        model = auto.from_pretrained(model_name_or_path, **kwargs)
    except OSError as e:
        raise MixtuneError(f"cannot load '{model_name_or_path}': {e}") from None
    return family, model, processor
