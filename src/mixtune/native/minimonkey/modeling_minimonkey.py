"""MiniMonkey's model: InternVL2's (`InternVLChatModel`), whose training forward PaddleMIX's
`MiniMonkeyChatModel` (paddlemix/models/internvl2/internvl_chat/modeling_minimonkey_chat.py) leaves unchanged.
Its own class name is what `save_pretrained` writes into config.json's `architectures`, so a saved MiniMonkey
stays a MiniMonkey (mixtune picks the family by it)."""

from __future__ import annotations

from mixtune.native.internvl_chat.modeling_internvl_chat import InternVLChatModel


class MiniMonkeyChatModel(InternVLChatModel):
    pass


__all__ = ["MiniMonkeyChatModel"]
