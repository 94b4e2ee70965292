"""MiniMonkey's model: InternVL2's (`InternVLChatModel`), whose training forward PaddleMIX's
`MiniMonkeyChatModel` (paddlemix/models/internvl2/internvl_chat/modeling_minimonkey_chat.py) leaves unchanged.
What it adds is generation with the Scale Compression Mechanism (`generate(..., use_scm=True,
target_aspect_ratio=(cols, rows))`, scm.py). Its own class name is what `save_pretrained` writes into config.json's
`architectures`, so a saved MiniMonkey stays a MiniMonkey (mixtune picks the family by it)."""

from __future__ import annotations

import torch

from mixtune.native.internvl_chat.modeling_internvl_chat import InternVLChatModel
from mixtune.native.minimonkey.scm import kept_positions, second_layer_attention


class MiniMonkeyChatModel(InternVLChatModel):
    @torch.no_grad()
    def generate(self, input_ids=None, pixel_values=None, attention_mask=None, use_scm: bool = False,
                 target_aspect_ratio=None, image_flags=None, **kwargs):
        """With `use_scm`, the prompt's embeddings (images inserted) are compressed first and generation starts
        from them (the output then holds the new tokens only, as PaddleMIX's); `target_aspect_ratio` is the image's
        detail grid (cols, rows), which `msac_tiles` returns. Without it, InternVL2's generation."""
        if not use_scm:
            return super().generate(input_ids=input_ids, pixel_values=pixel_values, attention_mask=attention_mask,
                                    image_flags=image_flags, **kwargs)
        if input_ids is None or pixel_values is None or target_aspect_ratio is None:
            raise ValueError("use_scm needs input_ids, pixel_values and target_aspect_ratio (the detail grid)")
        if input_ids.shape[0] != 1:
            raise ValueError("use_scm compresses one sample at a time (as PaddleMIX's): pass a batch of one")
        if not hasattr(self.language_model, "model") or not hasattr(self.language_model.model, "tok_embeddings"):
            raise ValueError("use_scm reads InternLM2's attention: this checkpoint's language model is "
                             f"{type(self.language_model).__name__}")
        attention_mask = torch.ones_like(input_ids) if attention_mask is None else attention_mask
        embeds = self.insert_images(self.get_input_embeddings()(input_ids), input_ids, pixel_values, image_flags)
        probs = second_layer_attention(self.language_model, embeds, attention_mask)
        first_image = int((input_ids[0] == self.config.img_context_token_id).nonzero()[0])
        high = int(target_aspect_ratio[0]) * int(target_aspect_ratio[1]) * self.num_image_token
        keep = kept_positions(probs, first_image, high)
        embeds = embeds[:, keep]
        # the language model generates from the compressed embeddings, as PaddleMIX's does, stopping and padding
        # as this model's generation config says
        kwargs.setdefault("eos_token_id", self.generation_config.eos_token_id)
        kwargs.setdefault("pad_token_id", self.generation_config.pad_token_id)
        return self.language_model.generate(inputs_embeds=embeds, attention_mask=torch.ones(
            embeds.shape[:2], dtype=torch.long, device=embeds.device), **kwargs)


__all__ = ["MiniMonkeyChatModel"]
