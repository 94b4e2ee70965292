"""Loading a checkpoint as mixtune sees it: its family (from the checkpoint's own `model_type`), the model
through the family's transformers Auto class, and the processor. Training, merging, inference and serving
all load through here, so a model is read the same way everywhere. With `lora_path`, the base gets the
adapter (peft's PeftModel, checked to fit) and the processor comes from the adapter folder when training
saved one there; `merge_lora=True` folds the adapter in memory (inference: plain modules, no peft overhead)."""

from __future__ import annotations

import torch

from mixtune.errors import MixtuneError
from mixtune.models.registry import family_for_checkpoint


def load_model_and_processor(model_name_or_path: str | None, attn_implementation: str | None = None,
                             dtype: torch.dtype = torch.float32, lora_path: str | None = None,
                             merge_lora: bool = False, tp_size: int = 1, quantization=None):
    import transformers

    if lora_path:
        return _load_with_adapter(model_name_or_path, lora_path, attn_implementation, dtype, merge_lora)
    if not model_name_or_path:
        raise MixtuneError("no model given: pass a checkpoint folder (or a LoRA adapter with --lora_path)")
    family = family_for_checkpoint(model_name_or_path)
    family.check_requires()
    auto = getattr(transformers, family.auto_class)
    kwargs = {"dtype": dtype}
    if attn_implementation in family.refused_attn:
        from mixtune.errors import ConfigError

        raise ConfigError(f"'{attn_implementation}' is refused for {family.name}: "
                          f"{family.refused_attn[attn_implementation]}", key="attn_implementation")
    if attn_implementation:
        kwargs["attn_implementation"] = attn_implementation
    if quantization is not None:  # QLoRA (train/qlora.py)
        from mixtune.train.qlora import load_kwargs

        kwargs.update(load_kwargs(quantization, family))
    if tp_size > 1:  # tensor parallel: transformers splits the layers its tp_plan names across the ranks
        kwargs.update(tp_plan="auto", tp_size=tp_size)
    try:
        processor = transformers.AutoProcessor.from_pretrained(model_name_or_path)
        model = auto.from_pretrained(model_name_or_path, **kwargs)
    except OSError as e:
        raise MixtuneError(f"cannot load '{model_name_or_path}': {e}") from None
    if family.name == "grounding_dino":  # what peft asks for and transformers' GroundingDinoModel lacks
        from mixtune.models.grounding_dino import expose_text_embeddings

        expose_text_embeddings(model)
    return family, model, processor


def _load_with_adapter(base: str | None, lora_path: str, attn_implementation, dtype, merge: bool):
    from mixtune.tools.merge_lora import load_adapter_model, load_processor, read_adapter_config

    base = base or read_adapter_config(lora_path).get("base_model_name_or_path")
    if not base:
        raise MixtuneError(f"{lora_path}/adapter_config.json names no base model; pass the base model too")
    family, model, _ = load_model_and_processor(base, attn_implementation, dtype)
    model = load_adapter_model(model, lora_path)
    return family, (model.merge_and_unload() if merge else model), load_processor(lora_path, base)
