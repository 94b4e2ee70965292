"""LLaVA-OneVision (and llava-next-interleave): SigLIP tower, Qwen2 language model, ChatML prompts, and
LLaVA-NeXT's anyres tiling, so tiles are zero-padded per batch like LLaVA-NeXT's."""

from __future__ import annotations

from mixtune.data.collate import pad_and_concat
from mixtune.data.pack import text_positions
from mixtune.errors import ConfigError
from mixtune.models.family import Family
from mixtune.models.tiny import TEXT_SIZES, chatml_template, save_checkpoint, seeded
from mixtune.models.tokenizer import train_tokenizer

TILE, PATCH = 56, 14
PINPOINTS = [[56, 56], [56, 112], [112, 56], [112, 112]]


def build_tiny(output_dir: str) -> str:
    from transformers import (LlavaOnevisionConfig, LlavaOnevisionForConditionalGeneration,
                              LlavaOnevisionImageProcessor, LlavaOnevisionProcessor, LlavaOnevisionVideoProcessor,
                              Qwen2Config, SiglipVisionConfig)

    seeded()
    tok = train_tokenizer(["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<image>", "<video>"],
                          eos_token="<|im_end|>", pad_token="<|endoftext|>",
                          model_specific_special_tokens={"image_token": "<image>", "video_token": "<video>"})
    image_processor = LlavaOnevisionImageProcessor(size={"height": TILE, "width": TILE},
                                                   image_grid_pinpoints=PINPOINTS)
    processor = LlavaOnevisionProcessor(image_processor=image_processor, tokenizer=tok,
                                        video_processor=LlavaOnevisionVideoProcessor(
                                            size={"height": TILE, "width": TILE}),
                                        num_image_tokens=(TILE // PATCH) ** 2, vision_feature_select_strategy="full",
                                        chat_template=chatml_template("<image>\n", video_markup="<video>\n"))
    vision = SiglipVisionConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                                image_size=TILE, patch_size=PATCH)
    text = Qwen2Config(**TEXT_SIZES, vocab_size=len(tok), bos_token_id=None, eos_token_id=tok.eos_token_id,
                       pad_token_id=tok.pad_token_id)
    config = LlavaOnevisionConfig(vision_config=vision, text_config=text, image_token_index=tok.image_token_id,
                                  video_token_index=tok.video_token_id, image_grid_pinpoints=PINPOINTS,
                                  vision_feature_select_strategy="full", vision_feature_layer=-1,
                                  tie_word_embeddings=True)
    model = LlavaOnevisionForConditionalGeneration(config)
    return save_checkpoint(model, processor, output_dir, tok)


def collate_media_one_frame_count(media: list[dict]) -> dict:
    """Tiles zero-padded per batch (`pad_and_concat`); videos must share one frame count, since the model
    reads `pixel_values_videos` as (videos, frames, ...) and a padded frame would become video tokens."""
    counts = sorted({m["pixel_values_videos"].shape[1] for m in media if "pixel_values_videos" in m})
    if len(counts) > 1:
        raise ConfigError(f"a batch holds videos of {counts} frames, but this model takes one frame count per "
                          "batch: give the dataset entries min_frames equal to max_frames (shorter videos repeat "
                          "frames to reach it)", key="dataset.min_frames")
    return pad_and_concat(media)


FAMILY = Family(
    name="llava_onevision",
    model_types=("llava_onevision",),
    vision=("model.vision_tower.*",),
    projector=("model.multi_modal_projector.*", "model.image_newline"),
    image_placeholder="<image>\n",
    build_tiny=build_tiny,
    collate_media=collate_media_one_frame_count,
    pack_positions=text_positions,
    video_placeholder="<video>\n",
)
