"""Gemma 3: SigLIP tower, an average-pooling projector, Gemma 3 language model. The processor returns
`token_type_ids` (1 on image tokens), which the model needs in training for bidirectional attention
among image tokens; the collator keeps it like any per-token field."""

from __future__ import annotations

from mixtune.models.family import Family
from mixtune.models.tiny import TEXT_SIZES, save_checkpoint, seeded
from mixtune.models.tokenizer import train_tokenizer

TILE, PATCH, TOKENS_PER_IMAGE = 56, 14, 4  # 4x4 patches average-pooled to 2x2 tokens
# The checkpoints' template: turns between <start_of_turn>{user|model} and <end_of_turn>.
CHAT_TEMPLATE = (
    "{{ bos_token }}{% for message in messages %}"
    "{% set role = 'model' if message['role'] == 'assistant' else 'user' %}<start_of_turn>{{ role }}\n"
    "{% for part in message['content'] %}{% if part['type'] == 'image' %}<start_of_image>"
    "{% elif part['type'] == 'text' %}{{ part['text'] }}{% endif %}{% endfor %}<end_of_turn>\n"
    "{% endfor %}{% if add_generation_prompt %}<start_of_turn>model\n{% endif %}"
)


def build_tiny(output_dir: str) -> str:
    from transformers import (Gemma3Config, Gemma3ForConditionalGeneration, Gemma3ImageProcessor, Gemma3Processor,
                              Gemma3TextConfig, SiglipVisionConfig)

    seeded()
    tok = train_tokenizer(["<pad>", "<eos>", "<bos>", "<unk>", "<start_of_turn>", "<end_of_turn>",
                           "<start_of_image>", "<end_of_image>", "<image_soft_token>"],
                          bos_token="<bos>", eos_token="<end_of_turn>", pad_token="<pad>", unk_token="<unk>",
                          model_specific_special_tokens={"boi_token": "<start_of_image>", "eoi_token": "<end_of_image>",
                                                         "image_token": "<image_soft_token>"})
    processor = Gemma3Processor(image_processor=Gemma3ImageProcessor(size={"height": TILE, "width": TILE}),
                                tokenizer=tok, image_seq_length=TOKENS_PER_IMAGE, chat_template=CHAT_TEMPLATE)
    vision = SiglipVisionConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                                image_size=TILE, patch_size=PATCH)
    text = Gemma3TextConfig(**TEXT_SIZES, head_dim=16, query_pre_attn_scalar=16, sliding_window=64,
                            vocab_size=len(tok), bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id,
                            pad_token_id=tok.pad_token_id)
    config = Gemma3Config(text_config=text, vision_config=vision, mm_tokens_per_image=TOKENS_PER_IMAGE,
                          boi_token_index=tok.convert_tokens_to_ids("<start_of_image>"),
                          eoi_token_index=tok.convert_tokens_to_ids("<end_of_image>"),
                          image_token_index=tok.convert_tokens_to_ids("<image_soft_token>"))
    model = Gemma3ForConditionalGeneration(config)
    return save_checkpoint(model, processor, output_dir, tok)


FAMILY = Family(
    name="gemma3",
    model_types=("gemma3",),
    vision=("model.vision_tower.*",),
    projector=("model.multi_modal_projector.*",),
    image_placeholder="<start_of_image>",
    build_tiny=build_tiny,
)
