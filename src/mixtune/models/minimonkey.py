"""MiniMonkey (Mini-Monkey, HUST-VLRLab; `model_type` "internvl_chat"): InternVL2-2B's architecture, weights and
prompts, with multi-scale adaptive cropping (MSAC): each image is cut on two grids, a detail grid as InternVL2's and
a coarser adaptive grid whose lines avoid the detail grid's, plus the thumbnail (mixtune.native.minimonkey.msac).
The model is InternVL2's port (mixtune.native.internvl_chat) under MiniMonkey's class name.

It shares `model_type` "internvl_chat" with the internvl_chat family, so it claims a checkpoint by its config.json:
`architectures` naming MiniMonkeyChatModel (what saving writes) or an `auto_map` into MiniMonkey's remote code
(`modeling_minimonkey_chat`, the chat class of the published folder).
"""

from __future__ import annotations

import json
import os

from mixtune.data.grounding import INTERNVL_STYLE
from mixtune.data.pack import text_positions
from mixtune.models import internvl_chat
from mixtune.models.family import Family
from mixtune.models.tiny import save_checkpoint
from mixtune.native.internvl_chat import InternVLChatProcessor
from mixtune.native.minimonkey import MiniMonkeyChatModel, MiniMonkeyImageProcessor, MiniMonkeyProcessor

MODEL_CLASS = "MiniMonkeyChatModel"


def is_minimonkey_config(raw: dict) -> bool:
    """A MiniMonkey config.json: its architectures name MiniMonkey's class, or its auto_map points into MiniMonkey's
    remote code."""
    if MODEL_CLASS in (raw.get("architectures") or []):
        return True
    targets = [v for value in (raw.get("auto_map") or {}).values()
               for v in (value if isinstance(value, (list, tuple)) else [value]) if isinstance(v, str)]
    return any("minimonkey" in t.lower() for t in targets)


def build_tiny(output_dir: str) -> str:
    """internvl_chat's tiny checkpoint (same weights, tokenizer, prompts) under MiniMonkey's class, with MSAC's
    processor: detail grids of 1..4 tiles, adaptive grids of 1..4."""
    internvl_chat.build_tiny(output_dir)
    base = InternVLChatProcessor.from_pretrained(output_dir)
    tiles = base.image_processor
    images = MiniMonkeyImageProcessor(tiles.image_size, True, True, 1, internvl_chat.MAX_TILES, 1, 4)
    processor = MiniMonkeyProcessor(images, base.tokenizer, num_image_token=base.num_image_token,
                                    chat_template=base.chat_template)
    model = MiniMonkeyChatModel.from_pretrained(output_dir)
    save_checkpoint(model, processor, output_dir, base.tokenizer)
    with open(os.path.join(output_dir, "config.json")) as f:
        assert is_minimonkey_config(json.load(f)), "the saved tiny MiniMonkey must be found as one"
    return output_dir


FAMILY = Family(
    name="minimonkey",
    model_types=("internvl_chat",),
    claims=is_minimonkey_config,
    vision=internvl_chat.FAMILY.vision,
    projector=internvl_chat.FAMILY.projector,
    language=internvl_chat.FAMILY.language,
    lora_targets=internvl_chat.LM_TARGETS,
    image_placeholder=internvl_chat.IMAGE_PLACEHOLDER,
    build_tiny=build_tiny,
    pack_positions=text_positions,
    grounding=INTERNVL_STYLE,
    default_chat_template=internvl_chat.CHAT_TEMPLATE,
    auto_class="mixtune.native.minimonkey.MiniMonkeyChatModel",
    # a published folder has no processor files, and AutoProcessor would build InternVL2's (single-grid) one
    load_processor=MiniMonkeyProcessor.from_pretrained,
)
