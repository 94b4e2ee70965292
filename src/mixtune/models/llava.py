"""LLaVA-1.5: a CLIP vision tower, a two-layer MLP projector, a Llama-style language model."""

from __future__ import annotations

from mixtune.data.pack import text_positions
from mixtune.models.family import Family
from mixtune.models.tiny import INIT_STD, ROPE_THETA, TEXT_SIZES, save_checkpoint, seeded
from mixtune.models.tokenizer import train_tokenizer

# The llava-hf checkpoints' conversation style ("USER: <image>\n... ASSISTANT: ...</s>").
CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{% if message['role'] == 'system' %}{% set prefix = '' %}"
    "{% elif message['role'] == 'user' %}{% set prefix = 'USER: ' %}"
    "{% else %}{% set prefix = 'ASSISTANT: ' %}{% endif %}"
    "{{ prefix }}{% if message['content'] is string %}{{ message['content'] }}{% else %}"
    "{% for part in message['content'] %}{% if part['type'] == 'image' %}<image>\n"
    "{% elif part['type'] == 'text' %}{{ part['text'] }}{% endif %}{% endfor %}{% endif %}"
    "{% if message['role'] == 'assistant' %}</s>{% else %} {% endif %}"
    "{% endfor %}{% if add_generation_prompt %}ASSISTANT:{% endif %}"
)


def llama_tokenizer():
    return train_tokenizer(["<unk>", "<s>", "</s>", "<pad>", "<image>"], bos_token="<s>", eos_token="</s>",
                           unk_token="<unk>", pad_token="<pad>",
                           model_specific_special_tokens={"image_token": "<image>"})


def build_tiny(output_dir: str) -> str:
    from transformers import (CLIPImageProcessor, CLIPVisionConfig, LlamaConfig, LlavaConfig,
                              LlavaForConditionalGeneration, LlavaProcessor)

    seeded()
    tok = llama_tokenizer()
    image_size, patch = 112, 14
    image_processor = CLIPImageProcessor(size={"shortest_edge": image_size},
                                         crop_size={"height": image_size, "width": image_size})
    processor = LlavaProcessor(image_processor=image_processor, tokenizer=tok, patch_size=patch,
                               vision_feature_select_strategy="default", num_additional_image_tokens=1,
                               chat_template=CHAT_TEMPLATE)
    vision = CLIPVisionConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                              image_size=image_size, patch_size=patch, projection_dim=64,
                              initializer_range=INIT_STD)
    text = LlamaConfig(**TEXT_SIZES, vocab_size=len(tok), bos_token_id=tok.bos_token_id,
                       eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id,
                       rope_parameters={"rope_type": "default", "rope_theta": ROPE_THETA})
    config = LlavaConfig(vision_config=vision, text_config=text, image_token_index=tok.convert_tokens_to_ids("<image>"),
                         vision_feature_select_strategy="default", vision_feature_layer=-2,
                         image_seq_length=(image_size // patch) ** 2, tie_word_embeddings=True,
                         initializer_range=INIT_STD)
    model = LlavaForConditionalGeneration(config)
    return save_checkpoint(model, processor, output_dir, tok)


FAMILY = Family(
    name="llava",
    model_types=("llava",),
    vision=("model.vision_tower.*",),
    projector=("model.multi_modal_projector.*",),
    image_placeholder="<image>",
    build_tiny=build_tiny,
    pack_positions=text_positions,
)
