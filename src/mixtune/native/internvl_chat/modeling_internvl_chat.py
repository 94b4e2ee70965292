"""InternVL2 (`InternVLChatModel`, `model_type` "internvl_chat") in plain PyTorch, with the published names.

`vision_model` (InternViT), `mlp1` (the projector: LayerNorm, Linear, GELU, Linear over 2x2 pixel-shuffled
patches) and `language_model` (InternLM2ForCausalLM, or transformers' Qwen2ForCausalLM / LlamaForCausalLM, as
`llm_config.architectures[0]` says). Each tile of each image becomes `num_image_token` vectors; the language
model's inputs at the `<IMG_CONTEXT>` positions are replaced by them, in order (tiles of all images stacked along
dim 0, as the processor writes them). `image_flags` (published): tiles flagged 0 are padding and are dropped.
"""

from __future__ import annotations

import os

import torch
from torch import nn
from transformers import GenerationMixin, LlamaForCausalLM, PreTrainedModel, Qwen2ForCausalLM
from transformers.modeling_outputs import CausalLMOutputWithPast

from mixtune.native.internlm2 import InternLM2ForCausalLM
from mixtune.native.internvl_chat.configuration_internvl_chat import InternVLChatConfig, context_token_id_of_folder
from mixtune.native.internvl_chat.modeling_intern_vit import InternVisionModel

LANGUAGE_MODELS = {"InternLM2ForCausalLM": InternLM2ForCausalLM, "Qwen2ForCausalLM": Qwen2ForCausalLM,
                   "LlamaForCausalLM": LlamaForCausalLM}


def pixel_shuffle(x: torch.Tensor, scale: float, ps_version: str) -> torch.Tensor:
    """(n, w, h, c) -> (n, w*scale, h*scale, c/scale^2), as published. ps_version "v1" (InternVL 1.x) leaves the
    result transposed; later versions transpose it back."""
    n, w, h, c = x.shape
    x = x.reshape(n, w, int(h * scale), int(c / scale))
    x = x.permute(0, 2, 1, 3)
    x = x.reshape(n, int(h * scale), int(w * scale), int(c / (scale * scale)))
    return x if ps_version == "v1" else x.permute(0, 2, 1, 3)


class InternVLChatPreTrainedModel(PreTrainedModel):
    config_class = InternVLChatConfig
    config: InternVLChatConfig
    base_model_prefix = ""
    supports_gradient_checkpointing = True
    _no_split_modules = ["InternVisionEncoderLayer", "InternLM2DecoderLayer", "Qwen2DecoderLayer",
                         "LlamaDecoderLayer"]
    _supports_sdpa = True
    _supports_flash_attn = True
    _supports_attention_backend = True
    _can_compile_fullgraph = False


class InternVLChatModel(InternVLChatPreTrainedModel, GenerationMixin):
    def __init__(self, config: InternVLChatConfig):
        super().__init__(config)
        self.num_image_token = config.num_image_token
        self.vision_model = InternVisionModel(config.vision_config)
        architecture = (config.llm_config.architectures or ["InternLM2ForCausalLM"])[0]
        self.language_model = LANGUAGE_MODELS[architecture](config.llm_config)
        vit, llm = config.vision_config.hidden_size, config.llm_config.hidden_size
        merged = vit * int(1 / config.downsample_ratio) ** 2
        self.mlp1 = nn.Sequential(nn.LayerNorm(merged), nn.Linear(merged, llm), nn.GELU(), nn.Linear(llm, llm))
        self.post_init()
        self.loss_type = "ForCausalLM"

    @classmethod
    def from_pretrained(cls, pretrained_model_name_or_path, *args, **kwargs):
        model = super().from_pretrained(pretrained_model_name_or_path, *args, **kwargs)
        if model.config.img_context_token_id is None and os.path.isdir(str(pretrained_model_name_or_path)):
            # published folders leave the id to their chat code, which reads it from the tokenizer: so do we
            model.config.img_context_token_id = context_token_id_of_folder(str(pretrained_model_name_or_path))
        return model

    def get_input_embeddings(self):
        return self.language_model.get_input_embeddings()

    def set_input_embeddings(self, value):
        self.language_model.set_input_embeddings(value)

    def get_output_embeddings(self):
        return self.language_model.get_output_embeddings()

    def set_output_embeddings(self, value):
        self.language_model.set_output_embeddings(value)

    def get_decoder(self):
        return self.language_model.get_decoder()

    def extract_feature(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """(tiles, 3, S, S) -> (tiles, num_image_token, llm hidden size)."""
        select = self.config.select_layer
        out = self.vision_model(pixel_values=pixel_values, output_hidden_states=select != -1)
        vit = out.last_hidden_state if select == -1 else out.hidden_states[select]
        vit = vit[:, 1:]  # drop the class token
        side = int(vit.shape[1] ** 0.5)
        vit = pixel_shuffle(vit.reshape(vit.shape[0], side, side, -1), self.config.downsample_ratio,
                            self.config.ps_version)
        return self.mlp1(vit.reshape(vit.shape[0], -1, vit.shape[-1]))

    def insert_images(self, embeds: torch.Tensor, input_ids: torch.Tensor | None, pixel_values, image_flags):
        context_id = self.config.img_context_token_id
        if pixel_values is None or len(pixel_values) == 0:
            if self.training and torch.is_grad_enabled():
                # as published, a text-only batch still runs the tower (on a blank tile, times 0): every process
                # of a distributed run then has gradients for the same parameters
                size = self.config.image_size
                blank = torch.zeros(1, 3, size, size, device=embeds.device, dtype=embeds.dtype)
                embeds = embeds + self.extract_feature(blank).sum() * 0
            return embeds
        if context_id is None:
            raise ValueError("internvl_chat: config.img_context_token_id is not set (the <IMG_CONTEXT> token id); "
                             "load the model through mixtune or set it from the tokenizer")
        if input_ids is None:
            raise ValueError("internvl_chat: images need input_ids, to find the <IMG_CONTEXT> positions")
        features = self.extract_feature(pixel_values)
        if image_flags is not None:
            features = features[image_flags.reshape(-1) == 1]
        features = features.reshape(-1, features.shape[-1]).to(embeds.dtype)
        selected = input_ids == context_id
        if int(selected.sum()) != features.shape[0]:
            raise ValueError(f"internvl_chat: {int(selected.sum())} <IMG_CONTEXT> tokens in the input but "
                             f"{features.shape[0] // self.num_image_token} image tiles of {self.num_image_token} "
                             "tokens each")
        return embeds.masked_scatter(selected[..., None].expand_as(embeds), features)

    def forward(self, input_ids=None, pixel_values=None, attention_mask=None, position_ids=None, cache=None,
                inputs_embeds=None, labels=None, image_flags=None, use_cache=None, logits_to_keep: int = 0,
                past_key_values=None, **kwargs) -> CausalLMOutputWithPast:
        cache = cache if cache is not None else past_key_values
        if inputs_embeds is None:
            inputs_embeds = self.get_input_embeddings()(input_ids)
        prefill = cache is None or cache.get_seq_length() == 0
        if prefill:
            inputs_embeds = self.insert_images(inputs_embeds, input_ids, pixel_values, image_flags)
        out = self.language_model(inputs_embeds=inputs_embeds, attention_mask=attention_mask,
                                  position_ids=position_ids, cache=cache, use_cache=use_cache,
                                  logits_to_keep=logits_to_keep, **kwargs)
        loss = None
        if labels is not None:
            loss = self.loss_function(logits=out.logits, labels=labels,
                                      vocab_size=self.config.llm_config.vocab_size, **kwargs)
        return CausalLMOutputWithPast(loss=loss, logits=out.logits, cache=out.cache)


__all__ = ["InternVLChatModel", "InternVLChatPreTrainedModel", "pixel_shuffle"]
