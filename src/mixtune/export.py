"""`mixtune export`: one folder that serving engines (vLLM, SGLang, LMDeploy) load as they load a hub
checkpoint: weights under the original hub key names and shapes, config, generation config, processor,
tokenizer and chat template; a LoRA adapter merged in.

transformers 5 renames many families' weights in memory (Qwen2-VL's hub `model.layers.*` / `visual.*` are
`model.language_model.*` / `model.visual.*` live; LLaVA's `language_model.model.*` is `model.language_model.*`).
Its `save_pretrained` reverts that renaming, so exporting is: load (merging an adapter), save, and check that
the folder's key set and shapes equal those of the base checkpoint it came from (a mismatch is reported:
it would mean the folder carries renamed keys an engine cannot map).
"""

from __future__ import annotations

import json
import logging
import os

from mixtune.errors import MixtuneError

log = logging.getLogger("mixtune")


def safetensors_layout(folder: str) -> dict[str, tuple[tuple[int, ...], str]]:
    """{key: (shape, dtype)} over every *.safetensors file of a checkpoint folder (headers only)."""
    from safetensors import safe_open

    files = sorted(f for f in os.listdir(folder) if f.endswith(".safetensors"))
    layout = {}
    for name in files:
        with safe_open(os.path.join(folder, name), "pt") as f:
            for key in f.keys():
                piece = f.get_slice(key)
                layout[key] = (tuple(piece.get_shape()), piece.get_dtype())
    return layout


def compare_layouts(exported: dict, base: dict) -> list[str]:
    """Differences in key names and shapes (dtypes may differ by design)."""
    problems = [f"key not in the base checkpoint: {k}" for k in sorted(set(exported) - set(base))]
    problems += [f"key missing from the export: {k}" for k in sorted(set(base) - set(exported))]
    problems += [f"{k}: shape {exported[k][0]} vs the base's {base[k][0]}"
                 for k in sorted(set(exported) & set(base)) if exported[k][0] != base[k][0]]
    return problems


def export(model_path: str | None, to: str, lora_path: str | None = None, dtype: str = "auto") -> dict:
    import torch

    from mixtune.models.loading import load_model_and_processor

    if os.path.isdir(to) and os.listdir(to):
        raise MixtuneError(f"{to} is not empty; choose a new folder for the export")
    dtypes = {"auto": None, "float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
    if dtype not in dtypes:
        raise MixtuneError(f"--dtype must be one of {list(dtypes)}, got '{dtype}'")
    family, model, processor = load_model_and_processor(model_path, dtype=dtypes[dtype] or "auto",
                                                        lora_path=lora_path, merge_lora=True)
    if family.uses_chat_template and not getattr(processor, "chat_template", None) and family.default_chat_template:
        # the prompt format mixtune trained with, written where engines look for a chat template
        processor.chat_template = family.default_chat_template
    os.makedirs(to, exist_ok=True)
    model.save_pretrained(to)
    processor.save_pretrained(to)
    report = {"family": family.name, "dtype": str(model.dtype).removeprefix("torch."), "folder": to,
              "keys": len(safetensors_layout(to))}
    base = base_checkpoint(model_path, lora_path)
    if base and any(f.endswith(".safetensors") for f in os.listdir(base)):
        problems = compare_layouts(safetensors_layout(to), safetensors_layout(base))
        report["matches_base_checkpoint"] = not problems
        if problems:
            log.warning("the export's weights differ from %s's in %d place(s), e.g.\n  %s", base, len(problems),
                        "\n  ".join(problems[:5]))
    with open(os.path.join(to, "mixtune_export.json"), "w") as f:
        json.dump({**report, "model": model_path, "lora_path": lora_path}, f, indent=1)
    log.info("exported %s (%s, %d tensors) to %s", family.name, report["dtype"], report["keys"], to)
    return report


def base_checkpoint(model_path: str | None, lora_path: str | None) -> str | None:
    """The local checkpoint folder the weights came from: the adapter's base, or the model itself."""
    if lora_path and not model_path:
        from mixtune.tools.merge_lora import read_adapter_config

        model_path = read_adapter_config(lora_path).get("base_model_name_or_path")
    return model_path if model_path and os.path.isdir(model_path) else None
