"""InternVL2 in its original layout (`model_type` "internvl_chat": InternVL2-1B ... 76B as published, with remote
code): mixtune's native port (`mixtune.native.internvl_chat`), so the published folder loads without
`trust_remote_code`. InternViT (`vision_model`), the pixel-shuffle MLP projector (`mlp1`) and the language model
(`language_model`: InternLM2, Qwen2 or Llama). Images are tiled dynamically (aspect-ratio grid plus a thumbnail);
each `<image>` becomes `<img>` + num_image_token `<IMG_CONTEXT>` per tile + `</img>`. The transformers-native `-hf`
checkpoints are the `internvl` family."""

from __future__ import annotations

import tempfile

from mixtune.data.grounding import INTERNVL_STYLE
from mixtune.data.pack import text_positions
from mixtune.models.family import Family
from mixtune.models.tiny import INIT_STD, ROPE_THETA, save_checkpoint, seeded
from mixtune.native.internlm2 import InternLM2Config, InternLM2Tokenizer
from mixtune.native.internlm2.tokenization_internlm2 import train_tiny_spm
from mixtune.native.internvl_chat import (InternVLChatConfig, InternVLChatImageProcessor, InternVLChatModel,
                                          InternVLChatProcessor)
from mixtune.native.internvl_chat.configuration_internvl_chat import IMG_CONTEXT, IMG_END, IMG_START

IMAGE_PLACEHOLDER = "<image>\n"
SYSTEM_MESSAGE = ("你是由上海人工智能实验室联合商汤科技开发的书生多模态大模型，英文名叫InternVL, "
                  "是一个有用无害的人工智能助手。")


def internvl2_template(default_system: str) -> str:
    """InternVL2's "internlm2-chat" / "Hermes-2" conversation as its chat code writes it (PaddleMIX's
    conversation.py, separator style MPT): ChatML turns with no newline after `<|im_end|>`, the system turn always
    there (`default_system` unless the conversation brings one), each image as "<image>\n"."""
    return (
        "{% if messages[0]['role'] == 'system' %}{% set system = messages[0]['content'] %}"
        "{% if system is not string %}{% set system = system | map(attribute='text') | join('') %}{% endif %}"
        "{% set messages = messages[1:] %}{% else %}{% set system = '" + default_system + "' %}{% endif %}"
        "<|im_start|>system\n{{ system }}<|im_end|>"
        "{% for message in messages %}<|im_start|>{{ message['role'] }}\n"
        "{% if message['content'] is string %}{{ message['content'] }}{% else %}"
        "{% for part in message['content'] %}{% if part['type'] == 'image' %}" + IMAGE_PLACEHOLDER +
        "{% elif part['type'] == 'text' %}{{ part['text'] }}{% endif %}{% endfor %}{% endif %}"
        "<|im_end|>{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
    )


# Published folders ship no template for images (their chat code builds prompts): InternVL2's own
CHAT_TEMPLATE = internvl2_template(SYSTEM_MESSAGE)
# The language model's projections, whichever LM the checkpoint has (InternLM2's fused names, or Qwen2 / Llama's)
LM_TARGETS = (r".*language_model\.model\.layers\.\d+\.(attention\.wqkv|attention\.wo|feed_forward\.w1|"
              r"feed_forward\.w2|feed_forward\.w3|self_attn\.(q|k|v|o)_proj|mlp\.(gate|up|down)_proj)")

TILE, PATCH, MAX_TILES = 112, 14, 4  # 8x8 patches, pixel-shuffled to 16 tokens a tile


def tiny_tokenizer() -> InternLM2Tokenizer:
    """A SentencePiece BPE trained here on mixtune's small corpus (InternLM2's own has 92k pieces), with InternLM2's
    ChatML pieces and InternVL's image tokens, all special tokens as published."""
    from mixtune.models.tokenizer import _CORPUS

    folder = tempfile.mkdtemp(prefix="internlm2_spm_")
    path = train_tiny_spm(folder, _CORPUS * 3, vocab_size=600, user_defined=("<|im_start|>", "<|im_end|>"))
    tok = InternLM2Tokenizer(vocab_file=path, eos_token="<|im_end|>")
    # special tokens as in the published tokenizer_config.json (ChatML's pieces are special there too)
    tok.add_special_tokens({"additional_special_tokens": ["<|im_start|>", IMG_START, IMG_END, IMG_CONTEXT]})
    return tok


def build_tiny(output_dir: str) -> str:
    seeded()
    tok = tiny_tokenizer()
    images = InternVLChatImageProcessor(image_size=TILE, dynamic_image_size=True, use_thumbnail=True,
                                        min_dynamic_patch=1, max_dynamic_patch=MAX_TILES)
    llm = InternLM2Config(vocab_size=len(tok), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                          num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=2048, bias=False,
                          rope_theta=ROPE_THETA, initializer_range=INIT_STD, bos_token_id=tok.bos_token_id,
                          eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id,
                          architectures=["InternLM2ForCausalLM"])
    vision = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4, image_size=TILE,
                  patch_size=PATCH, qkv_bias=True, qk_normalization=False, norm_type="layer_norm",
                  initializer_range=INIT_STD, initializer_factor=1.0, architectures=["InternVisionModel"])
    config = InternVLChatConfig(vision_config=vision, llm_config=llm, downsample_ratio=0.5, template="internlm2-chat",
                                force_image_size=TILE, dynamic_image_size=True, use_thumbnail=True,
                                ps_version="v2", max_dynamic_patch=MAX_TILES,
                                img_context_token_id=tok.convert_tokens_to_ids(IMG_CONTEXT),
                                architectures=["InternVLChatModel"], initializer_range=INIT_STD)
    processor = InternVLChatProcessor(images, tok, num_image_token=config.num_image_token,
                                      chat_template=internvl2_template("You are a helpful assistant."))
    return save_checkpoint(InternVLChatModel(config), processor, output_dir, tok)


FAMILY = Family(
    name="internvl_chat",
    model_types=("internvl_chat",),
    vision=("vision_model.*",),
    projector=("mlp1.*",),
    language=("language_model.*",),
    lora_targets=LM_TARGETS,
    image_placeholder=IMAGE_PLACEHOLDER,
    build_tiny=build_tiny,
    pack_positions=text_positions,
    grounding=INTERNVL_STYLE,
    default_chat_template=CHAT_TEMPLATE,
)


