"""Loading a checkpoint as mixtune sees it: its family (from the checkpoint's own `model_type`), the model
through the family's transformers Auto class, and the processor. Training, merging, inference and serving
all load through here, so a model is read the same way everywhere. With `lora_path`, the base gets the
adapter (peft's PeftModel, checked to fit) and the processor comes from the adapter folder when training
saved one there; `merge_lora=True` folds the adapter in memory (inference: plain modules, no peft overhead)."""

from __future__ import annotations

import json
import os

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
    auto = model_class_of(family)
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
    config = config_from_architectures(model_name_or_path)
    given = {} if config is None else {"config": config}
    try:
        if family.load_processor is not None:
            processor = family.load_processor(model_name_or_path)
        else:
            processor = transformers.AutoProcessor.from_pretrained(model_name_or_path, **given)
        model = auto.from_pretrained(model_name_or_path, **kwargs, **given)
    except OSError as e:
        raise MixtuneError(f"cannot load '{model_name_or_path}': {e}") from None
    if family.after_load is not None:
        family.after_load(model)
    return family, model, processor


def model_class_of(family):
    """The class that loads the family's checkpoints: a transformers Auto class by name, or a model class by its
    import path (a native port's own class, e.g. MiniMonkey's)."""
    import importlib

    import transformers

    if "." not in family.auto_class:
        return getattr(transformers, family.auto_class)
    module, _, name = family.auto_class.rpartition(".")
    return getattr(importlib.import_module(module), name)


def config_from_architectures(model_name_or_path: str):
    """For a folder whose config.json names no `model_type` (THUDM's CogVLM / CogAgent: their remote-code config
    class declares none), its config built by the config class of the model_type its `architectures` map to
    (registry.model_type_of_architectures), so transformers never falls back to matching the folder's name.
    None when config.json names its model_type: transformers' Auto classes read that themselves."""
    from transformers.models.auto.configuration_auto import CONFIG_MAPPING

    from mixtune.models.registry import read_model_type

    config_path = os.path.join(model_name_or_path, "config.json")
    if not os.path.isfile(config_path):
        return None
    with open(config_path) as f:
        raw = json.load(f)
    if raw.get("model_type") or not raw.get("architectures"):
        return None
    config_class = CONFIG_MAPPING[read_model_type(model_name_or_path)]
    config_dict, _ = config_class.get_config_dict(model_name_or_path)
    config_dict.pop("model_type", None)  # "" in some published files: the class's own model_type holds
    return config_class.from_dict(config_dict)


def _load_with_adapter(base: str | None, lora_path: str, attn_implementation, dtype, merge: bool):
    from mixtune.tools.merge_lora import load_adapter_model, load_processor, read_adapter_config

    base = base or read_adapter_config(lora_path).get("base_model_name_or_path")
    if not base:
        raise MixtuneError(f"{lora_path}/adapter_config.json names no base model; pass the base model too")
    family, model, _ = load_model_and_processor(base, attn_implementation, dtype)
    model = load_adapter_model(model, lora_path)
    return family, (model.merge_and_unload() if merge else model), load_processor(lora_path, base)
