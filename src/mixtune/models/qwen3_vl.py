"""Qwen3-VL: SigLIP-2-style ViT (patch 16, learned positions) with DeepStack features fed into early LM
layers; the merger and the deepstack mergers are the projector, all inside `model.visual`."""

from __future__ import annotations

import dataclasses

from mixtune.models import qwen2_vl
from mixtune.models.qwen2_vl import IMAGE_MARKUP, VIDEO_MARKUP, qwen_tokenizer, text_sizes, token_ids
from mixtune.models.tiny import ROPE_THETA, chatml_template, save_checkpoint, seeded


def build_tiny(output_dir: str) -> str:
    from transformers import (Qwen2VLImageProcessor, Qwen3VLConfig, Qwen3VLForConditionalGeneration,
                              Qwen3VLProcessor)
    from transformers.models.qwen3_vl.video_processing_qwen3_vl import Qwen3VLVideoProcessor

    seeded()
    tok = qwen_tokenizer()
    # 128x128 images -> 8x8 patches of 16 -> 16 tokens after the 2x2 merge
    image_processor = Qwen2VLImageProcessor(patch_size=16, min_pixels=64 * 64, max_pixels=128 * 128)
    processor = Qwen3VLProcessor(image_processor=image_processor, tokenizer=tok,
                                 video_processor=Qwen3VLVideoProcessor(),
                                 chat_template=chatml_template(IMAGE_MARKUP, video_markup=VIDEO_MARKUP))
    text = text_sizes(tok, head_dim=16, rope_parameters={"rope_type": "default", "mrope_section": [2, 3, 3],
                                                         "rope_theta": ROPE_THETA, "mrope_interleaved": True})
    # the learned position grid must be square: 8x8 patches
    vision = dict(depth=2, hidden_size=64, intermediate_size=128, num_heads=4, out_hidden_size=64, patch_size=16,
                  spatial_merge_size=2, temporal_patch_size=2, num_position_embeddings=64,
                  deepstack_visual_indexes=[0])
    config = Qwen3VLConfig(text_config=text, vision_config=vision, **token_ids(tok), tie_word_embeddings=True)
    return save_checkpoint(Qwen3VLForConditionalGeneration(config), processor, output_dir, tok)


FAMILY = dataclasses.replace(
    qwen2_vl.FAMILY, name="qwen3_vl", model_types=("qwen3_vl",),
    projector=("model.visual.merger.*", "model.visual.deepstack_merger_list.*"), build_tiny=build_tiny)
