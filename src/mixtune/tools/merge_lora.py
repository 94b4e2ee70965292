"""`mixtune merge-lora`: fold a LoRA adapter into its base model and save a full checkpoint.

The output is a plain transformers folder: weights, config, generation config, and the processor with its
tokenizer and chat template (taken from the adapter folder, which training writes them into, else from the
base), so `AutoModelForImageTextToText` / `AutoProcessor.from_pretrained(OUT)` load it with no peft.
An adapter that does not fit its base (missing or unexpected adapter weights) is an error, not a warning.
"""

from __future__ import annotations

import json
import logging
import os

import torch

from mixtune.errors import MixtuneError

log = logging.getLogger("mixtune")

DTYPES = {"auto": "auto", "float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
PROCESSOR_FILES = ("processor_config.json", "preprocessor_config.json", "tokenizer_config.json")


def read_adapter_config(lora_path: str) -> dict:
    path = os.path.join(lora_path, "adapter_config.json")
    if not os.path.isfile(path):
        raise MixtuneError(f"{lora_path} is not a LoRA adapter folder: it has no adapter_config.json")
    with open(path) as f:
        return json.load(f)


def load_processor(lora_path: str, base: str):
    from transformers import AutoProcessor

    source = lora_path if any(os.path.isfile(os.path.join(lora_path, f)) for f in PROCESSOR_FILES) else base
    log.info("processor, tokenizer and chat template from %s", source)
    from mixtune.models.loading import config_from_architectures

    config = config_from_architectures(source)  # a base whose config.json names no model_type (CogVLM)
    return AutoProcessor.from_pretrained(source, **({} if config is None else {"config": config}))


def load_adapter_model(base_model, lora_path: str):
    """peft's own loading (as `PeftModel.from_pretrained` does it), keeping the load result to check."""
    from peft import PeftConfig, PeftModel

    config = PeftConfig.from_pretrained(lora_path)
    # module names and shapes can coincide across architectures; the class the adapter was trained on cannot
    trained_on = (config.auto_mapping or {}).get("base_model_class")
    if trained_on and trained_on != type(base_model).__name__:
        raise MixtuneError(f"adapter {lora_path} does not fit the base model: it was trained on a {trained_on}, "
                           f"the base is a {type(base_model).__name__}")
    config.inference_mode = True
    try:
        model = PeftModel(base_model, config)
        result = model.load_adapter(lora_path, "default", is_trainable=False)
    except (ValueError, RuntimeError) as e:  # e.g. targets absent from the base, or shape mismatches
        raise MixtuneError(f"adapter {lora_path} does not fit the base model: {e}") from None
    bad = list(result.missing_keys) + list(result.unexpected_keys)
    if bad:
        raise MixtuneError(f"adapter {lora_path} does not fit the base model: {len(result.missing_keys)} adapter "
                           f"weight(s) missing, {len(result.unexpected_keys)} unexpected, e.g. {bad[:3]}")
    return model.eval()


def merge_lora(lora_path: str, merge_model_path: str, model_name_or_path: str | None = None,
               dtype: str = "auto") -> str:
    from mixtune.models.loading import load_model_and_processor

    adapter = read_adapter_config(lora_path)  # a clear error before loading any weights
    base = model_name_or_path or adapter.get("base_model_name_or_path")
    if not base:
        raise MixtuneError(f"{lora_path}/adapter_config.json names no base model; pass --model_name_or_path")
    if dtype not in DTYPES:
        raise MixtuneError(f"--dtype must be one of {list(DTYPES)}, got '{dtype}'")
    if os.path.isdir(merge_model_path) and os.listdir(merge_model_path):
        raise MixtuneError(f"{merge_model_path} is not empty; choose a new folder for the merged model")
    # the base loads in the output dtype; peft computes each delta in fp32 on CPU before adding it
    _, model, _ = load_model_and_processor(base, dtype=DTYPES[dtype])
    processor = load_processor(lora_path, base)
    merged = load_adapter_model(model, lora_path).merge_and_unload()
    os.makedirs(merge_model_path, exist_ok=True)
    merged.save_pretrained(merge_model_path)
    processor.save_pretrained(merge_model_path)
    log.info("merged %s into %s (%s) -> %s", lora_path, base, merged.dtype, merge_model_path)
    return merge_model_path
