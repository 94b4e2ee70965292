"""InternLM-XComposer2 (`InternLMXComposer2ForCausalLM`) in plain PyTorch, with the published module names.

InternLM2 (mixtune.native.internlm2: `model.tok_embeddings`, `model.layers.N.attention.wqkv` ..., `output`) whose
`wqkv`, `wo`, `w1`, `w2`, `w3` are Partial LoRA layers (`...wqkv.Plora_A`, `...wqkv.Plora_B`), reading a CLIP
ViT (`vit.vision_tower`, transformers' CLIPVisionModel: its last layer's patch outputs, no class token, no final
norm) through `vision_proj` (Linear, GELU, Linear). Each image gives (img_size / patch)^2 vectors.

The published model splices image vectors between the text pieces' embeddings and builds `im_mask` alongside.
Here the processor writes one `image_placeholder_id` per image vector into `input_ids`, and the model puts the k-th
image's vectors at those positions, in order; `im_mask` is exactly those positions. Because it follows from
the ids, a packed row carries each sample's mask with it, and generation, labels and padding need no
bookkeeping of their own.
"""

from __future__ import annotations

import json
import os

from torch import nn
from transformers import CLIPVisionConfig, CLIPVisionModel
from transformers.cache_utils import Cache
from transformers.modeling_outputs import CausalLMOutputWithPast
from transformers.utils.deprecation import deprecate_kwarg

from mixtune.errors import MixtuneError
from mixtune.native.internlm2.modeling_internlm2 import InternLM2ForCausalLM, InternLM2Model
from mixtune.native.internlm_xcomposer2.configuration_internlm_xcomposer2 import InternLMXComposer2Config
from mixtune.native.internlm_xcomposer2.plora import PLoRALinear


class PublishedCLIPVisionModel(nn.Module):
    """`vit.vision_tower`: holds transformers' CLIPVisionModel as `vision_model`, where the published checkpoint
    (saved by an older transformers, whose CLIPVisionModel had that level) keeps its weights."""

    def __init__(self, config: CLIPVisionConfig):
        super().__init__()
        self.vision_model = CLIPVisionModel(config)


class CLIPVisionTower(nn.Module):
    """`vit`: pixels (B, 3, S, S) -> (B, patches, width), the last layer's outputs without the class token."""

    def __init__(self, config: CLIPVisionConfig):
        super().__init__()
        self.vision_tower = PublishedCLIPVisionModel(config)

    def forward(self, pixel_values):
        clip = self.vision_tower.vision_model
        # last_hidden_state is the last layer's output, before post_layernorm (which only the pooled vector gets)
        return clip(pixel_values=pixel_values.to(clip.embeddings.patch_embedding.weight.dtype)).last_hidden_state[:, 1:]


def vision_projector(config: InternLMXComposer2Config) -> nn.Module:
    """`vision_proj`: Linear, then (GELU, Linear) for each further depth step; mlp_depth 0: identity."""
    depth, width, hidden = config.mlp_depth, config.vision_config.hidden_size, config.hidden_size
    if depth == 0:
        return nn.Identity()
    layers = [nn.Linear(width, hidden)]
    for _ in range(1, depth):
        layers += [nn.GELU(), nn.Linear(hidden, hidden)]
    return nn.Sequential(*layers)


class InternLMXComposer2Model(InternLM2Model):
    """The language model (`model`): InternLM2 with every projection a Partial LoRA layer."""

    config_class = InternLMXComposer2Config
    linear_class = PLoRALinear


class InternLMXComposer2ForCausalLM(InternLM2ForCausalLM):
    config_class = InternLMXComposer2Config
    model_class = InternLMXComposer2Model
    _no_split_modules = ["InternLM2DecoderLayer", "CLIPEncoderLayer"]
    # older transformers saved the CLIP tower's position ids as a buffer: nothing to load
    _keys_to_ignore_on_load_unexpected = [r"rotary_emb\.inv_freq", r"vision_model\.embeddings\.position_ids"]

    @classmethod
    def from_pretrained(cls, pretrained_model_name_or_path, *args, **kwargs):
        refuse_4khd(str(pretrained_model_name_or_path))
        return super().from_pretrained(pretrained_model_name_or_path, *args, **kwargs)

    def __init__(self, config: InternLMXComposer2Config):
        super().__init__(config)
        self.vit = CLIPVisionTower(config.vision_config)
        self.vision_proj = vision_projector(config)
        self.post_init()
        self.loss_type = "ForCausalLM"

    def image_features(self, pixel_values):
        """(n_images, 3, S, S) -> (n_images, tokens per image, hidden_size)."""
        return self.vision_proj(self.vit(pixel_values))

    def embed_with_images(self, input_ids, pixel_values):
        """Token embeddings with each image's vectors at its `image_placeholder_id` positions; and those positions."""
        im_mask = input_ids == self.config.image_placeholder_id
        embeds = self.model.tok_embeddings(input_ids.masked_fill(im_mask, 0))
        n_positions = int(im_mask.sum())
        if pixel_values is None or len(pixel_values) == 0:
            if n_positions:
                raise ValueError(f"the input has {n_positions} image positions but no pixel_values: pass the "
                                 "images through the processor")
            return embeds, im_mask
        features = self.image_features(pixel_values).to(embeds.dtype)
        if n_positions != features.shape[0] * features.shape[1]:
            raise ValueError(f"{len(pixel_values)} images make {features.shape[0] * features.shape[1]} image vectors "
                             f"but the input has {n_positions} image positions (id {self.config.image_placeholder_id})")
        embeds = embeds.masked_scatter(im_mask[..., None], features.reshape(-1, features.shape[-1]))
        return embeds, im_mask

    @deprecate_kwarg("past_key_values", "5.40.0", new_name="cache")
    def forward(self, input_ids=None, attention_mask=None, position_ids=None, cache: Cache | None = None,
                inputs_embeds=None, pixel_values=None, labels=None, use_cache=None, logits_to_keep: int = 0,
                im_mask=None, **kwargs) -> CausalLMOutputWithPast:
        if inputs_embeds is None:
            if input_ids is None:
                raise ValueError("pass input_ids (or inputs_embeds with their im_mask)")
            prefill = cache is None or cache.get_seq_length() == 0
            # generation steps after the prompt carry no image positions: their pixel_values are spent
            inputs_embeds, im_mask = self.embed_with_images(input_ids, pixel_values if prefill else None)
        elif im_mask is None:  # embeddings given without a mask: text only
            im_mask = inputs_embeds.new_zeros(inputs_embeds.shape[:2], dtype=bool)
        return super().forward(attention_mask=attention_mask, position_ids=position_ids, cache=cache,
                               inputs_embeds=inputs_embeds, labels=labels, use_cache=use_cache,
                               logits_to_keep=logits_to_keep, linear_kwargs={"im_mask": im_mask}, **kwargs)


__all__ = ["InternLMXComposer2ForCausalLM", "InternLMXComposer2Model"]


# internlm-xcomposer2-4khd-7b's high-resolution tile separators: weights this port has no place for
HD_SEPARATORS = ("plora_glb_GN", "plora_sub_GN")


def weight_names(folder: str) -> set[str]:
    """The weight names a checkpoint folder holds, from its index file or its single safetensors file."""
    for index in ("model.safetensors.index.json", "pytorch_model.bin.index.json"):
        path = os.path.join(folder, index)
        if os.path.isfile(path):
            with open(path) as f:
                return set(json.load(f).get("weight_map", {}))
    path = os.path.join(folder, "model.safetensors")
    if os.path.isfile(path):
        from safetensors import safe_open

        with safe_open(path, "pt") as f:
            return set(f.keys())
    return set()


def refuse_4khd(folder: str) -> None:
    """The 4KHD variant loads into this port's shapes only partly (its tile separators dropped, its 490-px tower
    mismatched): say so in one line rather than fail on a size mismatch or run without the separators."""
    if os.path.isdir(folder) and weight_names(folder) & set(HD_SEPARATORS):
        raise MixtuneError(f"{folder} is InternLM-XComposer2-4KHD (its weights hold {' / '.join(HD_SEPARATORS)}, "
                           "the high-resolution tile separators): mixtune's port covers internlm-xcomposer2-7b and "
                           "-vl-7b, not the 4KHD variant")
