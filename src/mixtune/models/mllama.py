"""Mllama (Llama 3.2 Vision): a tiled ViT with gated global layers, a linear projector, and a Llama
language model that reads image features through interleaved cross-attention layers. `<|image|>` stays a
single token; the processor returns pixel_values (samples, images, tiles, 3, H, W), aspect-ratio ids and
masks, and a per-token `cross_attention_mask` (samples, tokens, images, tiles): all zero-padded per batch
(padding tiles and images are masked out by those masks)."""

from __future__ import annotations

from mixtune.data.collate import pad_and_concat
from mixtune.data.encode import encode_with_processor, generation_inputs as generic_generation_inputs
from mixtune.models.family import Family
from mixtune.models.tiny import TEXT_SIZES, save_checkpoint, seeded
from mixtune.models.tokenizer import train_tokenizer

TILE, PATCH = 56, 14
# Llama 3's header/eot turn format.
CHAT_TEMPLATE = (
    "{{ bos_token }}{% for message in messages %}<|start_header_id|>{{ message['role'] }}<|end_header_id|>\n\n"
    "{% for part in message['content'] %}{% if part['type'] == 'image' %}<|image|>"
    "{% elif part['type'] == 'text' %}{{ part['text'] }}{% endif %}{% endfor %}<|eot_id|>{% endfor %}"
    "{% if add_generation_prompt %}<|start_header_id|>assistant<|end_header_id|>\n\n{% endif %}"
)


def with_bos(processor, render):
    """The processor inserts BOS into prompts that lack it, which would shift every character offset
    after it; giving it prompts that start with BOS keeps the offsets those of the rendered text."""
    bos = processor.tokenizer.bos_token

    def render_with_bos(messages, add_generation_prompt):
        text = render(messages, add_generation_prompt)
        return text if text.startswith(bos) else bos + text
    return render_with_bos


def encode(conv, images, processor, render):
    return encode_with_processor(conv, images, processor, with_bos(processor, render))


def generation_inputs(conv, images, processor, render):
    return generic_generation_inputs(conv, images, processor, with_bos(processor, render))


def build_tiny(output_dir: str) -> str:
    from transformers import (MllamaConfig, MllamaForConditionalGeneration, MllamaImageProcessor, MllamaProcessor,
                              MllamaTextConfig, MllamaVisionConfig)

    seeded()
    tok = train_tokenizer(["<|begin_of_text|>", "<|end_of_text|>", "<|finetune_right_pad_id|>", "<|image|>",
                           "<|python_tag|>", "<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>"],
                          bos_token="<|begin_of_text|>", eos_token="<|eot_id|>", pad_token="<|finetune_right_pad_id|>",
                          model_specific_special_tokens={"image_token": "<|image|>"})
    image_processor = MllamaImageProcessor(size={"height": TILE, "width": TILE}, max_image_tiles=2)
    processor = MllamaProcessor(image_processor=image_processor, tokenizer=tok, chat_template=CHAT_TEMPLATE)
    # vision_output_dim = hidden x (intermediate layers + the final one)
    vision = MllamaVisionConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_global_layers=1,
                                attention_heads=4, image_size=TILE, patch_size=PATCH, max_num_tiles=2,
                                intermediate_layers_indices=[0], vision_output_dim=128,
                                supported_aspect_ratios=[[1, 1], [1, 2], [2, 1]])
    sizes = {k: v for k, v in TEXT_SIZES.items() if k != "num_hidden_layers"}
    text = MllamaTextConfig(**sizes, num_hidden_layers=3, cross_attention_layers=[1], vocab_size=len(tok),
                            bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id,
                            pad_token_id=tok.pad_token_id)
    config = MllamaConfig(vision_config=vision, text_config=text, image_token_index=tok.image_token_id)
    model = MllamaForConditionalGeneration(config)
    return save_checkpoint(model, processor, output_dir, tok)


FAMILY = Family(
    name="mllama",
    model_types=("mllama",),
    vision=("model.vision_model.*",),
    projector=("model.multi_modal_projector.*",),
    # self- and cross-attention projections and the MLP of the language model
    image_placeholder="<|image|>",
    build_tiny=build_tiny,
    encode=encode,
    generation_inputs=generation_inputs,
    collate_media=pad_and_concat,
)
