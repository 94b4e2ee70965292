"""The `Family` record: everything mixtune needs to know about one kind of checkpoint, and nothing more.

A family file builds one `Family` and registers it. Fields left at their defaults mean "the generic
path works": the checkpoint's processor and chat template render and tokenise the conversation.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any


@dataclass(frozen=True)
class Family:
    name: str
    model_types: tuple[str, ...]  # config.json `model_type` values served by this family
    # fnmatch globs over parameter names, for freeze shortcuts and LoRA defaults
    vision: tuple[str, ...]
    projector: tuple[str, ...]
    language: tuple[str, ...]
    # regex over module names: peft's default LoRA targets (the language model's attention and MLP)
    lora_targets: str
    # What one image looks like in rendered prompt text: used when a user template (PaddleMIX's
    # chat_template.json shape) writes `<image>` and the processor expects its own token.
    image_placeholder: str
    # Writes a tiny random-weight checkpoint of the real architecture into a folder.
    build_tiny: Callable[[str], None]
    # Optional: Conversation + images -> Encoded, for families whose prompts are not chat templates.
    encode: Callable[..., Any] | None = None
    # MixToken packing: (model, Encoded sample) -> that sample's position ids as the model takes them for a
    # batch of one: (L,) for 1-D RoPE (`mixtune.data.pack.text_positions`), (rows, L) for M-RoPE. Packed
    # rows concatenate them; positions restarting at 0 are what keep samples apart. None: the family
    # cannot pack exactly, and `mixtoken: true` is refused when the config is read.
    pack_positions: Callable[[Any, Any], Any] | None = None
    # transformers Auto class that loads the full model.
    auto_class: str = "AutoModelForImageTextToText"
