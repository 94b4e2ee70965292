"""LLaVA-NeXT (LLaVA-1.6): LLaVA-1.5 plus "anyres" tiling: each image becomes a base view and a grid of
tiles, so pixel_values are (images, tiles, 3, H, W) with a tile count that differs per image; the collator
zero-pads tiles (the model unpads them by `image_sizes`). `image_newline` belongs to the projector."""

from __future__ import annotations

from mixtune.data.collate import pad_and_concat
from mixtune.data.pack import text_positions
from mixtune.models.family import Family
from mixtune.models.llava import CHAT_TEMPLATE, llama_tokenizer
from mixtune.models.tiny import TEXT_SIZES, save_checkpoint, seeded

TILE, PATCH = 56, 14
PINPOINTS = [[56, 56], [56, 112], [112, 56], [112, 112]]


def build_tiny(output_dir: str) -> str:
    from transformers import (CLIPVisionConfig, LlamaConfig, LlavaNextConfig, LlavaNextForConditionalGeneration,
                              LlavaNextImageProcessor, LlavaNextProcessor)

    seeded()
    tok = llama_tokenizer()
    image_processor = LlavaNextImageProcessor(size={"shortest_edge": TILE}, crop_size={"height": TILE, "width": TILE},
                                              image_grid_pinpoints=PINPOINTS)
    processor = LlavaNextProcessor(image_processor=image_processor, tokenizer=tok, patch_size=PATCH,
                                   vision_feature_select_strategy="default", num_additional_image_tokens=1,
                                   chat_template=CHAT_TEMPLATE)
    vision = CLIPVisionConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                              image_size=TILE, patch_size=PATCH, projection_dim=64)
    text = LlamaConfig(**TEXT_SIZES, vocab_size=len(tok), bos_token_id=tok.bos_token_id,
                       eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id)
    config = LlavaNextConfig(vision_config=vision, text_config=text, image_token_index=tok.image_token_id,
                             image_grid_pinpoints=PINPOINTS, vision_feature_select_strategy="default",
                             vision_feature_layer=-2, image_seq_length=(TILE // PATCH) ** 2, tie_word_embeddings=True)
    model = LlavaNextForConditionalGeneration(config)
    return save_checkpoint(model, processor, output_dir, tok)


FAMILY = Family(
    name="llava_next",
    model_types=("llava_next",),
    vision=("model.vision_tower.*",),
    projector=("model.multi_modal_projector.*", "model.image_newline"),
    image_placeholder="<image>",
    build_tiny=build_tiny,
    collate_media=pad_and_concat,
    pack_positions=text_positions,
)
