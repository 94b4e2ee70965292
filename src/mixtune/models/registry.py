"""Maps a checkpoint's own `model_type` to its Family. Adding a family is one file plus one line here."""

from __future__ import annotations

import importlib
import json
import os

from mixtune.errors import MixtuneError
from mixtune.models.family import Family

FAMILY_MODULES = [
    "qwen2_vl", "qwen2_5_vl", "qwen3_vl", "qwen_vl", "llava", "llava_next", "llava_next_video", "llava_onevision",
    "internvl", "visualglm", "cogvlm", "cogagent",
    "blip_2", "instructblip", "idefics3", "smolvlm", "paligemma", "gemma3", "mllama", "glm4v", "qwen2_audio",
    "clip", "siglip", "siglip2", "open_clip_family", "coca", "timm_classifier",  # contrastive, classification
    "sam",  # segmentation
    "grounding_dino", "yolo_world",  # detection
    "audioldm2",  # text_to_audio (a diffusers pipeline folder)
]

# Other names users write for a family.
ALIASES = {"blip2": "blip-2"}

_FAMILIES: dict[str, Family] = {}


def _load() -> dict[str, Family]:
    if not _FAMILIES:
        for name in FAMILY_MODULES:
            family = importlib.import_module(f"mixtune.models.{name}").FAMILY
            for model_type in family.model_types:
                _FAMILIES[model_type] = family
    return _FAMILIES


def families(task: str | None = "chat") -> list[Family]:
    """The registered families of one task (default: the chat families, which the chat tests parametrise
    over), or of every task with `task=None`."""
    seen: dict[str, Family] = {}
    for fam in _load().values():
        if task is None or fam.task == task:
            seen.setdefault(fam.name, fam)
    return list(seen.values())


def get_family(name_or_model_type: str) -> Family:
    table = _load()
    name_or_model_type = ALIASES.get(name_or_model_type, name_or_model_type)
    if name_or_model_type in table:
        return table[name_or_model_type]
    for fam in families(task=None):
        if fam.name == name_or_model_type:
            return fam
    raise MixtuneError(f"unsupported model family '{name_or_model_type}'. Supported families: "
                       f"{', '.join(sorted(set(table) | {f.name for f in families(task=None)}))}")


def read_model_type(model_name_or_path: str) -> str:
    """The checkpoint's `model_type`, read from its config without loading weights."""
    config_path = os.path.join(model_name_or_path, "config.json")
    if os.path.isdir(model_name_or_path):
        open_clip_config = os.path.join(model_name_or_path, "open_clip_config.json")
        if not os.path.exists(config_path) and os.path.exists(open_clip_config):
            from mixtune.models.open_clip_family import model_type_of

            return model_type_of(model_name_or_path)  # open_clip's own folder format
        if not os.path.exists(config_path) and os.path.exists(os.path.join(model_name_or_path, "model_index.json")):
            from mixtune.models.audioldm2 import model_type_of as diffusers_model_type

            return diffusers_model_type(model_name_or_path)  # a diffusers pipeline folder
        if not os.path.exists(config_path):
            raise MixtuneError(f"{model_name_or_path} is not a checkpoint folder: it has no config.json")
        with open(config_path) as f:
            raw = json.load(f)
        model_type = raw.get("model_type") or ("timm" if "architecture" in raw else None)  # timm's own format
        if not model_type:
            raise MixtuneError(f"{config_path} has no 'model_type'")
        return model_type
    from transformers import AutoConfig  # a hub id: only when the machine is online

    try:
        return AutoConfig.from_pretrained(model_name_or_path).model_type
    except Exception as e:
        raise MixtuneError(f"cannot load a config for '{model_name_or_path}': not a local folder, and the hub "
                           f"lookup failed ({type(e).__name__}: {e})") from None


def family_for_checkpoint(model_name_or_path: str) -> Family:
    return get_family(read_model_type(model_name_or_path))


def support_table() -> str:
    """`mixtune list-models`. SFT, LoRA and generation hold for every registered family because
    tests/test_zoo.py is parametrised over this registry and checks each of them on a tiny checkpoint;
    packing is read from the family's own `pack_positions`; tests/test_packing.py proves it for each; media
    (image, video) from `media_kinds`, and tests/test_video.py trains every family that lists video."""
    import importlib.util

    rows = [("family", "model_type", "SFT", "LoRA", "packing", "generation", "media", "task", "notes")]
    for fam in families(task=None):
        notes = []
        if fam.task == "chat" and not fam.uses_chat_template:
            notes.append("prefix/suffix prompts, one reply per sample")
        if fam.default_chat_template:
            notes.append("built-in prompt format when the checkpoint has no chat template")
        notes += [f"needs `{m}` (not installed)" for m in fam.requires if importlib.util.find_spec(m) is None]
        packing = "yes" if fam.pack_positions else "no"
        chat = fam.task == "chat"
        lora = "yes" if fam.supports_lora else "no"
        rows.append((fam.name, ",".join(fam.model_types), "yes", lora, packing, "yes" if chat else "-",
                     ",".join(fam.media_kinds) or "-", fam.task,
                     "; ".join(notes)))
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]) - 1)]
    return "\n".join(("  ".join(c.ljust(w) for c, w in zip(r, widths)) + "  " + r[-1]).rstrip() for r in rows) + \
        "\n(SFT, LoRA, generation: checked for every chat family by tests/test_zoo.py on a tiny checkpoint; " \
        "contrastive and classification families by tests/test_tasks.py; sam by tests/test_segmentation.py; " \
        "grounding_dino by tests/test_detection.py; yolo_world by tests/test_yolo_world.py; " \
        "audioldm2 by tests/test_text_to_audio.py)"
