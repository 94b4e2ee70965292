"""LLaVA-NeXT-Video: LLaVA-NeXT (anyres image tiles) that also reads video: each frame goes through the vision
tower, is pooled 2x2 (`spatial_pool_stride`) and written as `<video>` tokens. The llava-hf checkpoints' prompt
style ("USER: <video>\\n... ASSISTANT: ...</s>")."""

from __future__ import annotations

import dataclasses

from mixtune.models import llava_onevision
from mixtune.models.tiny import TEXT_SIZES, save_checkpoint, seeded
from mixtune.models.tokenizer import train_tokenizer

TILE, PATCH = 56, 14
PINPOINTS = [[56, 56], [56, 112], [112, 56], [112, 112]]

CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{% if message['role'] == 'system' %}{% set prefix = '' %}"
    "{% elif message['role'] == 'user' %}{% set prefix = 'USER: ' %}"
    "{% else %}{% set prefix = 'ASSISTANT: ' %}{% endif %}"
    "{{ prefix }}{% if message['content'] is string %}{{ message['content'] }}{% else %}"
    "{% for part in message['content'] %}{% if part['type'] == 'image' %}<image>\n"
    "{% elif part['type'] == 'video' %}<video>\n"
    "{% elif part['type'] == 'text' %}{{ part['text'] }}{% endif %}{% endfor %}{% endif %}"
    "{% if message['role'] == 'assistant' %}</s>{% else %} {% endif %}"
    "{% endfor %}{% if add_generation_prompt %}ASSISTANT:{% endif %}"
)


def build_tiny(output_dir: str) -> str:
    from transformers import (CLIPVisionConfig, LlamaConfig, LlavaNextImageProcessor, LlavaNextVideoConfig,
                              LlavaNextVideoForConditionalGeneration, LlavaNextVideoProcessor)
    from transformers.models.llava_next_video.video_processing_llava_next_video import LlavaNextVideoVideoProcessor

    seeded()
    tok = train_tokenizer(["<unk>", "<s>", "</s>", "<pad>", "<image>", "<video>"], bos_token="<s>", eos_token="</s>",
                          unk_token="<unk>", pad_token="<pad>",
                          model_specific_special_tokens={"image_token": "<image>", "video_token": "<video>"})
    image_processor = LlavaNextImageProcessor(size={"shortest_edge": TILE}, crop_size={"height": TILE, "width": TILE},
                                              image_grid_pinpoints=PINPOINTS)
    video_processor = LlavaNextVideoVideoProcessor(size={"shortest_edge": TILE},
                                                   crop_size={"height": TILE, "width": TILE})
    processor = LlavaNextVideoProcessor(video_processor=video_processor, image_processor=image_processor, tokenizer=tok,
                                        patch_size=PATCH, vision_feature_select_strategy="default",
                                        num_additional_image_tokens=1, chat_template=CHAT_TEMPLATE)
    vision = CLIPVisionConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                              image_size=TILE, patch_size=PATCH, projection_dim=64)
    text = LlamaConfig(**TEXT_SIZES, vocab_size=len(tok), bos_token_id=tok.bos_token_id,
                       eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id)
    config = LlavaNextVideoConfig(vision_config=vision, text_config=text, image_token_index=tok.image_token_id,
                                  video_token_index=tok.video_token_id, image_grid_pinpoints=PINPOINTS,
                                  vision_feature_select_strategy="default", vision_feature_layer=-2,
                                  image_seq_length=(TILE // PATCH) ** 2,
                                  video_seq_length=(TILE // PATCH // 2) ** 2, tie_word_embeddings=True)
    model = LlavaNextVideoForConditionalGeneration(config)
    return save_checkpoint(model, processor, output_dir, tok)


# what differs from LLaVA-OneVision's record: the checkpoint type and its tiny builder
FAMILY = dataclasses.replace(llava_onevision.FAMILY, name="llava_next_video", model_types=("llava_next_video",),
                             build_tiny=build_tiny)
