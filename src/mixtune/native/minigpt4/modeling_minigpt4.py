"""MiniGPT-4 in PyTorch: BLIP-2's vision tower and Q-Former, a linear projection, a Llama / Vicuna.

The architecture is PaddleMIX's `MiniGPT4ForConditionalGeneration` (and Vision-CAIR's MiniGPT-4): EVA ViT-g
(`vision_model`, its last hidden state after `post_layernorm`, the published `ln_vision`), the Q-Former
(`query_tokens`, `qformer`) cross-attending to it, `language_projection` (the published `llama_proj`) mapping
the query outputs into the language model (`language_model`, transformers' LlamaForCausalLM). The tower,
Q-Former and Llama are transformers' own classes (their names are BLIP-2's and Llama's); this module only joins
them. PaddleMIX splits the prompt at `<ImageHere>` and concatenates [first text, image, second text]; here the
processor writes `num_query_tokens` image tokens in that place and the model puts the image's vectors there,
which gives the same sequence. `position_ids` are honoured, so packed rows restart positions.
"""

from __future__ import annotations

import torch
from torch import nn
from transformers import (AutoModelForCausalLM, Blip2QFormerModel, Blip2VisionModel, GenerationMixin,
                          PreTrainedModel)
from transformers.modeling_outputs import CausalLMOutputWithPast

from mixtune.native.minigpt4.configuration_minigpt4 import MiniGPT4Config


class MiniGPT4PreTrainedModel(PreTrainedModel):
    config_class = MiniGPT4Config
    config: MiniGPT4Config
    base_model_prefix = "minigpt4"
    input_modalities = ("image", "text")
    supports_gradient_checkpointing = True
    _no_split_modules = ["Blip2Attention", "Blip2QFormerMultiHeadAttention", "Blip2EncoderLayer",
                         "Blip2VisionEmbeddings", "LlamaDecoderLayer"]
    _supports_sdpa = True
    _supports_flash_attn = True
    _supports_attention_backend = True

    def _init_weights(self, module):
        super()._init_weights(module)
        std = self.config.initializer_range
        if isinstance(module, MiniGPT4ForConditionalGeneration):
            # BLIP-2 draws its query tokens from N(0, std); zeros would make every query the same
            nn.init.normal_(module.query_tokens, std=std)


class MiniGPT4ForConditionalGeneration(MiniGPT4PreTrainedModel, GenerationMixin):
    main_input_name = "input_ids"

    def __init__(self, config: MiniGPT4Config):
        super().__init__(config)
        self.vision_model = Blip2VisionModel(config.vision_config)
        self.query_tokens = nn.Parameter(torch.zeros(1, config.num_query_tokens, config.qformer_config.hidden_size))
        self.qformer = Blip2QFormerModel(config.qformer_config)
        self.language_projection = nn.Linear(config.qformer_config.hidden_size, config.text_config.hidden_size)
        self.language_model = AutoModelForCausalLM.from_config(config.text_config)
        self.post_init()

    def get_input_embeddings(self):
        return self.language_model.get_input_embeddings()

    def set_input_embeddings(self, value):
        self.language_model.set_input_embeddings(value)

    def get_output_embeddings(self):
        return self.language_model.get_output_embeddings()

    def set_output_embeddings(self, new_embeddings):
        self.language_model.set_output_embeddings(new_embeddings)

    def get_decoder(self):
        return self.language_model.get_decoder()

    def get_image_features(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """(images, num_query_tokens, text hidden size): what stands in the prompt for each image."""
        pixel_values = pixel_values.to(self.vision_model.embeddings.patch_embedding.weight.dtype)
        image_embeds = self.vision_model(pixel_values=pixel_values).last_hidden_state
        image_mask = torch.ones(image_embeds.shape[:-1], dtype=torch.long, device=image_embeds.device)
        queries = self.query_tokens.expand(image_embeds.shape[0], -1, -1)
        query_output = self.qformer(query_embeds=queries, encoder_hidden_states=image_embeds,
                                    encoder_attention_mask=image_mask).last_hidden_state
        return self.language_projection(query_output.to(self.language_projection.weight.dtype))

    def embed(self, input_ids: torch.Tensor, pixel_values: torch.Tensor | None) -> torch.Tensor:
        image_mask = input_ids == self.config.image_token_id
        embeds = self.get_input_embeddings()(input_ids.masked_fill(image_mask, 0))
        n_tokens = int(image_mask.sum())
        if n_tokens == 0:
            # a continuation step of generation carries pixel_values but no image tokens any more
            return embeds
        if pixel_values is None:
            raise ValueError("the input has image tokens but no pixel_values: pass the images through the processor")
        features = self.get_image_features(pixel_values)
        if n_tokens != features.shape[0] * features.shape[1]:
            raise ValueError(f"{n_tokens} image tokens in the input, but {features.shape[0]} images of "
                             f"{features.shape[1]} query tokens each")
        return embeds.masked_scatter(image_mask[..., None], features.to(embeds.dtype))

    def forward(self, input_ids=None, attention_mask=None, position_ids=None, past_key_values=None,
                inputs_embeds=None, pixel_values=None, labels=None, use_cache=None, logits_to_keep: int = 0,
                **kwargs) -> CausalLMOutputWithPast:
        if (input_ids is None) == (inputs_embeds is None):
            raise ValueError("pass exactly one of input_ids and inputs_embeds")
        if inputs_embeds is None:
            inputs_embeds = self.embed(input_ids, pixel_values)
        if past_key_values is not None:
            kwargs["past_key_values"] = past_key_values
        return self.language_model(inputs_embeds=inputs_embeds, attention_mask=attention_mask,
                                   position_ids=position_ids, labels=labels, use_cache=use_cache,
                                   logits_to_keep=logits_to_keep, **kwargs)

    def prepare_inputs_for_generation(self, input_ids, **kwargs):
        # generation embeds from input_ids at every step (the image tokens only at the first), never from
        # inputs_embeds, so the image's vectors are inserted by `embed`
        model_inputs = super().prepare_inputs_for_generation(input_ids, **kwargs)
        model_inputs["pixel_values"] = kwargs.get("pixel_values")
        return model_inputs
