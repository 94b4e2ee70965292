"""Qwen2.5-VL: Qwen2-VL with window attention in the ViT and an RMSNorm/SwiGLU vision MLP; same layout."""

from __future__ import annotations

import dataclasses

from mixtune.models import qwen2_vl
from mixtune.models.qwen2_vl import IMAGE_MARKUP, VIDEO_MARKUP, qwen_tokenizer, text_sizes, token_ids
from mixtune.models.tiny import ROPE_THETA, chatml_template, save_checkpoint, seeded


def build_tiny(output_dir: str) -> str:
    from transformers import (Qwen2_5_VLConfig, Qwen2_5_VLForConditionalGeneration, Qwen2_5_VLProcessor,
                              Qwen2VLImageProcessor)
    from transformers.models.qwen2_vl.video_processing_qwen2_vl import Qwen2VLVideoProcessor

    seeded()
    tok = qwen_tokenizer()
    processor = Qwen2_5_VLProcessor(image_processor=Qwen2VLImageProcessor(min_pixels=56 * 56, max_pixels=112 * 112),
                                    tokenizer=tok, video_processor=Qwen2VLVideoProcessor(),
                                    chat_template=chatml_template(IMAGE_MARKUP, video_markup=VIDEO_MARKUP))
    text = text_sizes(tok, rope_parameters={"rope_type": "default", "mrope_section": [2, 3, 3],
                                            "rope_theta": ROPE_THETA})
    # window 56 px = 2x2 merged tokens; block 1 attends globally, as every 8th block does in the real model
    vision = dict(depth=2, hidden_size=64, intermediate_size=128, num_heads=4, out_hidden_size=64, patch_size=14,
                  spatial_merge_size=2, temporal_patch_size=2, window_size=56, fullatt_block_indexes=[1])
    config = Qwen2_5_VLConfig(text_config=text, vision_config=vision, **token_ids(tok),
                              tie_word_embeddings=True)
    return save_checkpoint(Qwen2_5_VLForConditionalGeneration(config), processor, output_dir, tok)


# Qwen2.5-VL writes boxes in absolute pixels of the image as its processor resized it, not 0-1000
GROUNDING = dataclasses.replace(qwen2_vl.FAMILY.grounding, model_image_size=qwen2_vl.resized_image_size)

FAMILY = dataclasses.replace(qwen2_vl.FAMILY, name="qwen2_5_vl", model_types=("qwen2_5_vl",),
                             build_tiny=build_tiny, grounding=GROUNDING)
